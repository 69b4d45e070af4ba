"""`kvloft eval`: its argument parser and command (the evaluation itself is kvloft/eval/runner.py)."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path
from typing import Any

from kvloft.config import METHODS, CacheConfig, RuntimeConfig, parse_tokens
from kvloft.eval.results import from_runs, markdown, own_prefills, save
from kvloft.eval.runner import evaluate
from kvloft.eval.tasks import TASKS

__all__ = ["add_eval_parser", "cmd_eval", "output_paths", "variant_label"]


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _budgets(text: str) -> list[int]:
    """"1024" or "1024,2048" -> the run's budgets."""
    try:
        return [int(x) for x in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget must be host tokens per step, e.g. 2048 or 1024,2048; got {text!r}")


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Register `kvloft eval` on the CLI's subparsers."""
    e = subparsers.add_parser("eval", help="RULER-style task accuracy of retrieval methods vs dense")
    e.add_argument("--model", default="smollm2")
    e.add_argument("--tasks", default="passkey,niah_single_number", help=f"comma list of {', '.join(TASKS)}")
    e.add_argument("--lengths", default="2k,4k", help="comma list of prompt lengths (e.g. 2k,4k,6000)")
    e.add_argument("--methods", default="dense,exact,tokenselect", help=f"comma list of {', '.join(METHODS)}; "
                   "options as name:key=value (e.g. exact:rank=prob); append +x for remapped positions "
                   "(extrapolation), e.g. exact+x")
    e.add_argument("--budget", type=_budgets, default=[1024],
                   help="host-tier tokens retrieved per step; a comma list (1024,2048) runs every method but "
                        "dense at each budget on the same prompts and prefills")
    e.add_argument("--samples", type=int, default=4, help="samples per task and length")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--sink", type=int, default=64, help="first tokens always attended")
    e.add_argument("--window", type=int, default=512, help="last tokens always attended")
    e.add_argument("--max-similar", type=int, default=None,
                   help="cap near-identical keys in a selection (RetrievalConfig.max_similar; 0 = off; "
                        "default: the position mode's, on for +x methods)")
    e.add_argument("--max-new-tokens", type=int, default=None, help="default: per task")
    e.add_argument("--chat", action="store_true",
                   help="render prompts in the model's own chat template (instruct models; RULER's chat format)")
    e.add_argument("--name", default=None, help="run name: file names and doc section (default: a stamp)")
    e.add_argument("--out", type=Path, default=Path("."),
                   help="directory for quality_<name>.json, .runs.jsonl and .md (default: the current "
                        "directory); a path ending in .json names the JSON file itself")
    e.add_argument("--doc", type=Path, default=None,
                   help="markdown page to update (default: quality_<name>.md beside the JSON)")
    e.add_argument("--note", default="", help="a sentence for the doc section (e.g. the machine's load)")
    e.add_argument("--device", default="auto")
    e.add_argument("--dtype", default="auto", help="model dtype: auto (bfloat16 on CUDA, float32 on the CPU), "
                   "float32, bfloat16, float16")
    e.add_argument("--kernels", default=None, choices=["auto", "reference", "triton"])
    e.add_argument("--prefill-chunk", type=int, default=None,
                   help="tokens per prefill chunk (default: RuntimeConfig's); larger fills a GPU better")
    e.add_argument("--weights", default="bf16", choices=["bf16", "int8", "int4"],
                   help="linear weights as loaded (bf16: the model dtype) or packed 8/4-bit")
    e.add_argument("--host-dtype", default=None, choices=["int8", "fp8"],
                   help="host-tier K/V rows in 8 bits with a scale per row and head (default: the model dtype)")
    e.add_argument("--prefill", default="shared", choices=["shared", "own"],
                   help="shared (default): prefill each prompt once, densely, and fork that session into each "
                        "method (a method the fork refuses, e.g. +x, prefills on its own; its runs say so); "
                        "own: each method prefills every prompt itself")
    e.add_argument("--full-answers", action="store_true",
                   help="generate every answer to EOS or the limit (default: stop once it holds every "
                        "reference, which cannot change its score)")
    e.add_argument("--no-progress", action="store_true")
    e.add_argument("--from-runs", type=Path, nargs="+", default=None, metavar="RUNS_JSONL",
                   help="run nothing: rebuild the JSON and the doc section from .runs.jsonl files")
    e.set_defaults(func=cmd_eval)
    return e


def cmd_eval(args) -> int:
    from kvloft.runtime.loader import load_model

    tasks, methods = _csv(args.tasks), _csv(args.methods)
    lengths = [parse_tokens(x) for x in _csv(args.lengths)]
    kw = {"progress": False, "device": args.device}
    if args.kernels:
        kw["kernels"] = args.kernels
    if args.prefill_chunk:
        kw["prefill_chunk"] = args.prefill_chunk
    name = args.name or _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out, doc = output_paths(args.out, args.doc, name)
    if args.from_runs:
        result = from_runs(args.from_runs)
    else:
        runtime = RuntimeConfig(**kw)
        model = load_model(args.model, device=args.device, dtype=args.dtype, weights=args.weights)
        runs = Path(out).with_suffix(".runs.jsonl")
        runs.parent.mkdir(parents=True, exist_ok=True)
        with open(runs, "w") as f:

            def write(record: dict[str, Any]) -> None:
                f.write(json.dumps(record) + "\n")
                f.flush()

            result = evaluate(model, tasks, lengths, methods, (args.budget[0] if len(args.budget) == 1 else args.budget), args.samples, args.seed, args.sink,
                              args.window, args.max_new_tokens, progress=not args.no_progress, runtime=runtime,
                              on_record=write, max_similar=args.max_similar, chat=args.chat,
                              cache=CacheConfig(host_dtype=args.host_dtype), variant=variant_label(args),
                              prefill=args.prefill, until_scored=not args.full_answers)
    for why in result["skipped"].values():
        print(why, file=sys.stderr)
    for method, why in own_prefills(result["runs"]).items():
        print(f"{method}: own prefill (the shared prefill could not be forked into it: {why})", file=sys.stderr)
    save(result, out, doc, name, args.note)
    print(markdown(result, name, args.note))
    brief = {f"{c['task']}@{c['length']}:{c['method']}": round(c["score"], 3) for c in result["cells"]}
    print(json.dumps({"out": str(out), "doc": str(doc), "score": brief}))
    return 0


def variant_label(args) -> str:
    """"" for the model dtype's weights and host tier, else "[int4]", "[fp8]", "[int4,fp8]"."""
    parts = [p for p in (None if args.weights == "bf16" else args.weights, args.host_dtype) if p]
    return f"[{','.join(parts)}]" if parts else ""


def output_paths(out: Path, doc: Path | None, name: str) -> tuple[Path, Path]:
    """(JSON path, markdown path) of a run: out is a directory, or the JSON file if it ends in .json."""
    out = Path(out)
    json_path = out if out.suffix == ".json" else out / f"quality_{name}.json"
    return json_path, Path(doc) if doc is not None else json_path.with_suffix(".md")

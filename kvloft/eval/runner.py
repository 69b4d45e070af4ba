"""Task-level quality of retrieval methods: RULER-style samples run through real sessions.

    model = kvloft.load_model("smollm2")
    result = evaluate(model, ["passkey"], [2048], ["dense", "exact"], budget=256, samples=4, seed=0, chat=True)
    save(result, out=Path("quality_x.json"), doc=Path("quality_x.md"))

Each sample is run once per method, in a fresh Session: the prompt is fed (chunked
prefill), then the answer is generated greedily until a newline, EOS or the task's token
limit, and scored as RULER scores it (kvloft.eval.scoring). Per (task, length, method) the
result holds the mean score, n, a 95% Wilson interval, mean prefill seconds, decode
ms/token and keys attended per decode step (per layer and KV head: the static tier plus
the rows the retriever picked; for dense, the whole context).

The command line is `kvloft eval` (see add_eval_parser); it writes into the current
directory or `--out DIR`, never into the package. kvloft.eval.report merges results files
into one table and a plot.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import math
import os
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kvloft.config import METHODS, CacheConfig, RetrievalConfig, RuntimeConfig, parse_tokens
from kvloft.eval.scoring import TASK_METRIC, score
from kvloft.eval.tasks import TASKS, Sample, build_prompt, run_task_samples
from kvloft.index.base import METHOD_MODULES, Selection

__all__ = [
    "RULER_MAX_NEW_TOKENS",
    "add_eval_parser",
    "evaluate",
    "markdown",
    "max_new_tokens_for",
    "method_unavailable",
    "save",
    "wilson_interval",
]

# RULER's tokens_to_generate per task family; passkey answers in a handful of tokens.
RULER_MAX_NEW_TOKENS = {
    "passkey": 16, "niah_single_number": 128, "niah_single_word": 128, "niah_single_uuid": 128,
    "niah_multikey": 128, "niah_multivalue": 128, "niah_multiquery": 128, "vt": 30, "cwe": 120, "fwe": 50,
}
ANSWER_SLACK = 8  # tokens allowed beyond the references themselves (spaces, commas, a full stop)


# ----------------------------------------------------------------------------- small pieces


def wilson_interval(mean: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion `mean` observed over n trials ((0, 1) for n = 0).

    Fractional scores (string_match_all over several references) are treated as that many
    successes; the interval is then an approximation.
    """
    if n == 0:
        return 0.0, 1.0
    denom = 1 + z * z / n
    centre = (mean + z * z / (2 * n)) / denom
    half = z * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


EXTRAPOLATE_SUFFIX = "+x"  # "exact+x": the method with position_mode="extrapolate"


def parse_method(spec: str) -> tuple[str, dict[str, Any], str]:
    """"name[:key=value...][+x]" -> (name, RetrievalConfig options, position mode), e.g.
    "exact:rank=prob" or "hip:keys_on=host+x"; values that read as numbers become numbers."""
    mode = "exact"
    if spec.endswith(EXTRAPOLATE_SUFFIX):
        spec, mode = spec[: -len(EXTRAPOLATE_SUFFIX)], "extrapolate"
    name, *pairs = spec.split(":")
    options: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise ValueError(f"method option {pair!r} in {spec!r} must read key=value (e.g. exact:rank=prob)")
        options[key] = _number(value)
    return name, options, mode


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def method_unavailable(method: str) -> str | None:
    """None if `method` can run here, else why not (its module is missing or fails to import)."""
    method = parse_method(method)[0]
    if method not in METHODS:
        return f"unknown method {method!r}; known: {', '.join(METHODS)}"
    if method == "dense":
        return None
    module = f"kvloft.index.{METHOD_MODULES[method]}"
    try:
        importlib.import_module(module)
    except ImportError as e:
        return f"method {method!r} skipped: {module} cannot be imported ({e})"
    return None


def max_new_tokens_for(sample: Sample, tokenizer: Any) -> int:
    """Plain prompts: the answer's own tokens plus slack, at most RULER's limit for the task.
    Chat prompts: RULER's limit (an instruct model formats its answer as it likes, a list on
    several lines say, and ends its turn with EOS)."""
    if sample.chat is not None:
        return RULER_MAX_NEW_TOKENS.get(sample.task, 128)
    answer = " " + ", ".join(sample.references)
    need = len(tokenizer.encode(answer, add_bos=False)) + ANSWER_SLACK
    return min(RULER_MAX_NEW_TOKENS.get(sample.task, 128), need)


class _CountingRetriever:
    """Forwards to a session's retriever and counts the host rows each select() hands back."""

    def __init__(self, inner: Any, n_kv_heads: int) -> None:
        self.inner = inner
        self.n_kv_heads = n_kv_heads
        self.calls = 0
        self.rows_per_head = 0.0  # summed over calls: selected rows per KV head

    def build(self, layer, keys, queries) -> None:
        self.inner.build(layer, keys, queries)

    def add(self, layer, keys, positions) -> None:
        self.inner.add(layer, keys, positions)

    def select(self, layer, q, budget) -> Selection:
        sel = self.inner.select(layer, q, budget)
        valid = int((sel.ids >= 0).sum())
        self.calls += 1
        self.rows_per_head += valid if sel.shared else valid / self.n_kv_heads
        return sel

    def stats(self) -> dict[str, Any]:
        return self.inner.stats()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


# ----------------------------------------------------------------------------- one run


@dataclass
class RunRecord:
    """One sample under one method."""

    task: str
    length: int
    index: int
    seed: int
    depth: float | None
    method: str
    prompt_tokens: int
    output: str
    references: list[str]
    score: float
    prefill_s: float
    decode_tokens: int
    decode_ms_per_tok: float | None
    keys_per_step: float | None  # keys attended per decode step, per layer and KV head
    scanned_per_step: float | None  # keys the search scored per decode step and layer (all KV heads)
    budget: int | None = None  # host tokens retrieved per step; None: dense (runs files before it: unknown)


def _retrieval(method: str, budget: int, n_sink: int, n_window: int, max_similar: int | None = None) -> RetrievalConfig:
    """A method name with options (parse_method), and "+x" for the same method with remapped
    positions (extrapolation)."""
    name, options, mode = parse_method(method)
    return RetrievalConfig(method=name, budget=budget, n_sink=n_sink, n_window=n_window, position_mode=mode,
                           max_similar=max_similar, options=options)


def run_sample(model, sample: Sample, index: int, rcfg: RetrievalConfig, runtime: RuntimeConfig,
               max_new_tokens: int, label: str | None = None, cache: CacheConfig | None = None) -> RunRecord:
    """Feed the sample's prompt in a fresh session, generate greedily (to a newline for plain
    prompts, to EOS for chat prompts), score.

    label: the method's name in the results (default rcfg.method; "exact+x" for extrapolation).
    cache: the session's tier settings (e.g. an 8-bit host tier); default CacheConfig().
    """
    from kvloft.runtime.session import Session

    s = Session(model, rcfg, runtime, cache)
    counter = None
    if rcfg.method != "dense":
        counter = _CountingRetriever(s.backend.retriever, model.config.n_kv_heads)
        s.backend.retriever = counter  # count what each decode step attends to
    prompt_tokens = s.feed(build_prompt(sample))
    # plain prompts stop at the end of the line; chat answers at EOS (the end of the turn)
    output = s.generate(max_new_tokens=max_new_tokens, stop=None if sample.chat is not None else ["\n"])
    st = s.stats()
    t = st["timings_s"]
    steps = t["decode_tokens"]
    keys = scanned = None
    if steps and counter is None:
        keys = prompt_tokens + (steps + 1) / 2  # mean context over the steps
    elif steps and counter is not None:
        calls = max(counter.calls, 1)
        keys = st["tier_tokens"]["static"] + counter.rows_per_head / calls
        scanned = st["keys_scanned"] / calls
    return RunRecord(
        task=sample.task, length=sample.target_tokens, index=index, seed=sample.seed, depth=sample.depth,
        method=label or rcfg.method, prompt_tokens=prompt_tokens, output=output, references=list(sample.references),
        score=score(sample.task, output, sample.references), prefill_s=t["prefill_s"], decode_tokens=steps,
        decode_ms_per_tok=st.get("decode_ms_per_tok"), keys_per_step=keys, scanned_per_step=scanned,
        budget=None if rcfg.method == "dense" else rcfg.budget,
    )


# ----------------------------------------------------------------------------- the evaluation


def _check_args(model, tasks, lengths, methods, budget, samples) -> None:
    if getattr(model, "tokenizer", None) is None:
        raise ValueError("evaluate needs a model with a tokenizer (e.g. load_model('smollm2')), "
                         "not a random-weight preset")
    unknown = [t for t in tasks if t not in TASKS or t not in TASK_METRIC]
    if unknown or not tasks:
        raise ValueError(f"tasks must be a non-empty list of {', '.join(TASKS)}; got {list(tasks)}")
    if not lengths or any(not isinstance(n, int) or n <= 0 for n in lengths):
        raise ValueError(f"lengths must be positive token counts (e.g. [2048, 4096]); got {list(lengths)}")
    bad = [m for m in methods if parse_method(m)[0] not in METHODS]
    if bad or not methods:
        raise ValueError(f"methods must be a non-empty list of {', '.join(METHODS)}; got {list(methods)}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an int >= 1, got {samples!r}")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ValueError(f"budget must be an int >= 0 host tokens per step, got {budget!r}")


def _mean(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def summarize(records: list[RunRecord]) -> list[dict[str, Any]]:
    """One cell per (task, length, method), in first-seen order."""
    groups: dict[tuple[str, int, str], list[RunRecord]] = {}
    for r in records:
        groups.setdefault((r.task, r.length, r.method), []).append(r)
    cells = []
    for (task, length, method), rs in groups.items():
        mean = statistics.fmean(r.score for r in rs)
        lo, hi = wilson_interval(mean, len(rs))
        cells.append({
            "task": task, "length": length, "method": method, "n": len(rs), "score": mean,
            "ci95": [lo, hi], "prompt_tokens": statistics.fmean(r.prompt_tokens for r in rs),
            "prefill_s": _mean([r.prefill_s for r in rs]),
            "decode_ms_per_tok": _mean([r.decode_ms_per_tok for r in rs]),
            "keys_per_step": _mean([r.keys_per_step for r in rs]),
            "scanned_per_step": _mean([r.scanned_per_step for r in rs]),
        })
    return cells


def machine_label() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    label = f"{cpu}, {os.cpu_count()} cores, torch {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        label += f"; {torch.cuda.get_device_name()}"
    return label


def evaluate(
    model,
    tasks: Sequence[str],
    lengths: Sequence[int],
    methods: Sequence[str],
    budget: int,
    samples: int,
    seed: int = 0,
    n_sink: int = 64,
    n_window: int = 512,
    max_new_tokens: int | None = None,
    progress: bool = True,
    runtime: RuntimeConfig | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    max_similar: int | None = None,
    chat: bool = False,
    cache: CacheConfig | None = None,
    variant: str = "",
) -> dict[str, Any]:
    """Run every sample once per method; returns {"meta", "skipped", "cells", "runs"}.

    chat: render each prompt in the model's own chat template (kvloft.eval.tasks.generate);
    the same samples for every method either way (seeded).

    on_record: called with {"meta", "skipped"} before the first run and with each run's
    record (a dict) as it completes, so a long evaluation that is stopped keeps what it
    did (`kvloft eval` appends them to a .runs.jsonl file; `--from-runs` rebuilds the tables).

    max_new_tokens: None = per sample, the answer's tokens plus slack, at most RULER's
    limit for the task (see max_new_tokens_for). Methods whose retriever module is missing
    are skipped and listed under "skipped" with the reason. max_similar: None = the position
    mode's default (RetrievalConfig; the cap is on for "+x" methods, off otherwise).
    cache: every session's tier settings (CacheConfig(host_dtype="fp8") for an 8-bit host
    tier). variant: appended to every method's label ("exact[int4,fp8]"), so runs of the same
    method with other weights or tiers stay apart when runs files are merged.
    """
    tasks, lengths, methods = list(tasks), list(lengths), list(methods)
    _check_args(model, tasks, lengths, methods, budget, samples)
    for m in methods:  # configs are checked before any slow work
        if m != "dense":
            _retrieval(m, budget, n_sink, n_window, max_similar)
    runtime = runtime or RuntimeConfig(progress=False)
    skipped = {m: why for m in methods if (why := method_unavailable(m))}
    active = [m for m in methods if m not in skipped]
    meta = _meta(model, tasks, lengths, methods, budget, samples, seed, n_sink, n_window, max_new_tokens, runtime)
    meta["max_similar"] = max_similar
    meta["chat"] = chat
    meta["variant"] = variant
    meta["host_dtype"] = (cache or CacheConfig()).host_dtype
    if on_record is not None:
        on_record({"meta": meta, "skipped": skipped})
    drawn = {t: run_task_samples(t, model.tokenizer, lengths, samples, seed, chat=chat) for t in tasks}
    bar = _progress_bar(sum(len(v) for v in drawn.values()) * len(active), progress)
    records: list[RunRecord] = []
    for task_samples in drawn.values():
        for i, sample in enumerate(task_samples):
            limit = max_new_tokens or max_new_tokens_for(sample, model.tokenizer)
            for method in active:
                rcfg = _retrieval(method, budget, n_sink, n_window, max_similar)
                records.append(run_sample(model, sample, i % samples, rcfg, runtime, limit,
                                          label=method + variant, cache=cache))
                _advance(bar, records[-1])
                if on_record is not None:
                    on_record(asdict(records[-1]))
    if bar is not None:
        bar.close()
    return {"meta": meta, "skipped": skipped, "cells": summarize(records),
            "runs": [asdict(r) for r in records]}


def _progress_bar(total: int, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="run", desc="eval")


def _advance(bar, rec: RunRecord) -> None:
    if bar is None:
        return
    bar.set_postfix_str(f"{rec.task}@{rec.length} {rec.method}: {rec.score:.0%}")
    bar.update(1)


def _meta(model, tasks, lengths, methods, budget, samples, seed, n_sink, n_window, max_new_tokens,
          runtime: RuntimeConfig) -> dict[str, Any]:
    return {
        "model": model.source, "model_name": model.config.name, "dtype": str(model.dtype).replace("torch.", ""),
        "device": str(model.device), "kernels": runtime.kernels, "prefill_chunk": runtime.resolved_prefill_chunk(model.device),
        "machine": machine_label(), "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__, "tasks": tasks, "lengths": lengths, "methods": methods,
        "budget": budget, "samples": samples, "seed": seed, "n_sink": n_sink, "n_window": n_window,
        "max_new_tokens": max_new_tokens or "per task (plain: answer tokens + 8, at most RULER's; chat: RULER's)",
    }


# ----------------------------------------------------------------------------- reports


def _cell_text(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "-"
    lo, hi = cell["ci95"]
    return f"{100 * cell['score']:.0f}% ({cell['n']}) [{100 * lo:.0f}, {100 * hi:.0f}]"


def _cost_text(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "-"
    parts = [f"{cell['prefill_s']:.1f} s"]
    parts.append("-" if cell["decode_ms_per_tok"] is None else f"{cell['decode_ms_per_tok']:.0f} ms")
    parts.append("-" if cell["keys_per_step"] is None else f"{cell['keys_per_step']:.0f}")
    return " / ".join(parts)


def _table(result: dict[str, Any], fmt) -> list[str]:
    meta = result["meta"]
    variant = meta.get("variant", "")
    methods = [m + variant for m in meta["methods"] if m not in result["skipped"]]
    cells = {(c["task"], c["length"], c["method"]): c for c in result["cells"]}
    lines = ["| task | length | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for task in meta["tasks"]:
        for length in meta["lengths"]:
            row = [fmt(cells.get((task, length, m))) for m in methods]
            lines.append(f"| {task} | {length} | " + " | ".join(row) + " |")
    return lines


def markdown(result: dict[str, Any], name: str, note: str = "") -> str:
    """One section of docs/quality.md: settings, the score table and the cost table."""
    m = result["meta"]
    lines = [
        f"## {name}",
        "",
        f"- model: `{Path(m['model']).name}` ({m['dtype']}, {m['device']}, kernels {m['kernels']})",
        f"- machine: {m['machine']}",
        f"- date: {m['date']}",
        (f"- settings: budget {m['budget']} host tokens per step, sink {m['n_sink']}, window {m['n_window']}, "
        f"{m['samples']} samples per task and length (seed {m['seed']}, needle depths (i + 0.5) / n), greedy, "
        f"max new tokens {m['max_new_tokens']}, prefill chunk {m['prefill_chunk']}"),
        "- prompt: " + ("the model's chat template (one user message), then the answer prefix; answers end at EOS"
                        if m.get("chat") else "plain text ending with the answer prefix (no chat template); "
                        "answers end at a newline"),
    ]
    if m.get("max_similar"):
        lines.append(f"- at most {m['max_similar']} near-identical keys per selection (max_similar)")
    elif m.get("max_similar", 0) is None and any(x.endswith(EXTRAPOLATE_SUFFIX) for x in m["methods"]):
        x = RetrievalConfig(position_mode="extrapolate")
        lines.append(f"- +x methods: at most {x.max_similar} near-identical keys per selection "
                     f"({x.similar_bits}-bit SimHash buckets; the extrapolate defaults)")
    lines += [f"- {why}" for why in result["skipped"].values()]
    if note:
        lines.append(f"- note: {note}")
    lines += ["", "Score (RULER string match, %), (n) and 95% Wilson interval:", "", *_table(result, _cell_text)]
    lines += ["", ("Cost per run: prefill s / decode ms per token / keys attended per decode step "
              "(per layer and KV head):"), "", *_table(result, _cost_text)]
    return "\n".join(lines) + "\n"


DOC_TITLE = "# Task quality: RULER-style tasks through real sessions\n"


def write_doc(path: Path, section: str, name: str) -> None:
    """Put this run's section into the page between its markers (replaced if the run name exists)."""
    begin, end = f"<!-- quality:{name}:begin -->", f"<!-- quality:{name}:end -->"
    block = f"{begin}\n{section}{end}"
    text = path.read_text() if path.exists() else DOC_TITLE
    i, j = text.find(begin), text.find(end)
    if 0 <= i < j:
        text = text[:i] + block + text[j + len(end):]
    else:
        text = text.rstrip("\n") + f"\n\n{block}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def save(result: dict[str, Any], out: Path | None, doc: Path | None, name: str | None = None,
         note: str = "") -> str:
    """Write the JSON (out) and the markdown section (doc); returns the run name used."""
    name = name or _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"name": name, "note": note, **result}, indent=1))
    if doc is not None:
        write_doc(Path(doc), markdown(result, name, note), name)
    return name


def from_runs(paths: Sequence[Path]) -> dict[str, Any]:
    """Rebuild a result from .runs.jsonl files that `kvloft eval` wrote as it went (an
    evaluation that was stopped, or several partial ones of the same settings: their meta
    must agree on everything but the tasks, lengths, methods and seeds, which are merged; runs
    of several seeds list them all under meta["seed"])."""
    meta: dict[str, Any] | None = None
    skipped: dict[str, str] = {}
    records: list[RunRecord] = []
    for path in paths:
        lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        if not lines or "meta" not in lines[0]:
            raise ValueError(f"{path} is not a runs file of `kvloft eval` (its first line must hold the meta)")
        head = lines[0]
        if meta is None:
            meta = dict(head["meta"])
        else:
            for key in ("tasks", "lengths", "methods"):
                meta[key] = list(dict.fromkeys([*meta[key], *head["meta"][key]]))
            seeds = meta["seed"] if isinstance(meta["seed"], list) else [meta["seed"]]
            if head["meta"]["seed"] not in seeds:
                meta["seed"] = sorted([*seeds, head["meta"]["seed"]])
        skipped.update(head["skipped"])
        records += [RunRecord(**r) for r in lines[1:]]
    if meta is None:
        raise ValueError("from_runs needs at least one runs file")
    cells = summarize(records)
    meta["samples"] = max((c["n"] for c in cells), default=0)  # cells may hold fewer: see each n
    return {"meta": meta, "skipped": skipped, "cells": cells, "runs": [asdict(r) for r in records]}


# ----------------------------------------------------------------------------- command line


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Register `kvloft eval` on the CLI's subparsers."""
    e = subparsers.add_parser("eval", help="RULER-style task accuracy of retrieval methods vs dense")
    e.add_argument("--model", default="smollm2")
    e.add_argument("--tasks", default="passkey,niah_single_number", help=f"comma list of {', '.join(TASKS)}")
    e.add_argument("--lengths", default="2k,4k", help="comma list of prompt lengths (e.g. 2k,4k,6000)")
    e.add_argument("--methods", default="dense,exact,tokenselect", help=f"comma list of {', '.join(METHODS)}; "
                   "options as name:key=value (e.g. exact:rank=prob); append +x for remapped positions "
                   "(extrapolation), e.g. exact+x")
    e.add_argument("--budget", type=int, default=1024, help="host-tier tokens retrieved per step")
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

            result = evaluate(model, tasks, lengths, methods, args.budget, args.samples, args.seed, args.sink,
                              args.window, args.max_new_tokens, progress=not args.no_progress, runtime=runtime,
                              on_record=write, max_similar=args.max_similar, chat=args.chat,
                              cache=CacheConfig(host_dtype=args.host_dtype), variant=variant_label(args))
    for why in result["skipped"].values():
        print(why, file=sys.stderr)
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

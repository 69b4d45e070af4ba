"""Device memory of one decode row phase by phase, against its memory plan (scheduler/budget.py).

bench/decode.py reports one peak per row (torch.cuda.max_memory_allocated over fill, index
build, warm-up and timed steps); this splits it: after the context is written into the tiers,
the peak of the index build, and the peak of the first Engine steps (graph capture) and of the
steps after, each beside the plan's weights + static + row cache + index + decode workspace
(what bench/decode.py fits() checks). --snapshot PATH also records every allocation's stack
(torch.cuda.memory._record_memory_history) and writes a snapshot at the end for
https://pytorch.org/memory_viz, which names what is live at the peak.

    python bench/plan_peak.py --preset llama3-8b --context 128k --method exact:keys_on=device
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fill_context, token_stream

from kvloft import CacheConfig, Engine, RetrievalConfig, RuntimeConfig, Session, load_model
from kvloft.config import parse_bytes, parse_tokens
from kvloft.eval.runner import parse_method
from kvloft.scheduler.budget import plan_memory

GiB = 2**30


def gib(n: int) -> float:
    return round(n / GiB, 3)


CUDA = torch.cuda.is_available()  # a script: checking at start is fine (CPU: a smoke run, figures 0)


def phase(name: str, out: dict) -> None:
    """Record the allocated bytes now and the peak since the last phase, then reset the peak."""
    if not CUDA:
        out[name] = {"allocated_gib": 0.0, "peak_gib": 0.0}
        return
    torch.cuda.synchronize()
    out[name] = {"allocated_gib": gib(torch.cuda.memory_allocated()), "peak_gib": gib(torch.cuda.max_memory_allocated())}
    torch.cuda.reset_peak_memory_stats()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--context", default="128k")
    ap.add_argument("--method", default="exact:keys_on=device")
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--sink", type=int, default=128)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--gpu-budget", default="24GiB")
    ap.add_argument("--snapshot", default="", help="write a CUDA memory snapshot (pickle) here")
    args = ap.parse_args()
    n = parse_tokens(args.context)
    name, options, _ = parse_method(args.method)
    model = load_model(args.preset, device="cuda" if CUDA else "cpu", dtype="bfloat16" if CUDA else "float32")
    rcfg = RetrievalConfig(method=name, budget=args.budget, n_sink=args.sink, n_window=args.window, options=options)
    cache = CacheConfig(host_chunk_tokens=max(n, 1))  # as bench/decode.py's rows
    plan = plan_memory(model.config, rcfg, RuntimeConfig(gpu_memory_budget=args.gpu_budget), n + 64, model.dtype,
                       check=False, cache_cfg=cache)
    out: dict = {"plan_gib": {k: gib(getattr(plan, k)) for k in
                              ("weights", "static", "row_cache", "index", "decode_workspace")}}
    out["plan_gib"]["decode_total"] = gib(plan.resident + plan.decode_workspace)
    if args.snapshot and CUDA:
        torch.cuda.memory._record_memory_history(max_entries=200_000)
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    phase("weights", out)
    s = Session(model, rcfg, RuntimeConfig(progress=False), cache)
    build = s.backend.build_indexes if hasattr(s.backend, "build_indexes") else None
    if build is not None:
        s.backend.build_indexes = lambda: None  # fill the tiers first, build after: two phases
    fill_context(s, n)
    phase("fill", out)
    if build is not None:
        del s.backend.build_indexes
        build()
    phase("index_build", out)
    engine = Engine(model, max_batch=1)
    tokens = token_stream(args.steps)
    engine.step([(s, tokens[0])])
    phase("first_step", out)
    for t in tokens[1:]:
        engine.step([(s, t)])
    phase("steps", out)
    out["route"] = dict(engine.route_counts)
    budget = parse_bytes(args.gpu_budget)
    out["over_plan_gib"] = {k: round(v["peak_gib"] - out["plan_gib"]["decode_total"], 3) for k, v in out.items()
                            if isinstance(v, dict) and "peak_gib" in v}
    out["over_budget"] = any(v["peak_gib"] > budget / GiB for v in out.values() if isinstance(v, dict)
                             and "peak_gib" in v)
    if args.snapshot and CUDA:
        torch.cuda.memory._dump_snapshot(args.snapshot)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""CPU batched decode step of B exact sessions (kvloft.Engine): ms per step and where it goes.

SmolLM2-135M fp32 on the CPU, --batches sessions (e.g. 1,4,16) each holding a synthetic
--tokens context written straight into its tiers (bench/common.py fill_context: random keys
and values, no prefill), exact retrieval (--budget, --sink, --window: serve_load's server runs
sink 16, window 64, budget 64). For each B, --steps engine steps; per step the wall time, the
time inside the batched attention calls (RowAttention.attend: append, search, attention, per
layer) and the rest (embedding, the weight GEMMs, norms, head, Python). Medians; the load
average before and after. --compare alternates each step with the per-row route (kernels/
cpu_rows.py enabled = False), so both see the same load.

    python bench/cpu_batch_step.py --batches 1,4,16 --tokens 2048 --budget 256
Prints one JSON line per B, then a summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import fill_context

import kvloft
from kvloft.config import RetrievalConfig, RuntimeConfig

try:  # absent from versions before it (run this file against them with PYTHONPATH)
    from kvloft.kernels import cpu_rows
except ImportError:
    cpu_rows = None
from kvloft.runtime import engine as engine_mod


def timed_attention() -> list[float]:
    """Wrap RowAttention.attend to sum its seconds per step (bench only)."""
    acc = [0.0]
    inner = engine_mod.RowAttention.attend

    def attend(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            return inner(self, *a, **kw)
        finally:
            acc[0] += time.perf_counter() - t0

    engine_mod.RowAttention.attend = attend
    return acc


def run_batch(model, b: int, args, acc: list[float]) -> dict:
    rcfg = RetrievalConfig(method="exact", budget=args.budget, n_sink=args.sink, n_window=args.window)
    rt = RuntimeConfig(device="cpu", progress=False)
    sessions = []
    for _ in range(b):
        s = kvloft.Session(model, rcfg, rt)
        fill_context(s, args.tokens)
        sessions.append(s)
    engine = kvloft.Engine(model, max_batch=max(b, 1))
    toks = [7 + i for i in range(b)]
    for _ in range(2):  # warm up
        engine.step(list(zip(sessions, toks, strict=True)))
    routes = [True, False] if args.compare else [True]
    wall: dict[bool, list[float]] = {r: [] for r in routes}
    attn: dict[bool, list[float]] = {r: [] for r in routes}
    for i in range(args.steps):
        for r in routes:  # alternating, so that both routes see the same load
            if cpu_rows is not None:
                cpu_rows.enabled = r
            acc[0] = 0.0
            t0 = time.perf_counter()
            engine.step([(s, 11 + i + j) for j, s in enumerate(sessions)])
            wall[r].append(1e3 * (time.perf_counter() - t0))
            attn[r].append(1e3 * acc[0])
    if cpu_rows is not None:
        cpu_rows.enabled = True
    timers: dict[str, float] = {}
    for s in sessions:
        for k, v in s.backend.timers.seconds.items():
            timers[k] = timers.get(k, 0.0) + v
    steps = len(routes) * args.steps + 2
    row = {"batch": b, "row_timers_ms_per_step": {k: round(1e3 * v / steps, 1) for k, v in sorted(timers.items())}}
    for r in routes:
        med_w, med_a = statistics.median(wall[r]), statistics.median(attn[r])
        row["host_pass" if r else "per_row"] = {
            "step_ms": round(med_w, 1), "attention_ms": round(med_a, 1), "rest_ms": round(med_w - med_a, 1),
            "ms_per_token": round(med_w / b, 1), "steps_ms": [round(x, 1) for x in wall[r]]}
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--sink", type=int, default=16)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default="", help="write the rows and the summary to this JSON file")
    p.add_argument("--compare", action="store_true",
                   help="alternate each step with the per-row route (kernels/cpu_rows.py enabled = False)")
    a = p.parse_args()
    model = kvloft.load_model("smollm2")
    acc = timed_attention()
    load0 = os.getloadavg()[0]
    rows = []
    for b in [int(x) for x in a.batches.split(",")]:
        row = run_batch(model, b, a, acc)
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {"tokens": a.tokens, "budget": a.budget, "sink": a.sink, "window": a.window,
               "threads": torch.get_num_threads(), "load": [round(load0, 2), round(os.getloadavg()[0], 2)],
               "step_ms": {r["batch"]: r["host_pass"]["step_ms"] for r in rows}}
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({**summary, "rows": rows}, fh, indent=1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

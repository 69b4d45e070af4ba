"""Decode latency with and without the scheduler (GPU row cache, planned transfers).

Same setup as bench/decode.py (random weights in real shapes, a synthetic context
written straight into the tiers with bench/common.py's `fill_context`), one filled session per
(context, method), then each variant decodes over the same tiers and indexes:

  none       TieredAttention (rows read zero-copy from the one pinned host chunk)
  zero_copy  ScheduledAttention, missing rows gathered by the Triton kernel from pinned host memory
  staged     ScheduledAttention, missing rows gathered on the CPU into pinned staging buffers
             and copied H2D on the copy stream

Two token streams per variant: "random" (token i % 1000 + 1, as decode.py: consecutive
queries unrelated, the worst case for the cache) and "repeat" (one token again and again:
similar consecutive queries, a proxy for the locality of real text). Rows report median
ms/token, the row-cache hit rate and rows fetched per layer-step over the timed steps,
peak GPU memory against the budget. The cache gets what the GPU budget leaves
(scheduler/budget.py) unless --cache-gib is given. A fetch micro-benchmark compares the
two transfer paths alone (GB/s of K+V rows moved).

    python bench/scheduler_speed.py --preset llama3-8b --contexts 32k,128k --methods exact,hip
Prints a table and one JSON line last; writes JSON to $OUT or bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_decode_args, fill_context, timed_steps, token_stream

from kvloft import CacheConfig, RetrievalConfig, RuntimeConfig, Session, load_model
from kvloft.config import parse_bytes, parse_tokens
from kvloft.runtime.scheduled import ScheduledAttention, use_scheduler
from kvloft.scheduler.budget import plan_memory, resolve_cache_bytes
from kvloft.scheduler.params import SchedulerParams
from kvloft.scheduler.streams import TransferEngine, chunk_tables

VARIANTS = ("none", "zero_copy", "staged")


def cache_counts(backend) -> tuple[int, int, int]:
    if not isinstance(backend, ScheduledAttention):
        return 0, 0, 0
    t = backend.rows.totals()
    return t.hits, t.misses, t.steps


def run_variant(s: Session, base, variant: str, n: int, args) -> list[dict]:
    rows = []
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    if variant == "none":
        s.backend = base
    else:
        params = SchedulerParams(fetch=variant, cache_bytes=args.cache_bytes_for(s, n))
        use_scheduler(s, params)
    for kind in ("random", "repeat"):
        timed_steps(s, token_stream(args.warmup, 0, kind))
        h0, m0, st0 = cache_counts(s.backend)
        ms = timed_steps(s, token_stream(args.steps, args.warmup, kind))
        h1, m1, st1 = cache_counts(s.backend)
        row = {"variant": variant, "tokens": kind, "ms_per_token": round(statistics.median(ms), 3),
               "ms_min": round(min(ms), 3)}
        if variant != "none":
            seen = (h1 - h0) + (m1 - m0)
            row["hit_rate"] = round((h1 - h0) / seen, 4) if seen else 0.0
            row["rows_fetched_per_layer_step"] = round((m1 - m0) / max(1, st1 - st0), 1)
            row["cache_tokens_per_layer"] = s.backend.rows.capacity
            row["cache_gib"] = round(s.backend.rows.nbytes / 2**30, 3)
        rows.append(row)
    peak = torch.cuda.max_memory_allocated()
    for r in rows:
        r["peak_gpu_gib"] = round(peak / 2**30, 2)
        r["under_budget"] = not args.gpu_budget or peak <= args.gpu_budget
    if args.profile:
        rows[-1]["breakdown_ms"] = profile_breakdown(s, args)
    if isinstance(s.backend, ScheduledAttention):
        s.backend.close()
    return rows


def profile_breakdown(s: Session, args) -> dict[str, float]:
    """A synchronized pass (RuntimeConfig.profile semantics): ms per token by region."""
    timers = s.backend.timers
    timers.sync = True
    timers.seconds.clear()
    timed_steps(s, token_stream(args.steps, 0, "repeat"))
    timers.sync = False
    return {k: round(1000 * v / args.steps, 3) for k, v in timers.seconds.items()}


def fetch_bandwidth(s: Session, n_rows: int, reps: int = 5) -> dict[str, float]:
    """GB/s of K+V rows moved host -> GPU by each transfer path alone (layer 0's host tier)."""
    tiers, cfg = s.backend.cache[0], s.model.config
    rng = np.random.default_rng(0)
    tokens = rng.choice(tiers.n_host, size=min(n_rows, tiers.n_host), replace=False).astype(np.int64)
    m = tokens.shape[0]
    moved = 2 * m * cfg.n_kv_heads * cfg.head_dim * tiers.host_k.dtype.itemsize
    out = {"rows": m, "row_bytes": moved // (2 * m)}
    for mode, stage in (("zero_copy", 2048), ("staged", 2048), ("staged", m)):
        eng = TransferEngine(mode, (cfg.n_kv_heads, cfg.head_dim), tiers.host_k.dtype, s.model.device,
                             max_rows=m, stage_rows=stage)
        secs = []
        for _ in range(reps + 1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            packed = np.concatenate([tokens, chunk_tables(tiers)])
            r = eng.open(packed.shape[0], m)
            idx = eng.send_indices(r, packed)
            eng.send_rows(r, tiers, tokens, idx[:m], idx[m:].view(2, -1))
            eng.wait_rows(r)
            eng.release(r)
            torch.cuda.synchronize()
            secs.append(time.perf_counter() - t0)
        name = mode if mode == "zero_copy" else f"staged_{'pipelined' if stage < m else 'one_buffer'}"
        out[f"{name}_gb_s"] = round(moved / statistics.median(secs[1:]) / 1e9, 1)
        del eng
    return out


def run_context(model, method: str, n: int, args) -> dict:
    rcfg = RetrievalConfig(method=method, budget=args.budget, n_sink=args.sink, n_window=args.window)
    runtime = RuntimeConfig(progress=False)
    out = {"method": method, "context": n, "budget": args.budget, "variants": []}
    try:
        s = Session(model, rcfg, runtime, CacheConfig(host_chunk_tokens=max(n, 1)))
        t0 = time.perf_counter()
        fill_context(s, n)
        out["fill_s"] = round(time.perf_counter() - t0, 2)
        base = s.backend
        budget_rt = RuntimeConfig(gpu_memory_budget=args.gpu_budget, scheduler="overlap")
        plan = plan_memory(model.config, rcfg, budget_rt, n + 200, model.dtype, check=False, cache_bytes=0)
        out["plan_without_cache_gib"] = round(plan.total / 2**30, 2)
        out["fetch_bandwidth"] = fetch_bandwidth(s, args.fetch_rows)
        for variant in args.variants:
            out["variants"] += run_variant(s, base, variant, n, args)
        del s, base
    except (torch.OutOfMemoryError, RuntimeError, ValueError) as e:
        out["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--contexts", default="32k,128k")
    ap.add_argument("--methods", default="exact,hip")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    add_decode_args(ap)
    ap.add_argument("--cache-gib", type=float, default=None, help="row cache size (default: what the budget leaves)")
    ap.add_argument("--fetch-rows", type=int, default=16384)
    ap.add_argument("--profile", action="store_true", help="add a synchronized breakdown pass per variant")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.gpu_budget = parse_bytes(args.gpu_budget)
    args.variants = args.variants.split(",")
    model = load_model(args.preset, device="cuda", dtype="bfloat16")

    def cache_bytes_for(s: Session, n: int) -> int:
        if args.cache_gib is not None:
            return int(args.cache_gib * 2**30)
        rt = RuntimeConfig(gpu_memory_budget=args.gpu_budget, scheduler="overlap")
        return resolve_cache_bytes(model.config, s.retrieval, rt, SchedulerParams(), model.dtype, "cuda",
                                   n_tokens=n + 200)

    args.cache_bytes_for = cache_bytes_for
    results = []
    for n in [parse_tokens(c) for c in args.contexts.split(",")]:
        for method in args.methods.split(","):
            r = run_context(model, method, n, args)
            print(json.dumps(r), flush=True)
            results.append(r)
    summary = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "preset": args.preset,
               "gpu_budget_gib": args.gpu_budget / 2**30, "weights_gib": round(model.weight_bytes / 2**30, 2),
               "rows": results}
    out = Path(args.out or os.environ.get("OUT", "bench/results")) / f"scheduler_speed_{args.preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    print_table(results)
    print(json.dumps({"file": str(out), "rows": sum(len(r["variants"]) for r in results)}))


def print_table(results: list[dict]) -> None:
    print(f"\n{'method':<8}{'context':>8}{'variant':>11}{'tokens':>8}{'ms/tok':>9}{'hit':>7}"
          f"{'rows/l':>9}{'peak GiB':>10}  fetch GB/s (zero_copy / staged)")
    for r in results:
        if "error" in r:
            print(f"{r['method']:<8}{r['context']:>8}  {r['error']}")
            continue
        bw = r["fetch_bandwidth"]
        bws = f"{bw.get('zero_copy_gb_s')} / {bw.get('staged_pipelined_gb_s')}"
        for v in r["variants"]:
            print(f"{r['method']:<8}{r['context']:>8}{v['variant']:>11}{v['tokens']:>8}{v['ms_per_token']:>9}"
                  f"{v.get('hit_rate', '-')!s:>7}{v.get('rows_fetched_per_layer_step', '-')!s:>9}"
                  f"{v['peak_gpu_gib']:>10}  {bws}")


if __name__ == "__main__":
    main()

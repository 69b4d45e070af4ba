"""Decode latency at long contexts: kvloft's tiered retrieval attention vs dense attention.

Random weights in real model shapes (DESIGN.md allows it for speed) and a synthetic
context: the tiers are filled with random keys/values of N tokens directly, then the
indexes are built, then `steps` decode tokens are timed through the whole model. Every
row reports median ms/token, the per-step breakdown (a second, synchronized pass), and
peak GPU memory against the budget (24 GiB emulates a consumer card).

    python bench/decode_speed.py --preset llama3-8b --contexts 128k --methods dense,exact,hip
Prints a table last and one JSON line; writes JSON to $OUT or bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from kvloft import CacheConfig, RetrievalConfig, RuntimeConfig, Session, load_model
from kvloft.config import parse_bytes, parse_tokens
from kvloft.runtime.attention import DenseAttention


def fill_context(session: Session, n: int, chunk: int = 8192) -> None:
    """Put n synthetic tokens into every layer's tiers (random keys/values ~ N(0, 1))."""
    b, cfg, m = session.backend, session.model.config, session.model
    shape = (cfg.n_kv_heads, cfg.head_dim)
    for layer in range(cfg.n_layers):
        for s in range(0, n, chunk):
            t = min(chunk, n - s)
            k = torch.randn(t, *shape, device=m.device, dtype=m.dtype)
            v = torch.randn(t, *shape, device=m.device, dtype=m.dtype)
            if isinstance(b, DenseAttention):
                b.layers[layer].append(k, v)
            else:
                b.cache[layer].append(k, v, torch.arange(s, s + t, device=m.device))
    if not isinstance(b, DenseAttention):
        b.build_indexes()
    session.tokens = [0] * n
    session._last_logits = torch.zeros(cfg.vocab_size)


def time_steps(session: Session, steps: int) -> list[float]:
    out = []
    for i in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        session.step(i % 1000 + 1)
        torch.cuda.synchronize()
        out.append(1000 * (time.perf_counter() - t0))
    return out


def run_one(model, method: str, n: int, args) -> dict:
    rcfg = RetrievalConfig(method=method, budget=args.budget, n_sink=args.sink, n_window=args.window)
    row = {"method": method, "context": n, "budget": args.budget if method != "dense" else n}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        s = Session(model, rcfg, RuntimeConfig(progress=False), CacheConfig(host_chunk_tokens=max(n, 1)))
        t0 = time.perf_counter()
        fill_context(s, n)
        row["fill_s"] = round(time.perf_counter() - t0, 2)
        time_steps(s, 3)  # warm-up: compilation, allocator
        ms = time_steps(s, args.steps)
        row["ms_per_token"] = round(statistics.median(ms), 3)
        row["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        row["under_budget"] = torch.cuda.max_memory_allocated() <= args.gpu_budget
        prof = Session(model, rcfg, RuntimeConfig(progress=False, profile=True), CacheConfig(host_chunk_tokens=max(n, 1)))
        del s
        torch.cuda.empty_cache()
        fill_context(prof, n)
        time_steps(prof, 2)
        prof.backend.timers.seconds.clear()
        time_steps(prof, args.steps)
        row["breakdown_ms"] = {k: round(1000 * v / args.steps, 3) for k, v in prof.backend.timers.seconds.items()}
        st = prof.stats()
        row["bytes"] = st["bytes"]
        row["kernels"] = st["kernels"]
        if "retriever" in st:
            row["retriever"] = st["retriever"]
        del prof
    except (torch.OutOfMemoryError, RuntimeError, ValueError) as e:
        row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--contexts", default="128k")
    ap.add_argument("--methods", default="dense,exact,tokenselect,hip")
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--sink", type=int, default=128)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--gpu-budget", default="24GiB")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.gpu_budget = parse_bytes(args.gpu_budget)
    model = load_model(args.preset, device="cuda", dtype="bfloat16")
    weights = model.weight_bytes / 2**30
    rows = []
    for n in [parse_tokens(c) for c in args.contexts.split(",")]:
        for method in args.methods.split(","):
            row = run_one(model, method, n, args)
            row["preset"], row["weights_gib"] = args.preset, round(weights, 2)
            print(json.dumps(row), flush=True)
            rows.append(row)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "preset": args.preset,
              "gpu_budget_gib": args.gpu_budget / 2**30, "rows": rows}
    out = Path(args.out or os.environ.get("OUT", "bench/results")) / f"decode_speed_{args.preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\n{'method':<12}{'context':>9}{'ms/tok':>9}{'peak GiB':>10}{'<=budget':>9}  breakdown")
    for r in rows:
        bd = " ".join(f"{k}={v}" for k, v in r.get("breakdown_ms", {}).items())
        print(f"{r['method']:<12}{r['context']:>9}{r.get('ms_per_token', '-')!s:>9}{r.get('peak_gpu_gib', '-')!s:>10}"
              f"{r.get('under_budget', '-')!s:>9}  {r.get('error', bd)}")


if __name__ == "__main__":
    main()

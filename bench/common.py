"""What the decode benchmarks share: a synthetic context, timed decode steps, common flags, and
a CUDA-event timer for single kernels."""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from kvloft import Session
from kvloft.runtime.attention import DenseAttention


def fill_context(session: Session, n: int, chunk: int = 8192) -> None:
    """Put n synthetic tokens into every layer's tiers (random keys/values ~ N(0, 1)), then
    build the indexes, so decode can start at context n without a prefill. Long fills
    report each layer's progress on stderr."""
    b, cfg, m = session.backend, session.model.config, session.model
    shape = (cfg.n_kv_heads, cfg.head_dim)
    t0 = time.perf_counter()
    for layer in range(cfg.n_layers):
        if layer and time.perf_counter() - t0 > 10:
            print(f"  fill: layer {layer}/{cfg.n_layers}, {time.perf_counter() - t0:.0f} s", file=sys.stderr,
                  flush=True)
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


def token_stream(n: int, start: int = 0, kind: str = "random") -> list[int]:
    """Decode inputs: "random" (i % 1000 + 1: consecutive queries unrelated, the worst case
    for caches) or "repeat" (one token again and again: similar consecutive queries)."""
    return [(start + i) % 1000 + 1 for i in range(n)] if kind == "random" else [7] * n


def timed_steps(session: Session, tokens: list[int]) -> list[float]:
    """ms of each decode step (the device synchronized around each step only)."""
    cuda = session.model.device.type == "cuda"
    out = []
    for t in tokens:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        session.step(t)
        if cuda:
            torch.cuda.synchronize()
        out.append(1000 * (time.perf_counter() - t0))
    return out


def add_decode_args(ap: argparse.ArgumentParser, steps: int = 12) -> None:
    """The retrieval and timing flags every decode benchmark takes."""
    ap.add_argument("--budget", type=int, default=2048, help="host tokens retrieved per step")
    ap.add_argument("--sink", type=int, default=128)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--steps", type=int, default=steps, help="timed decode steps (median reported)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--gpu-budget", default="24GiB")


def cuda_ms(fn, *fn_args, repeats: int = 20, **fn_kw) -> float:
    """Median CUDA-event ms of fn(*fn_args, **fn_kw) over `repeats` calls after one warm-up call."""
    fn(*fn_args, **fn_kw)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*fn_args, **fn_kw)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)

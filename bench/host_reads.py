"""Host reads per decode step, per method and decode path (kvloft/runtime/host_reads.py).

On CUDA each read of a device value (item, tolist, bool/int of a tensor, cpu(), nonzero,
unique, a boolean mask) waits for the device, so a step making a few per layer cannot queue
work ahead. This counts them on the CPU, where the same code runs: the `tiny` preset, a
~600-token random context, a small budget so that the host tier is used, then N decode steps
counted call site by call site, on the preset at two depths (2 and 4 layers): the difference is
the reads each layer adds (per layer-step), the rest is per step (sampling, the engine's plan).

    python bench/host_reads.py --out bench/results/host_reads_cpu.json

Paths:
  session         Session.generate, torch reference kernels (the CPU decode route)
  session-triton  the same after prefill with the Triton kernels (interpreter) and the host tier
                  flagged pinned, evict_batch=64: the route a CUDA session decodes on (one launch
                  over a slot table, runtime/rowspace.py)
  engine          kvloft.Engine.generate over 2 sessions (reference kernels), per batched step
  engine-triton   the same over 2 sessions set up as session-triton's (shared launches, HiP's
                  batched search)
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels on the CPU

import argparse
import dataclasses
import json
import sys
import time
from typing import Any

import torch

import kvloft
from kvloft import CacheConfig, RuntimeConfig, Session
from kvloft.config import PRESETS
from kvloft.eval.methods import retrieval_config
from kvloft.kernels import kernel_set
from kvloft.runtime.host_reads import decode_reads
from kvloft.runtime.loader import random_model

METHODS = ("dense", "exact", "hip", "hip:keys_on=host", "tokenselect", "recycled", "actqkv")
PATHS = ("session", "session-triton", "engine", "engine-triton")
# HiP's stage sizes scaled to a 600-token context (the defaults keep 32768 tokens at stage 1, so no
# stage would run); refresh_steps stay the defaults, so N = 16 steps sees one whole refresh cycle
SMALL = {"hip": {"chunk_sizes": (32, 8, 4), "kept_tokens": (256, 96, 32)}}


def make_config(spec: str, budget: int, n_sink: int, n_window: int, triton: bool) -> kvloft.RetrievalConfig:
    """A method spec ("name:key=value") as kvloft eval parses it, small-context defaults under it
    (and on a Triton path HiP's stage kernels, as kernel="auto" picks on CUDA)."""
    rcfg = retrieval_config(spec, budget, n_sink, n_window)
    small = dict(SMALL.get(rcfg.method, {}))
    if triton and rcfg.method == "hip":
        small["kernel"] = "triton"
    return rcfg.replace(options={**small, **rcfg.options})


def tiny_model(n_layers: int) -> kvloft.Model:
    """The `tiny` preset with n_layers layers (random weights, fp32 on the CPU)."""
    cfg = dataclasses.replace(PRESETS["tiny"], n_layers=n_layers)
    return random_model(cfg, device=torch.device("cpu"), dtype=torch.float32, seed=0)


def fed_session(model: kvloft.Model, rcfg: kvloft.RetrievalConfig, prompt: list[int],
                triton: bool) -> Session:
    """A session holding `prompt`; evict_batch=64 as on CUDA (CacheConfig.resolved_evict_batch):
    the window's next copy down comes after the counted steps."""
    s = Session(model, rcfg, RuntimeConfig(progress=False, kernels="reference", prefill_chunk=256),
                CacheConfig(evict_batch=64))
    s.feed(prompt)
    if triton and rcfg.method != "dense":  # decode as a CUDA session's: kernels read the chunks in place
        s.backend.ops = kernel_set("triton", "cpu")
        for t in s.backend.cache.layers:
            t._host_k.pin = t._host_v.pin = True
    return s


def count(model: kvloft.Model, rcfg: kvloft.RetrievalConfig, path: str, prompt: list[int], steps: int):
    """Host reads of `steps` decode steps of one method on one path (HostReads)."""
    n_sessions = 2 if path.startswith("engine") else 1
    triton = path.endswith("-triton")
    sessions = [fed_session(model, rcfg, prompt[i:] + prompt[:i], triton) for i in range(n_sessions)]
    return decode_reads(sessions, steps)


def measure(models: dict[int, kvloft.Model], spec: str, path: str, prompt: list[int],
            args: argparse.Namespace) -> dict[str, Any]:
    """Reads per step at each model depth; per layer-step is the slope between the two depths
    (reads that grow with the layers), per step the rest (sampling, the engine's plan)."""
    rcfg = make_config(spec, args.budget, args.n_sink, args.n_window, path.endswith("-triton"))
    t0 = time.perf_counter()
    got = {n: count(m, rcfg, path, prompt, args.steps) for n, m in models.items()}
    (l0, r0), (l1, r1) = sorted(got.items())[:2]
    per_layer = (r1.total - r0.total) / (l1 - l0) / args.steps
    fixed = r0.total / args.steps - l0 * per_layer
    n_sessions = 2 if path.startswith("engine") else 1
    return {"method": spec, "path": path, "steps": args.steps, "sessions": n_sessions,
            "reads_per_step": {str(n): round(r.total / args.steps, 2) for n, r in got.items()},
            "reads_per_layer_step": round(per_layer, 3), "reads_per_step_fixed": round(fixed, 2),
            "reads_per_step_24_layers": round(fixed + 24 * per_layer, 1),
            "seconds": round(time.perf_counter() - t0, 1), "sites": dict(r0.sites.most_common())}


def table(rows: list[dict[str, Any]], top: int, n_layers: int) -> str:
    head = f"{'method':17} {'path':14} {'/step':>6} {'/layer-step':>11} {'fixed':>6} {'@24 layers':>10}  "
    lines = [head + f"top call sites ({n_layers} layers, per step)"]
    for r in rows:
        top_sites = list(r["sites"].items())[:top]
        sites = ", ".join(f"{s.removeprefix('kvloft/')} x{n / r['steps']:g}" for s, n in top_sites)
        lines.append(f"{r['method']:17} {r['path']:14} {r['reads_per_step'][str(n_layers)]:6.2f} "
                     f"{r['reads_per_layer_step']:11.2f} {r['reads_per_step_fixed']:6.2f} "
                     f"{r['reads_per_step_24_layers']:10.1f}  {sites}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    p.add_argument("--context", type=int, default=600)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--budget", type=int, default=32)
    p.add_argument("--n-sink", type=int, default=4)
    p.add_argument("--n-window", type=int, default=32)
    p.add_argument("--layers", type=int, nargs=2, default=[2, 4],
                   help="model depths (the slope between them is per layer)")
    p.add_argument("--top", type=int, default=4, help="call sites shown per row")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    models = {n: tiny_model(n) for n in args.layers}
    prompt = torch.randint(0, PRESETS["tiny"].vocab_size, (args.context,)).tolist()
    rows = []
    for spec in args.methods:
        for path in args.paths:
            rows.append(measure(models, spec, path, prompt, args))
            print(f"  {spec} {path}: {rows[-1]['reads_per_step']} reads/step ({rows[-1]['seconds']} s)",
                  file=sys.stderr, flush=True)
    print(table(rows, args.top, args.layers[0]))
    result = {"model": "tiny", "layers": args.layers, "context": args.context, "budget": args.budget,
              "n_sink": args.n_sink, "n_window": args.n_window, "steps": args.steps, "evict_batch": 64,
              "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps({r["method"] + " " + r["path"]: r["reads_per_layer_step"] for r in rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

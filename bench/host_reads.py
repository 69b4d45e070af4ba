"""Host reads per decode step, per method and decode path (kvloft/runtime/host_reads.py).

On CUDA each read of a device value (item, tolist, bool/int of a tensor, cpu(), nonzero,
unique, a boolean mask) waits for the device, so a step making a few per layer cannot queue
work ahead. This counts them on the CPU, where the same code runs: the `tiny` preset, a
~600-token random context, a small budget so that the host tier is used, then N decode steps
counted call site by call site.

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
import json
import sys
import time
from typing import Any

import torch

import kvloft
from kvloft import CacheConfig, RuntimeConfig, Session
from kvloft.eval.methods import retrieval_config
from kvloft.kernels import kernel_set
from kvloft.runtime.host_reads import count_host_reads

METHODS = ("dense", "exact", "hip", "hip:keys_on=host", "tokenselect", "recycled", "actqkv")
PATHS = ("session", "session-triton", "engine", "engine-triton")
# HiP's stage sizes scaled to a 600-token context (the defaults keep 32768 tokens at stage 1, so no
# stage would run); refresh_steps stay the defaults, so N = 16 steps sees one whole refresh cycle
SMALL = {"hip": {"chunk_sizes": (32, 8, 4), "kept_tokens": (256, 96, 32)}}


def make_config(spec: str, budget: int, n_sink: int, n_window: int, triton: bool) -> kvloft.RetrievalConfig:
    """A method spec ("name:key=value") as kvloft eval parses it, small-context defaults under it
    (and on a Triton path HiP's stage kernels, as kernel="auto" picks on CUDA)."""
    rcfg = retrieval_config(spec, budget, n_sink, n_window)
    small = {**SMALL.get(rcfg.method, {}), **({"kernel": "triton"} if triton and rcfg.method == "hip" else {})}
    return rcfg.replace(options={**small, **rcfg.options})


def fed_session(model: kvloft.Model, rcfg: kvloft.RetrievalConfig, prompt: list[int], triton: bool) -> Session:
    evict = 64 if triton else None  # CUDA's default (CacheConfig.resolved_evict_batch), else the CPU's
    s = Session(model, rcfg, RuntimeConfig(progress=False, kernels="reference", prefill_chunk=256),
                CacheConfig(evict_batch=evict))
    s.feed(prompt)
    if triton and rcfg.method != "dense":  # decode as a CUDA session's: kernels read the chunks in place
        s.backend.ops = kernel_set("triton", "cpu")
        for t in s.backend.cache.layers:
            t._host_k.pin = t._host_v.pin = True
    return s


def measure(model: kvloft.Model, spec: str, path: str, prompt: list[int], steps: int,
            args: argparse.Namespace) -> dict[str, Any]:
    """Reads counted over `steps` decode steps of one method on one path."""
    triton = path.endswith("-triton")
    rcfg = make_config(spec, args.budget, args.n_sink, args.n_window, triton)
    n_sessions = 2 if path.startswith("engine") else 1
    sessions = [fed_session(model, rcfg, prompt[i:] + prompt[:i], triton) for i in range(n_sessions)]
    for s in sessions:  # one step first: lazily made state (row spaces, caches) is not per step
        s.generate(max_new_tokens=1)
    t0 = time.perf_counter()
    with count_host_reads() as reads:
        if n_sessions > 1:
            kvloft.Engine(model, max_batch=4).generate(sessions, max_new_tokens=steps)
        else:
            sessions[0].generate(max_new_tokens=steps)
    seconds = time.perf_counter() - t0
    per_step = reads.total / steps
    return {"method": spec, "path": path, "steps": steps, "sessions": n_sessions, "reads": reads.total,
            "reads_per_step": round(per_step, 2), "reads_per_layer_step": round(per_step / model.config.n_layers, 2),
            "seconds": round(seconds, 2), "sites": dict(reads.sites.most_common())}


def table(rows: list[dict[str, Any]], top: int) -> str:
    lines = [f"{'method':18} {'path':15} {'/step':>7} {'/layer-step':>11}  top call sites"]
    for r in rows:
        sites = ", ".join(f"{s} x{n / r['steps']:g}" for s, n in list(r["sites"].items())[:top])
        lines.append(f"{r['method']:18} {r['path']:15} {r['reads_per_step']:7.2f} {r['reads_per_layer_step']:11.2f}  "
                     f"{sites}")
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
    p.add_argument("--top", type=int, default=4, help="call sites shown per row")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = kvloft.load_model("tiny", device="cpu", seed=0)
    prompt = torch.randint(0, model.config.vocab_size, (args.context,)).tolist()
    rows = []
    for spec in args.methods:
        for path in args.paths:
            rows.append(measure(model, spec, path, prompt, args.steps, args))
            print(f"  {spec} {path}: {rows[-1]['reads_per_step']} reads/step ({rows[-1]['seconds']} s)",
                  file=sys.stderr, flush=True)
    print(table(rows, args.top))
    result = {"model": "tiny", "n_layers": model.config.n_layers, "context": args.context, "budget": args.budget,
              "n_sink": args.n_sink, "n_window": args.n_window, "steps": args.steps, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps({r["method"] + " " + r["path"]: r["reads_per_step"] for r in rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

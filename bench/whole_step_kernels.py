"""Kernels a layer of the whole decode step launches for HiP rows (runtime/whole_step.py), by refresh
pattern: every stage (the graph of every stage, as before patterns) against none (a layer no row
refreshes this step: whole_hip.py HipTables.select skips its stages).

Counted eagerly, op by op: torch ops that launch work (views and allocations left out; on CUDA
each is one kernel, a sort a few) and Triton launches (the ops inside a Triton launch are the
interpreter's, not counted). On the CPU the Triton kernels run through the interpreter:

    TRITON_INTERPRET=1 python bench/whole_step_kernels.py

Prints a table and one JSON line last.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kvloft import CacheConfig, Engine, RetrievalConfig, RuntimeConfig, Session, load_model

CUDA = torch.cuda.is_available()  # a script, not the library: checking at start is fine
DEVICE = "cuda" if CUDA else "cpu"
# InfiniteHiP's three stages, scaled to the tiny model's few hundred host rows
OPTIONS = {"chunk_rows": 64, "kernel": "triton", "chunk_sizes": (16, 8, 4), "kept_tokens": (64, 48, 24),
           "refresh_steps": (4, 2, 1), "keys_on": "device"}
_SKIP = {"empty.memory_format", "new_empty.default", "detach.default", "lift_fresh.default"}


class _Count(TorchDispatchMode):
    """Torch ops that launch work, by name; Triton launches by kernel (patched in main)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops, self.triton, self.inside = Counter(), Counter(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.inside and not func.is_view and func.__name__ not in _SKIP:
            self.ops[func.__name__] += 1
        return func(*args, **(kwargs or {}))


def _patch_triton(counter: _Count) -> None:
    """Count each Triton launch (and leave the interpreter's own torch ops out of the ops)."""
    import triton.runtime.interpreter as ti
    from triton.runtime.jit import JITFunction

    cls = ti.InterpretedFunction if os.environ.get("TRITON_INTERPRET") == "1" else JITFunction
    real = cls.run

    def run(self, *args, **kwargs):
        counter.triton[getattr(self, "fn", self).__name__] += 1
        counter.inside += 1
        try:
            return real(self, *args, **kwargs)
        finally:
            counter.inside -= 1

    cls.run = run


def main() -> None:
    model = load_model("tiny", device=DEVICE, dtype="float32", seed=5)
    rcfg = RetrievalConfig(method="hip", budget=24, n_sink=4, n_window=32, options=OPTIONS)
    s = Session(model, rcfg, RuntimeConfig(prefill_chunk=256, progress=False), CacheConfig(host_chunk_tokens=64))
    s.feed(list(range(8, 158)))
    eng = Engine(model, graphs="whole")
    eng.step([(s, 5)])  # makes the whole step (eager on the CPU) and fills its table
    (whole,) = eng._wholes.values()
    count = _Count()
    _patch_triton(count)
    n_layers, out = len(model.net.layers), {}
    with torch.inference_mode():
        for name, pattern in (("every stage", None), ("no stage", (0,) * n_layers)):
            count.ops.clear()
            count.triton.clear()
            with count:
                whole._forward(pattern)
            ops, tri = sum(count.ops.values()), sum(count.triton.values())
            out[name] = {"torch_ops": ops, "triton": tri, "per_layer": round((ops + tri) / n_layers, 1),
                         "sorts": count.ops["sort.stable"] + count.ops["sort.default"],
                         "hip_search": count.triton["hip_search_kernel"]}
    every, none = out["every stage"], out["no stage"]
    print("| pattern | torch ops | Triton launches | per layer | sorts | hip_search |\n|---|---:|---:|---:|---:|---:|")
    for name, r in out.items():
        print(f"| {name} | {r['torch_ops']} | {r['triton']} | {r['per_layer']} | {r['sorts']} | {r['hip_search']} |")
    out["saved_per_layer"] = round(every["per_layer"] - none["per_layer"], 1)
    out["stages"], out["device"] = len(OPTIONS["chunk_sizes"]), DEVICE
    print(json.dumps(out))


if __name__ == "__main__":
    main()

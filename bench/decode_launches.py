"""Device work per decode layer-step of a CUDA session, per method, counted on the CPU.

A decode step of kvloft.Session on CUDA replays each layer's dense parts (norms, GEMMs, RoPE,
MLP: Block.pre/post) as CUDA graph segments (runtime/graphs.py) and runs each layer's
backend.attend eagerly from Python, so every op attend calls is one more launch (and its host
work) per layer and step. This counts them without a GPU: the ops a session calls as it decodes
--steps tokens on the CUDA route, each charged to the innermost kvloft frame that called it.

    ATen ops     as called from Python (a TorchDispatchMode, as bench/prefill_ops.py): an op's
                 own inner ops are not seen (on CUDA one aten call is one launch or none)
    Triton       one op "triton:<kernel>" per kernel launch (the interpreter's run wrapped;
                 the interpreter's own torch calls left out)
    views        view, slice, transpose, as_strided, t, unsqueeze, expand, ... and allocations
                 (empty, ...): listed apart, they launch nothing

The CUDA route, as bench/host_reads.py's "session-triton" path builds it: a Qwen2.5-0.5B-shaped
model (bf16 random weights, --layers of the preset's 24) with the GPU layer route declared
(Transformer.declare_kernels(fused_gpu=True): its Triton kernels through the interpreter), a
--context-token random prompt fed with the reference kernels, then the Triton kernel set and the
host tier flagged pinned (the kernels read its rows in place, as on CUDA), evict_batch=64.
One step runs uncounted first (state made on first use); then --steps greedy steps are counted.

Per layer-step: ops with Block.forward on the stack / (layers x steps), split into "attend"
(backend.attend on the stack: eager on CUDA) and "pre/post" (the layer's dense parts: inside the
graph segments on CUDA, eager without graphs). Per step: ops outside the layers (embedding, the
head, sampling, the backend's per-step work) / steps.

    python bench/decode_launches.py --out bench/results/decode_launches_cpu.json
    python bench/decode_launches.py --methods dense exact --layers 2 --steps 4

No GPU time is claimed: the count is of calls, the same code a CUDA session runs.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels on the CPU

import argparse
import dataclasses
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from triton.runtime.interpreter import InterpretedFunction

import kvloft
from kvloft import CacheConfig, RuntimeConfig, Session
from kvloft.config import PRESETS
from kvloft.kernels import kernel_set
from kvloft.runtime import model as model_mod
from kvloft.runtime.attention import TieredAttention
from kvloft.runtime.loader import random_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_reads import METHODS, make_config  # the methods and specs host_reads counts
from prefill_ops import META, VIEWS  # ops that launch nothing

_KVLOFT = str(Path(kvloft.__file__).resolve().parent)
_BLOCK_FORWARD = model_mod.Block.forward.__code__
# no launch where the call returns its input or a view of its memory
RETURNS_SELF = {"to", "contiguous", "reshape", "flatten", "type_as", "view_as", "reshape_as", "resolve_conj",
                "resolve_neg"}
NO_LAUNCH = VIEWS | META | {"view_as", "squeeze_", "unsqueeze_", "promote_types", "is_same_size", "sym_size",
                            "sym_stride"} | {f"{n}(view)" for n in RETURNS_SELF}


def _same_memory(out: Any, args: tuple) -> bool:
    """out is args[0] or a view of its memory (the same storage, nothing written)."""
    a = args[0] if args else None
    if not isinstance(out, torch.Tensor) or not isinstance(a, torch.Tensor):
        return False
    return out is a or (out.untyped_storage().data_ptr() == a.untyped_storage().data_ptr() and out.numel() > 0)


def _where(depth: int = 2) -> tuple[str, str]:
    """(the innermost kvloft frame 'index/hip.py:120 fn', the part of a step: 'attend',
    'pre/post' (in a layer, outside attend) or 'step' (outside the layers))."""
    f, site, part = sys._getframe(depth), "?", "step"
    attend = False
    while f is not None:
        code = f.f_code
        if site == "?" and code.co_filename.startswith(_KVLOFT):
            site = f"{code.co_filename[len(_KVLOFT) + 1:]}:{f.f_lineno} {code.co_name}"
        attend = attend or code.co_name == "attend" and code.co_filename.startswith(_KVLOFT)  # backend.attend
        if code is _BLOCK_FORWARD:
            part = "attend" if attend else "pre/post"
        f = f.f_back
    return site, part


class LaunchLog(TorchDispatchMode):
    """(op, site, part) -> calls: ATen ops as called from Python and Triton launches."""

    def __init__(self) -> None:
        super().__init__()
        self.count: Counter = Counter()
        self.calls: Counter = Counter()  # kvloft Python calls per part
        self.triton_depth = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if name in RETURNS_SELF and _same_memory(out, args):
            name += "(view)"  # a cast or layout call that returned its input or a view of it: no launch
        self.count[(name, *_where())] += 1
        return out

    def launch(self, name: str) -> None:
        self.count[(f"triton:{name}", *_where(3))] += 1

    def python_call(self, frame, event: str, arg) -> None:
        """sys.setprofile's hook: kvloft Python functions called, per part (the host work
        around the launches), in calls["attend"|"pre/post"|"step"]."""
        if event == "call" and frame.f_code.co_filename.startswith(_KVLOFT):
            self.calls[_where(2)[1]] += 1


def _counted_run(log: LaunchLog):
    """InterpretedFunction.run recording one launch per outermost call, run with the mode off
    (the interpreter's copies of the arguments are its own, not the kernel's launches)."""
    real = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if warmup or log.triton_depth:
            return real(self, *args, grid=grid, warmup=warmup, **kwargs)
        log.launch(self.fn.__name__)
        log.triton_depth += 1
        hook = sys.getprofile()
        sys.setprofile(None)  # the interpreter's calls are the CPU's stand-in for the kernel: not counted
        try:
            with _disable_current_modes():
                return real(self, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            sys.setprofile(hook)
            log.triton_depth -= 1

    return real, run


def build(layers: int, preset: str = "qwen2.5-0.5b-shape") -> kvloft.Model:
    """The preset with `layers` layers, bf16 random weights, the GPU layer route declared."""
    cfg = dataclasses.replace(PRESETS[preset], n_layers=layers)
    model = random_model(cfg, device=torch.device("cpu"), dtype=torch.bfloat16, seed=0)
    model.net.declare_kernels(fused_gpu=True)
    return model


def cuda_session(model: kvloft.Model, spec: str, prompt: list[int], args: argparse.Namespace) -> Session:
    """A fed session set up as bench/host_reads.py's session-triton path (fed_session), the
    Triton set for dense too (its decode attention on CUDA)."""
    rcfg = make_config(spec, args.budget, args.n_sink, args.n_window, triton=True)
    s = Session(model, rcfg, RuntimeConfig(progress=False, kernels="reference", prefill_chunk=256),
                CacheConfig(evict_batch=64))
    s.feed(prompt)
    s.ops = s.backend.ops = kernel_set("triton", "cpu")
    if isinstance(s.backend, TieredAttention):
        for t in s.backend.cache.layers:
            t._host_k.pin = t._host_v.pin = True
    return s


def count(model: kvloft.Model, spec: str, prompt: list[int], args: argparse.Namespace) -> LaunchLog:
    s = cuda_session(model, spec, prompt, args)
    s.generate(max_new_tokens=1)
    log = LaunchLog()
    real, run = _counted_run(log)
    InterpretedFunction.run = run
    try:
        with log:
            sys.setprofile(log.python_call)
            try:
                s.generate(max_new_tokens=args.steps)
            finally:
                sys.setprofile(None)
    finally:
        InterpretedFunction.run = real
    return log


def summarize(log: LaunchLog, spec: str, layers: int, steps: int, top: int) -> dict[str, Any]:
    per_ls, per_s = layers * steps, steps
    parts: dict[str, Counter] = {p: Counter() for p in ("attend", "pre/post", "step")}
    views: dict[str, Counter] = {p: Counter() for p in parts}
    sites: Counter = Counter()
    for (op, site, part), n in log.count.items():
        (views if op in NO_LAUNCH else parts)[part][op] += n
        if op not in NO_LAUNCH and part != "step":
            sites[f"{site} [{op}]"] += n

    def rate(c: Counter, per: int) -> dict[str, float]:
        return {k: round(n / per, 2) for k, n in c.most_common()}

    def total(c: Counter, per: int) -> float:
        return round(sum(c.values()) / per, 2)

    triton = {p: sum(n for k, n in c.items() if k.startswith("triton:")) for p, c in parts.items()}
    return {
        "method": spec, "layers": layers, "steps": steps,
        "attend_per_layer_step": total(parts["attend"], per_ls),
        "prepost_per_layer_step": total(parts["pre/post"], per_ls),
        "layer_step": total(parts["attend"] + parts["pre/post"], per_ls),
        "triton_attend_per_layer_step": round(triton["attend"] / per_ls, 2),
        "triton_prepost_per_layer_step": round(triton["pre/post"] / per_ls, 2),
        "views_per_layer_step": total(views["attend"] + views["pre/post"], per_ls),
        "per_step_outside_layers": total(parts["step"], per_s),
        "views_per_step_outside_layers": total(views["step"], per_s),
        "py_calls_attend_per_layer_step": round(log.calls["attend"] / per_ls, 1),
        "py_calls_prepost_per_layer_step": round(log.calls["pre/post"] / per_ls, 1),
        "py_calls_per_step_outside_layers": round(log.calls["step"] / per_s, 1),
        "attend_ops": rate(parts["attend"], per_ls), "prepost_ops": rate(parts["pre/post"], per_ls),
        "step_ops": rate(parts["step"], per_s),
        "views": {p: rate(c, per_ls if p != "step" else per_s) for p, c in views.items()},
        "top_sites_per_layer_step": {k: round(n / per_ls, 2) for k, n in sites.most_common(top)},
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'method':17} {'layer-step':>10} {'attend':>7} {'(triton)':>8} {'pre/post':>8} {'(triton)':>8} "
            f"{'views':>6} {'/step out':>9} {'py attend':>9}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['method']:17} {r['layer_step']:10.2f} {r['attend_per_layer_step']:7.2f} "
                     f"{r['triton_attend_per_layer_step']:8.2f} {r['prepost_per_layer_step']:8.2f} "
                     f"{r['triton_prepost_per_layer_step']:8.2f} {r['views_per_layer_step']:6.2f} "
                     f"{r['per_step_outside_layers']:9.2f} {r['py_calls_attend_per_layer_step']:9.1f}")
    return "\n".join(lines)


def sites_text(rows: list[dict[str, Any]], n: int) -> str:
    out = []
    for r in rows:
        out.append(f"{r['method']}: top call sites per layer-step (ops that launch)")
        out += [f"  {v:6.2f}  {k}" for k, v in list(r["top_sites_per_layer_step"].items())[:n]]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--preset", default="qwen2.5-0.5b-shape", choices=sorted(PRESETS))
    p.add_argument("--layers", type=int, default=2, help="of the preset's (counts are per layer-step)")
    p.add_argument("--context", type=int, default=700)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--budget", type=int, default=64)
    p.add_argument("--n-sink", type=int, default=8)
    p.add_argument("--n-window", type=int, default=32)
    p.add_argument("--top", type=int, default=12, help="call sites kept per method")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = build(args.layers, args.preset)
    prompt = torch.randint(1, model.config.vocab_size, (args.context,)).tolist()
    rows = []
    for spec in args.methods:
        t0 = time.perf_counter()
        rows.append(summarize(count(model, spec, prompt, args), spec, args.layers, args.steps, args.top))
        print(f"  {spec}: {rows[-1]['layer_step']} ops/layer-step ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)
    print(table(rows))
    print(sites_text(rows, 6))
    result = {"bench": "bench/decode_launches.py", "preset": args.preset, "layers": args.layers,
              "context": args.context, "steps": args.steps, "budget": args.budget, "n_sink": args.n_sink,
              "n_window": args.n_window, "evict_batch": 64, "dtype": "bfloat16", "torch": torch.__version__,
              "rows": rows}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({r["method"]: r["layer_step"] for r in rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

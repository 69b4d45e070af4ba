"""ATen ops of a dense prefill per layer-chunk, with their shapes and kvloft call sites (CPU).

Counts what a prefill launches besides its GEMMs and attention: casts, copies, elementwise
passes. Each such op is one more pass over a [T, ...] activation on the GPU, so their number
per layer-chunk is what this bench reports; it needs no GPU (time on the CPU says nothing).

Random bf16 weights in a preset's shape; a Session(method="dense") feeds --tokens random ids
in chunks of --chunk. Route "gpu" (default) takes the ops a CUDA session takes: q/k/v and
gate/up as one GEMM each (Transformer.declare_kernels(fused_gpu=True)), the chunk's attention
through public SDPA (flash.sdpa_causal; a materialized mask on the CPU) and CUDA's rotate
(model.PROMOTE_IN_KERNEL). Route "cpu" keeps the CPU's own (separate projections, the
reference attention). Only ops inside a layer (Block.forward) are counted, per layer-chunk
(n_layers x chunks); embedding, cos/sin and the head run once a chunk.

Two feeds, two counts:
  dispatch  every op as called from Python (a TorchDispatchMode): name, shapes, dtypes and the
            innermost kvloft frame that called it; an op's own inner ops are not seen.
  profiler  torch.profiler's CPU ops, inner ops included (an aten::to counts its _to_copy,
            empty_strided and copy_), as a CUDA profile of the same run lists them, less the
            operand casts the CPU's elementwise ops make inside ("cpu casts": a bf16 operand of
            an fp32 op copied to fp32 first, a Python scalar's 0-dim tensor cast; CUDA's kernels
            cast as they read and take scalars as arguments: no op there).

    python bench/prefill_ops.py --layers 2 --tokens 512 --chunk 256 --label after --out bench/results/prefill_ops_cpu.json
    python bench/prefill_ops.py --route cpu --tokens 2048 --chunk 1024      # all 24 layers, ~10 minutes

Route "gpu" runs the layer route's Triton kernels (a chunk's norms and activation) through the
interpreter: ~15 s per norm of 1024 rows here, so keep it to few layers and short chunks (the
counts per layer-chunk do not depend on either, but for the finite check's scalar add, which
the first layer of a chunk does not make: 2 - 1/n_layers).

Prints the per layer-chunk table, then one JSON line; --out keeps runs by --label in one file
(a "before" run: PYTHONPATH at a checkout of the earlier commit, this script from here).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path

# route "gpu" declares the GPU layer route, whose Triton kernels refuse CPU tensors unless
# interpreted; prefill runs none of them (only its fused weights), so this changes no count
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
from torch.nn.attention import bias as attention_bias
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import kvloft
from kvloft import RetrievalConfig, RuntimeConfig, Session
from kvloft.config import PRESETS
from kvloft.kernels import flash, gpu_layer
from kvloft.runtime import model as model_mod
from kvloft.runtime.loader import random_model

_KVLOFT = str(Path(kvloft.__file__).resolve().parent)  # the kvloft imported (PYTHONPATH's)
_BLOCK_FORWARD = model_mod.Block.forward.__code__
LAYER = "kvloft::layer"  # the profiler's name for a layer's ops (record_function around Block.forward)
# elementwise ops whose nested _to_copy is an operand cast of the CPU's TensorIterator (CUDA's
# kernels cast operands as they read them: no copy there)
ELEMENTWISE = {"mul", "mul_", "add", "add_", "sub", "sub_", "div", "div_", "addcmul", "addcmul_", "where", "rsqrt",
               "pow", "silu", "silu_"}
CAST_OPS = {"to", "_to_copy", "copy_", "empty_strided"}  # an operand cast and what it is made of

# ops that are views or metadata only: no pass over memory (listed apart)
VIEWS = {"view", "_unsafe_view", "slice", "select", "transpose", "t", "unsqueeze", "squeeze", "expand", "narrow",
         "as_strided", "alias", "detach", "split", "chunk", "permute", "unbind", "lift_fresh", "_reshape_alias"}
# ops that allocate or read metadata only
META = {"empty", "empty_strided", "new_empty", "empty_like", "set_", "result_type", "_local_scalar_dense", "item",
        "is_nonzero", "size", "stride", "resize_"}


def _site() -> tuple[str, bool]:
    """The innermost kvloft frame of the current Python stack ('runtime/model.py:93 rotate'), and
    whether a layer (Block.forward) is on the stack."""
    f, site, layer = sys._getframe(2), "?", False
    while f is not None:
        path = f.f_code.co_filename
        if site == "?" and path.startswith(_KVLOFT):
            site = f"{path[len(_KVLOFT) + 1:]}:{f.f_lineno} {f.f_code.co_name}"
        layer = layer or f.f_code is _BLOCK_FORWARD
        f = f.f_back
    return site, layer


def _desc(a) -> str:
    if isinstance(a, torch.Tensor):
        dt = str(a.dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float32", "f32")
        return f"{dt}{list(a.shape)}"
    return ""


class OpLog(TorchDispatchMode):
    """Every ATen op called under it: (op name, call site) -> count, and the shapes first seen."""

    def __init__(self) -> None:
        super().__init__()
        self.count: Counter = Counter()
        self.shapes: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.record(func.__name__.split(".")[0], *_site(), args)
        return func(*args, **(kwargs or {}))

    def record(self, name: str, site: str, layer: bool, args) -> None:
        key = (name, site, layer)
        self.count[key] += 1
        if key not in self.shapes:
            self.shapes[key] = " ".join(s for s in map(_desc, args) if s)


_LOGGING: list[OpLog] = []  # the op log while its feed runs (Triton launches record themselves in it)
TRITON = "triton::"  # the profiler's name prefix for one Triton launch


def _one_launch(name: str, launcher):
    """A Triton launcher (kernels/*.py *_unchecked) counted as one op "triton:<name>": under the
    op log, recorded with its call site and run with the mode off; under the profiler, a
    record_function whose inner ops (the interpreter's, on the CPU) are not counted."""
    def launch(*args, **kwargs):
        if _LOGGING:
            _LOGGING[0].record(f"triton:{name}", *_site(), args)
            with _disable_current_modes():
                return launcher(*args, **kwargs)
        with torch.profiler.record_function(TRITON + name):
            return launcher(*args, **kwargs)
    return launch


def build(preset: str, layers: int | None, route: str, seed: int = 0):
    cfg = PRESETS[preset]
    if layers is not None:
        cfg = dataclasses.replace(cfg, n_layers=layers)
    model = random_model(cfg, device=torch.device("cpu"), dtype=torch.bfloat16, seed=seed)
    if route == "gpu":
        model.net.declare_kernels(fused_gpu=True)
    return model


def session(model, chunk: int, route: str) -> Session:
    s = Session(model, RetrievalConfig(method="dense"), RuntimeConfig(device="cpu", progress=False,
                                                                      prefill_chunk=chunk))
    if route == "gpu":
        s.ops = s.backend.ops = dataclasses.replace(s.backend.ops, name="sdpa", causal_attend=flash.sdpa_causal)
    return s


def _mask_outside_modes(make):
    """causal_lower_right made with the op log's mode off: a tensor subclass made under a
    TorchDispatchMode fails ("already associated to a python object"); its use is logged."""
    def made(*args):
        with _disable_current_modes():
            return make(*args)
    return made


def _layer_scoped(forward):
    def scoped(self, *args, **kwargs):
        with torch.profiler.record_function(LAYER):
            return forward(self, *args, **kwargs)
    return scoped


def run(model, ids: list[int], chunk: int, route: str) -> tuple[OpLog, list]:
    """Two feeds, one under the op log, one under the profiler (which would count each op
    twice under a dispatch mode) -> (the log, the profiler's events)."""
    log = OpLog()
    saved = (attention_bias.causal_lower_right, model_mod.Block.forward, getattr(model_mod, "PROMOTE_IN_KERNEL", ()))
    attention_bias.causal_lower_right = _mask_outside_modes(saved[0])
    model_mod.Block.forward = _layer_scoped(saved[1])
    if route == "gpu":  # CUDA's rotate: the CPU then makes operand casts CUDA does not (counted apart)
        model_mod.PROMOTE_IN_KERNEL = (*saved[2], "cpu")
    launchers = _route_launchers(route)
    for n in launchers:
        setattr(gpu_layer, n, _one_launch(n.removesuffix("_unchecked"), launchers[n]))
    try:
        _LOGGING.append(log)
        with log:
            session(model, chunk, route).feed(ids)
        _LOGGING.clear()
        s = session(model, chunk, route)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            s.feed(ids)
    finally:
        _LOGGING.clear()
        attention_bias.causal_lower_right, model_mod.Block.forward, model_mod.PROMOTE_IN_KERNEL = saved
        for n, f in launchers.items():
            setattr(gpu_layer, n, f)
    return log, list(prof.events())


def _route_launchers(route: str) -> dict:
    """The GPU layer route's Triton launchers (kernels/gpu_layer.py's names for them)."""
    if route != "gpu":
        return {}
    names = ("rms_norm_unchecked", "rope_qkv_unchecked", "silu_mul_unchecked")
    return {n: getattr(gpu_layer, n) for n in names if hasattr(gpu_layer, n)}


def profiler_counts(events: list) -> dict[str, Counter]:
    """Aten ops inside layers: "all" (nested included, as a CUDA profile lists them), "top" (as
    called from Python), "cpu_casts" (operand casts inside another op, with their inner ops: the
    CPU's TensorIterator copies, which CUDA's kernels do not make)."""
    out = {"all": Counter(), "top": Counter(), "cpu_casts": Counter()}
    for e in events:
        if not e.name.startswith(("aten::", TRITON)):
            continue
        chain, p = [], e.cpu_parent
        while p is not None and p.name != LAYER:
            chain.append(p.name)
            p = p.cpu_parent
        if p is None or any(c.startswith(TRITON) for c in chain):
            continue  # outside the layers (embedding, rope, head: per chunk), or a Triton launch's inside
        name = e.name.removeprefix("aten::").replace(TRITON, "triton:")
        out["all"][name] += 1
        if not chain:
            out["top"][name] += 1
            continue
        if chain[-1].removeprefix("aten::") in ELEMENTWISE and name in CAST_OPS:
            out["cpu_casts"][name] += 1
    return out


def tables(log: OpLog, events: list, per: int) -> dict:
    by_op: Counter = Counter()
    sites = defaultdict(list)
    for (name, site, layer), n in sorted(log.count.items(), key=lambda kv: -kv[1]):
        if layer:
            by_op[name] += n
        sites[name].append({"site": site, "in_layer": layer, "count": n,
                            "per_layer_chunk": round(n / per, 2) if layer else None,
                            "args": log.shapes[(name, site, layer)]})
    prof = profiler_counts(events)
    cuda = prof["all"] - prof["cpu_casts"]

    def rate(c: Counter) -> dict[str, float]:
        return {k: round(n / per, 2) for k, n in c.most_common()}

    passes = {k: n for k, n in by_op.items() if k not in VIEWS | META}
    return {
        "dispatch_per_layer_chunk": rate(by_op),
        "dispatch_passes_per_layer_chunk": round(sum(passes.values()) / per, 2),
        "profiler_per_layer_chunk": rate(cuda),
        "profiler_top_per_layer_chunk": rate(prof["top"]),
        "profiler_cpu_operand_casts_per_layer_chunk": rate(prof["cpu_casts"]),
        "sites": dict(sites),
    }


def show(t: dict, per: int) -> None:
    print(f"aten ops per layer-chunk ({per} layer-chunks): dispatch = as called (one mode), profiler = "
          f"with inner ops, less the CPU's operand casts; top = the profiler's called from Python")
    d, p, top = t["dispatch_per_layer_chunk"], t["profiler_per_layer_chunk"], t["profiler_top_per_layer_chunk"]
    casts = t["profiler_cpu_operand_casts_per_layer_chunk"]
    names = sorted(set(d) | set(p), key=lambda k: -max(d.get(k, 0), p.get(k, 0)))
    print(f"{'op':40s} {'dispatch':>9s} {'profiler':>9s} {'top':>6s} {'cpu casts':>9s}")
    for k in names:
        print(f"{k:40s} {d.get(k, 0):9.2f} {p.get(k, 0):9.2f} {top.get(k, 0):6.2f} {casts.get(k, 0):9.2f}")
    print(f"passes over memory (dispatch; views, allocations excluded): {t['dispatch_passes_per_layer_chunk']:.2f}")
    print("\ncall sites in the layers (ops that are not views or allocations):")
    for name, rows in t["sites"].items():
        if name in VIEWS | META:
            continue
        for r in rows:
            if r["in_layer"]:
                print(f"  {name:20s} {r['per_layer_chunk']:5.2f}  {r['site']:44s} {r['args']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen2.5-0.5b-shape", choices=sorted(PRESETS))
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the preset's (per layer-chunk "
                    "counts do not depend on it)")
    ap.add_argument("--route", choices=("gpu", "cpu"), default="gpu")
    ap.add_argument("--label", default="", help="this run's key in --out (default: the route); other keys kept")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = build(args.preset, args.layers, args.route)
    ids = torch.randint(1, model.config.vocab_size, (args.tokens,)).tolist()
    log, events = run(model, ids, args.chunk, args.route)
    per = model.config.n_layers * -(-args.tokens // args.chunk)
    t = tables(log, events, per)
    show(t, per)
    summary = {"preset": args.preset, "layers": model.config.n_layers, "tokens": args.tokens, "chunk": args.chunk,
               "route": args.route, "label": args.label, "layer_chunks": per, "torch": torch.__version__}
    if args.out is not None:  # runs kept by label: "before" and "after" of a change side by side
        args.out.parent.mkdir(parents=True, exist_ok=True)
        runs = json.loads(args.out.read_text())["runs"] if args.out.exists() else {}
        runs[args.label or args.route] = {**summary, **t}
        args.out.write_text(json.dumps({"bench": "bench/prefill_ops.py", "runs": runs}, indent=1))
    print(json.dumps({**summary, "passes_per_layer_chunk": t["dispatch_passes_per_layer_chunk"],
                      **{k: t["profiler_per_layer_chunk"].get(k, 0) for k in ("copy_", "_to_copy", "mul")}}))


if __name__ == "__main__":
    main()

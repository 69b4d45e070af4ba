"""One decoder layer's decode call (Block.pre + post, T rows), the torch modules against the
GPU few-row route (kernels/gpu_layer.py: fused q/k/v and gate/up GEMMs, Triton RMSNorm,
RoPE and silu*mul), eager and replayed as a CUDA graph; attention left out (a fixed stand-in
output), so what is timed is what the route changes.

Per variant: us per layer call (CUDA events, median of --repeats timings of --iters calls),
kernels per layer call (torch.profiler's CUDA kernels over the iterations, divided), and the
call against the layer's weight-read floor (weight bytes / --hbm-gbs).

    python bench/fused_layer.py                       # Llama-3-8B's layer, bf16, T = 1, on CUDA
    python bench/fused_layer.py --rows 4 --preset qwen2.5-7b-1m
    TRITON_INTERPRET=1 python bench/fused_layer.py --device cpu --preset tiny --iters 2   # a smoke run

JSON to --out (default bench/results/) as fused_layer-<preset>-T<rows>.json; one JSON line last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from kvloft.config import PRESETS
from kvloft.runtime.model import Block, Transformer, rope_inv_freq

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def build(preset: str, dtype: torch.dtype, device: str, rows: int):
    """A layer with random weights (norms near 1) and its inputs: x [T, hidden], cos/sin [T, D], o [T, H_q, D]."""
    cfg = dataclasses.replace(PRESETS[preset], n_layers=1)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.device("meta"):
        block = Block(cfg)
    block = block.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(std=cfg.hidden_size ** -0.5, generator=gen)
    net = Transformer.__new__(Transformer)  # only its rope(): cos/sin as the model makes them
    torch.nn.Module.__init__(net)
    net.register_buffer("inv_freq", rope_inv_freq(cfg).to(device))
    cos, sin = Transformer.rope(net, torch.arange(4096, 4096 + rows, device=device))
    x = torch.randn(rows, cfg.hidden_size, device=device, generator=gen).to(dtype)
    o = torch.randn(rows, cfg.n_heads, cfg.head_dim, device=device, generator=gen).to(dtype)
    return block, x, cos, sin, o


def layer_call(block: Block, x, cos, sin, o):
    q, k, v = block.pre(x, cos, sin)
    return q, k, v, block.post(x, o)


def time_us(fn, iters: int, repeats: int, cuda: bool) -> float:
    """Median over `repeats` of the mean us per call of `iters` calls."""
    out = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) * 1e3 / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            out.append((time.perf_counter() - t0) * 1e6 / iters)
    return statistics.median(out)


def graphed(fn):
    """fn captured as a CUDA graph (warmed up twice on a side stream first) -> its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def kernels_per_call(fn, iters: int) -> float:
    """CUDA kernels torch.profiler sees over `iters` calls, per call (a graph replay shows its kernels)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
    return len(kernels) / iters


def run(args) -> dict:
    cuda = args.device == "cuda"
    block, x, cos, sin, o = build(args.preset, DTYPES[args.dtype], args.device, args.rows)
    weight_bytes = sum(p.numel() * p.element_size() for p in block.parameters())
    floor_us = weight_bytes / (args.hbm_gbs * 1e9) * 1e6
    result = {"preset": args.preset, "dtype": args.dtype, "rows": args.rows, "device": args.device,
              "gpu": torch.cuda.get_device_name() if cuda else None, "weight_bytes": weight_bytes,
              "floor_us": round(floor_us, 2), "hbm_gbs": args.hbm_gbs}
    for name, on in (("modules", False), ("route", True)):
        block.declare_gpu(on)
        fn = lambda: layer_call(block, x, cos, sin, o)
        row = {"eager_us": time_us(fn, args.iters, args.repeats, cuda)}
        if cuda:
            row["eager_kernels"] = kernels_per_call(fn, args.iters)
            replay = graphed(fn)
            row["graph_us"] = time_us(replay, args.iters, args.repeats, cuda)
            row["graph_kernels"] = kernels_per_call(replay, args.iters)
            row["graph_vs_floor"] = round(row["graph_us"] / floor_us, 2)
        result[name] = {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}
    block.declare_gpu(False)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="llama3-8b", choices=sorted(PRESETS))
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--rows", type=int, default=1, help="T rows a call (the route takes up to 16)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--hbm-gbs", type=float, default=3350.0, help="HBM GB/s for the floor (H100 SXM: 3350)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if not 1 <= args.rows <= 16:
        ap.error(f"--rows must be in 1..16 (the route's rows), got {args.rows}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device: run on a GPU, or --device cpu under TRITON_INTERPRET=1 for a smoke run")
    result = run(args)
    for name in ("modules", "route"):
        r = result[name]
        print(f"{name:8s} eager {r['eager_us']:9.1f} us  " + (
            f"{r['eager_kernels']:5.1f} kernels   graph {r['graph_us']:8.1f} us {r['graph_kernels']:5.1f} kernels  "
            f"{r['graph_vs_floor']:.2f}x floor ({result['floor_us']:.1f} us)" if "graph_us" in r else ""))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"fused_layer-{args.preset}-T{args.rows}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

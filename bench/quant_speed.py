"""Weight-only quantized linears: GEMV speed at Llama-3-8B shapes, and a whole decode step.

Part 1, one linear [N, K] times x [T, K] (--rows, default T = 1 (decode), 8, 64, 512):
  bf16      torch.matmul with the bf16 weight (cuBLAS)
  int4      kvloft's Triton path (kernels/quant/ops.py): the dequantizing GEMV for T <= 16,
            dequantize + cuBLAS above; group 128 with mins
  int8      the same, int8 per-channel
  tinygemm  PyTorch's int4 kernel (aten._weight_int4pack_mm) on the same int4 weight,
            converted by kernels/quant/tinygemm.py, at every T
  layer     QuantLinear as a model runs it (runtime/quant_linear.py): tinygemm for
            T <= tinygemm.MAX_T, else dequantize from tinygemm's layout (Triton) + cuBLAS.
            Where tinygemm beats it above MAX_T, raise MAX_T
  torchao   torchao's Int4WeightOnlyConfig ("tile_packed_to_4d") on an nn.Linear, when
            torchao imports (carry its wheel; not a dependency)
Each row gives ms (triton.testing.do_bench median), GB/s of weight bytes read and the
ratios to bf16. --sweep adds a sweep of the int4 T=1 kernel's tiles (best five kept).

Part 2, whole-model decode step (random weights, dense attention over --context synthetic
tokens, CUDA graphs as a Session runs them): ms per step and weight GiB for bf16, int4
(tinygemm, what load_model gives on CUDA), int4 through the Triton GEMV (kernels="triton";
its layers then hold both forms, and its weight GiB counts both), and int8; "vs_bf16" is
the step time ratio (target: int4 <= 0.6).

    python bench/quant_speed.py --out DIR [--sweep]      # GPU: Llama-3-8B shapes and preset
    python bench/quant_speed.py --out DIR --smoke        # tiny shapes, runs on the CPU too
Prints a table; writes DIR/quant_speed.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fill_context, timed_steps, token_stream

from kvloft import RetrievalConfig, RuntimeConfig, Session
from kvloft.kernels.quant import quantize_int4, quantize_int8
from kvloft.kernels.quant import tinygemm as tg
from kvloft.kernels.quant.ops import QmmConfig, quant_matmul
from kvloft.runtime.loader import load_model
from kvloft.runtime.quant_linear import QuantLinear, set_kernels

LLAMA3_8B = [("q/o 4096x4096", 4096, 4096), ("gate/up 14336x4096", 14336, 4096),
             ("down 4096x14336", 4096, 14336), ("lm_head 128256x4096", 128256, 4096)]
SMOKE = [("smoke 96x160", 96, 160), ("smoke 40x352", 40, 352)]
SWEEP = [QmmConfig(bn, bk, w, st) for bn in (16, 32, 64, 128) for bk in (64, 128) for w in (4, 8) for st in (2, 4)]
GiB = 2**30


def bench_ms(fn, cuda: bool, reps: int = 20) -> float:
    if cuda:
        import triton

        return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def tinygemm(q4, dtype):
    """PyTorch's int4 kernel on our int4 weight (kernels/quant/tinygemm.py), or why it does not run."""
    reasons = tg.supported_reasons(q4, dtype)
    if reasons:
        return "unavailable: " + "; ".join(reasons)
    tw = tg.convert(q4, dtype)
    return lambda x: tg.matmul(x, tw)


def layer(q4, dtype):
    """QuantLinear with the kernels a model gets (tinygemm on CUDA; opted into on the CPU)."""
    ql = QuantLinear(q4, dtype=dtype)
    if ql.tg_weight is None and not tg.supported_reasons(q4, dtype):
        ql.set_kernels("tinygemm")
    return ql


def torchao_linear(w: torch.Tensor):
    try:
        from torchao.quantization import Int4WeightOnlyConfig, quantize_

        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        lin.weight.data.copy_(w)
        quantize_(lin, Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"))
        return lin
    except Exception as e:  # noqa: BLE001 (an optional library: report why it did not run)
        return f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def gemv_rows(shapes, device, ts, sweep: bool) -> list[dict]:
    cuda = device.type == "cuda"
    dt = torch.bfloat16 if cuda else torch.float32
    rows = []
    for label, n, k in shapes:
        w = (torch.randn(n, k, device=device) * 0.02).to(dt)
        q4, q8 = quantize_int4(w, 128), quantize_int8(w)
        tiny, ql = tinygemm(q4, dt), layer(q4, dt)
        ao = torchao_linear(w) if cuda else "unavailable: CUDA only"
        for t in ts:
            x = torch.randn(t, k, device=device, dtype=dt)
            small = t <= tg.MAX_T.get((device.type, dt), 0)
            from_layout = not small and ql.qweight is None
            row = {"shape": label, "N": n, "K": k, "T": t,
                   "layer_backend": "dequantize from the layout + matmul" if from_layout else ql.backend}
            row["bf16_ms"] = bench_ms(lambda x=x, w=w: x @ w.t(), cuda)
            row["int4_ms"] = bench_ms(lambda x=x, q=q4: quant_matmul(x, q), cuda)
            row["int8_ms"] = bench_ms(lambda x=x, q=q8: quant_matmul(x, q), cuda)
            row["layer_ms"] = bench_ms(lambda x=x, ql=ql: ql(x), cuda)
            for name, impl in (("tinygemm", tiny), ("torchao", ao)):
                if isinstance(impl, str):
                    row[f"{name}_ms"] = impl
                else:
                    try:
                        row[f"{name}_ms"] = bench_ms(lambda impl=impl, x=x: impl(x), cuda)
                    except Exception as e:  # noqa: BLE001 (an optional comparison: report, go on)
                        row[f"{name}_ms"] = f"failed: {type(e).__name__}: {str(e)[:100]}"
            for name, nbytes in (("bf16", n * k * w.element_size()), ("int4", q4.nbytes), ("int8", q8.nbytes),
                                 ("tinygemm", q4.nbytes), ("layer", q4.nbytes)):
                if isinstance(row[f"{name}_ms"], float):
                    row[f"{name}_GBps"] = round(nbytes / row[f"{name}_ms"] / 1e6, 1)
            for name in ("int4", "tinygemm", "layer", "torchao"):
                if isinstance(row[f"{name}_ms"], float):
                    row[f"{name}_vs_bf16"] = round(row[f"{name}_ms"] / row["bf16_ms"], 3)
            if sweep and t == 1:
                row["int4_sweep"] = tile_sweep(x, q4, cuda)
            rows.append(row)
    return rows


def tile_sweep(x, q4, cuda: bool) -> list[dict]:
    out = []
    for cfg in SWEEP if cuda else SWEEP[:2]:
        try:
            ms = bench_ms(lambda cfg=cfg: quant_matmul(x, q4, cfg), cuda, reps=3)
        except Exception as e:  # noqa: BLE001 (a tile that does not compile is reported, not fatal)
            out.append({"cfg": vars(cfg), "error": str(e)[:80]})
            continue
        out.append({"cfg": vars(cfg), "ms": round(ms, 4)})
    return sorted(out, key=lambda r: r.get("ms", 1e9))[:5]


DECODE_SCHEMES = (("bf16", "auto"), ("int4", "auto"), ("int4", "triton"), ("int8", "auto"))


def decode_rows(preset: str, device, context: int, steps: int, schemes) -> list[dict]:
    """schemes: (weights, kernels) pairs; int4 with "auto" is tinygemm on CUDA (the CPU opts in here)."""
    rows = []
    for weights, kernels in schemes:
        model = load_model(preset, device=device, weights=weights)
        if weights == "int4" and kernels == "auto" and device.type == "cpu":
            set_kernels(model.net, "tinygemm")
        s = Session(model, RetrievalConfig(method="dense"), RuntimeConfig(progress=False, kernels=kernels))
        backends = sorted({m.backend for m in model.net.modules() if isinstance(m, QuantLinear)})
        fill_context(s, context)
        timed_steps(s, token_stream(3))
        ms = timed_steps(s, token_stream(steps, start=3))
        rows.append({"preset": preset, "weights": weights, "kernels": "+".join(backends) or "bf16", "context": context,
                     "step_ms": round(statistics.median(ms), 3), "weight_gib": round(model.weight_bytes / GiB, 3)})
        del s, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _cell(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("n/a" if isinstance(v, str) else str(v))


def gemv_table(rows: list[dict]) -> str:
    head = ("| shape | T | bf16 ms | int4 ms | int8 ms | tinygemm ms | layer ms | torchao ms | int4/bf16 | "
            "tinygemm/bf16 | layer/bf16 |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["shape"], r["T"], *(_cell(r[f"{k}_ms"]) for k in ("bf16", "int4", "int8", "tinygemm", "layer", "torchao")),
                 *(r.get(f"{k}_vs_bf16", "n/a") for k in ("int4", "tinygemm", "layer"))]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def decode_table(rows: list[dict]) -> str:
    lines = ["| preset | weights | kernels | context | step ms | vs bf16 | weights GiB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = (r["preset"], r["weights"], r["kernels"], r["context"], r["step_ms"], r["vs_bf16"], r["weight_gib"])
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory for quant_speed.json")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes and the tiny preset (any device)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--preset", default=None, help="decode-step preset (default llama3-8b; tiny with --smoke)")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--sweep", action="store_true", help="also sweep the int4 T=1 kernel's tiles (~1 min)")
    ap.add_argument("--no-decode", action="store_true", help="skip the whole-model decode step")
    ap.add_argument("--rows", default="1,8,64,512", help="T values of the one-linear part (rows of x)")
    args = ap.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    preset = args.preset or ("tiny" if args.smoke else "llama3-8b")
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "gemv": [], "decode": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save = lambda: (out / "quant_speed.json").write_text(json.dumps(result, indent=1))
    ts = tuple(int(t) for t in args.rows.split(","))
    if not ts or min(ts) < 1 or max(ts) > 8192:
        raise SystemExit(f"--rows must be T values in 1..8192, got {args.rows!r}")
    result["gemv"] = gemv_rows(SMOKE if args.smoke else LLAMA3_8B, device, ts, sweep=args.sweep)
    save()  # kept if the decode part is stopped
    print(gemv_table(result["gemv"]), flush=True)
    if not args.no_decode:
        ctx, steps = (min(args.context, 64), 3) if args.smoke else (args.context, args.steps)
        for scheme in DECODE_SCHEMES:
            result["decode"] += decode_rows(preset, device, ctx, steps, (scheme,))
            base = result["decode"][0]["step_ms"]
            for r in result["decode"]:
                r["vs_bf16"] = round(r["step_ms"] / base, 3)
            save()
        print(decode_table(result["decode"]), flush=True)
    print(json.dumps({"decode": result["decode"],
                      "vs_bf16": [{k: r.get(f"{k}_vs_bf16") for k in ("int4", "tinygemm", "layer")} | {"T": r["T"]}
                                  for r in result["gemv"]]}))


if __name__ == "__main__":
    main()

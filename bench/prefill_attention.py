"""One prefill chunk's causal attention on the GPU: the routes of kernels/flash.py side by side.

A chunk of Tq queries over Tk keys (the queries the last Tq keys, lower-right causal), bf16,
GQA read in place. Rows: FlashAttention-2's lower-right kernel in one call (public SDPA with
causal_lower_right), the cuDNN split (unmasked prefix + causal square, merged by lse), and the
route `flash.causal_attend` takes; each checked against the flash row and timed (CUDA events,
median of --repeats after a warm-up), and once on a shape never used before (wall time of the
first call: cuDNN plans each new shape). TFLOP/s counts the unmasked logits only (4 * Tq * keys * D
* H_q, causal keys halved on the square).

    python bench/prefill_attention.py --shapes 14336x30720:14/2/64,16384x131072:32/8/128 --out DIR
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import cuda_ms

from kvloft.kernels import flash


def parse_shape(text: str) -> tuple[int, int, int, int, int]:
    """"TqxTk:Hq/Hkv/D" -> (Tq, Tk, Hq, Hkv, D)."""
    tokens, heads = text.split(":")
    tq, tk = (int(x) for x in tokens.split("x"))
    hq, hkv, d = (int(x) for x in heads.split("/"))
    return tq, tk, hq, hkv, d


def cold_ms(route: str, tq: int, tk: int, hq: int, hkv: int, d: int, salt: int) -> float:
    """Wall ms of one synchronized call of `route` on a (Tq, Tk) no call has used before (Tq - salt,
    Tk - salt): what a new prompt length pays, cuDNN's plan for the shape included. Call it twice
    with different salts and keep the second: the first also compiles the kernel once per process."""
    q = torch.randn(tq - salt, hq, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(tk - salt, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    fn = routes(q, k, v, d**-0.5)[route]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def flops(tq: int, tk: int, hq: int, d: int) -> float:
    """Unmasked logits of a lower-right causal chunk: the prefix whole, the square halved."""
    return 4.0 * hq * d * (tq * (tk - tq) + tq * tq / 2)


def routes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> dict:
    """The timed calls of one chunk: q [Tq, H_q, D], k, v [Tk, H_kv, D] -> {name: () -> out}."""
    out = {"flash lower-right (one call)": lambda: flash.sdpa_causal(q, k, v, scale=scale),
           "kvloft causal_attend": lambda: flash.causal_attend(q, k, v, scale=scale)}
    if q.shape[0] < k.shape[0] and flash.cudnn_supported(q, k):
        out["cudnn split (prefix + square)"] = lambda: flash._cudnn_attend(q, k, v, scale, True)[0]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="14336x30720:14/2/64,16384x16384:14/2/64,16384x131072:32/8/128")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    rows = []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| Tq x Tk | heads | route | ms | first call on a new shape, ms | TFLOP/s | max err vs flash |")
    print("|---|---|---|---:|---:|---:|---:|")
    for spec in args.shapes.split(","):
        tq, tk, hq, hkv, d = parse_shape(spec)
        gen = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(tq, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        k, v = (torch.randn(tk, hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
        scale = d**-0.5
        base = flash.sdpa_causal(q, k, v, scale=scale)
        for name, fn in routes(q, k, v, scale).items():
            err = (fn().float() - base.float()).abs().max().item()
            ms = cuda_ms(fn, repeats=args.repeats)
            salt = 8 * (len(rows) + 1)
            cold_ms(name, tq, tk, hq, hkv, d, salt)
            cold = cold_ms(name, tq, tk, hq, hkv, d, salt + 4)
            row = {"tq": tq, "tk": tk, "hq": hq, "hkv": hkv, "d": d, "route": name, "ms": round(ms, 3),
                   "cold_ms": round(cold, 2), "tflops": round(flops(tq, tk, hq, d) / ms / 1e9, 1), "max_err": err}
            rows.append(row)
            print(f"| {tq} x {tk} | {hq}/{hkv}/{d} | {name} | {ms:.3f} | {cold:.2f} | {row['tflops']} | {err:.3g} |")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "prefill_attention.json").write_text(json.dumps(
            {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

"""The key scan of exact and tokenselect on one GPU: kernels/scoring.py's tile against HBM.

One decode query q [H_q, D] over N token-major keys [N, H_kv, D] (bf16, Llama-3-8B's heads by
default): the Triton scoring kernel at each (block_n, num_warps), reduce "max" (exact: [H_kv, N])
and "none" (tokenselect: [H_q, N]); then what follows the scan: torch.topk of the reduced scores,
and tokenselect's softmax, head sum and topk. CUDA-event medians; GB/s counts the keys read and
the scores written.

    python bench/score_speed.py --rows 16384,131072 --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from common import cuda_ms

from kvloft.kernels import scoring


def softmax_sum(s: torch.Tensor) -> torch.Tensor:
    """tokenselect's vote: s [H_q, N] fp32 -> [N]."""
    return torch.softmax(s, dim=-1).sum(dim=0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="16384,131072")
    ap.add_argument("--heads", default="32/8/128", help="H_q/H_kv/D")
    ap.add_argument("--topk", type=int, default=2048)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    hq, hkv, d = (int(x) for x in args.heads.split("/"))
    rows = []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, heads {hq}/{hkv}/{d}")
    print("| N | op | block_n | warps | ms | GB/s |")
    print("|---:|---|---:|---:|---:|---:|")

    def add(n, op, bn, nw, ms, nbytes):
        rows.append({"n": n, "op": op, "block_n": bn, "num_warps": nw, "ms": round(ms, 4),
                     "gbps": round(nbytes / ms / 1e6, 1)})
        print(f"| {n} | {op} | {bn} | {nw} | {ms:.4f} | {rows[-1]['gbps']} |")

    for n in (int(x) for x in args.rows.split(",")):
        q = torch.randn(hq, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(n, hkv, d, device="cuda", dtype=torch.bfloat16)
        key_bytes = k.numel() * 2
        for reduce, heads in (("max", hkv), ("none", hq)):
            for bn in (64, 128, 256):
                for nw in (4, 8):
                    ms = cuda_ms(scoring.score, q, k, reduce=reduce, block_n=bn, num_warps=nw)
                    add(n, f"score {reduce}", bn, nw, ms, key_bytes + heads * n * 4)
        s = scoring.score(q, k, reduce="max")
        kk = min(args.topk, n)
        add(n, f"topk {kk} of [H_kv, N]", 0, 0, cuda_ms(torch.topk, s, kk, dim=-1), s.numel() * 4)
        add(n, f"topk {kk} of [H_kv, N], unsorted", 0, 0, cuda_ms(torch.topk, s, kk, dim=-1, sorted=False),
            s.numel() * 4)
        s = scoring.score(q, k, reduce="none")
        add(n, "softmax + head sum", 0, 0, cuda_ms(softmax_sum, s), s.numel() * 8)
        v = torch.softmax(s, dim=-1).sum(dim=0)
        add(n, f"topk {kk} of [N]", 0, 0, cuda_ms(torch.topk, v, kk), v.numel() * 4)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "score_speed.json").write_text(json.dumps(
            {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

"""Attention ops: Triton kernels on CUDA, the torch reference elsewhere.

`kernel_set(mode, device)` picks the implementation once per session:
mode "auto" uses Triton for CUDA tensors and the reference on the CPU; "reference"
and "triton" force one (RuntimeConfig.kernels, default from KVLOFT_KERNELS).
Every op of a set has the reference's signature (see kernels/reference.py), but for
`causal_attend`: a prefill chunk's causal attention over all its keys, out only (no lse),
for callers that merge nothing; on CUDA public SDPA's flash kernel with a lower-right mask
(kernels/flash.py), on the CPU the reference's attend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvloft.kernels import reference

OP_NAMES = ("attend", "decode_attend", "gather_attend", "merge", "score_topk")


@dataclass(frozen=True)
class KernelSet:
    name: str
    attend: Callable
    decode_attend: Callable
    gather_attend: Callable
    merge: Callable
    score_topk: Callable
    # q [Tq, H_q, D], k, v [Tk, H_kv, D], Tq <= Tk, the queries the last Tq keys -> out [Tq, H_q, D]
    # not given: attend's out, bound when the set is made (dataclasses.replace of attend keeps the
    # old one: replace causal_attend with it)
    causal_attend: Callable | None = None

    def __post_init__(self) -> None:
        if self.causal_attend is None:
            attend = self.attend
            object.__setattr__(self, "causal_attend",
                               lambda q, k, v, *, scale: attend(q, k, v, scale=scale, causal=True)[0])


REFERENCE = KernelSet("reference", *(getattr(reference, n) for n in OP_NAMES))


def _triton_set() -> KernelSet:
    try:
        from kvloft.kernels import triton_ops
    except ImportError as e:  # triton missing or no kernels built
        raise ValueError(
            f"Triton kernels are unavailable ({e}); install triton or set kernels='reference'"
        ) from e
    ops = {n: getattr(triton_ops, n, getattr(reference, n)) for n in OP_NAMES}
    return KernelSet("triton", **ops, causal_attend=triton_ops.causal_attend)


def kernel_set(mode: str, device: torch.device | str) -> KernelSet:
    device = torch.device(device)
    if mode == "reference" or (mode == "auto" and device.type != "cuda"):
        return REFERENCE
    if mode in ("auto", "triton"):
        return _triton_set()
    raise ValueError(f"kernels must be 'auto', 'reference' or 'triton', got {mode!r}")


def score_keys(q: torch.Tensor, k_rows: torch.Tensor, *, scale: float = 1.0, reduce: str = "none") -> torch.Tensor:
    """q [H_q, D] · k_rows [N, H_kv, D] -> [H_q, N] fp32 logits (reduce "none"), or the GQA
    group's "max" / "sum" [H_kv, N]: the scan of the GPU key copies (exact, tokenselect,
    recycled). On CUDA the Triton kernel (kernels/scoring.py) reads the keys in their
    dtype and accumulates in fp32, folding the group in registers; the reference would
    first copy every key chunk to fp32 (at 128K tokens of Llama-3-8B, most of a step's
    search time). On the CPU, fp32 keys go through a compiled loop that reads each key row once
    (kernels/cpu_score.py: ~2.7x torch's bmm). Elsewhere the reference."""
    if k_rows.device.type == "cuda" and q.device == k_rows.device:
        from kvloft.kernels.scoring import score

        return score(q.to(k_rows.dtype), k_rows, reduce=reduce, scale=scale)
    from kvloft.kernels import cpu_score

    if cpu_score.applies(q, k_rows):
        s = cpu_score.score_rows(q, k_rows)
        s = s if scale == 1.0 else s.mul_(scale)
    else:
        s = reference.score(q, k_rows, scale=scale)
    return s if reduce == "none" else reference.reduce_group(s, k_rows.shape[1], reduce)

"""Prefill attention on CUDA through PyTorch's fused kernels, with the log-sum-exp.

`attend(q, k, v, scale=..., causal=...)` has the reference's signature (kernels/reference.py:
q [Tq, H_q, D], k, v [Tk, H_kv, D] -> out [Tq, H_q, D], lse [Tq, H_q] fp32, natural log),
so the tiered prefill can merge its partials exactly. It calls ATen's memory-efficient
attention, which returns the log-sum-exp and never materializes the [Tq, Tk] logits (the
reference does, in fp32). Two adaptations:

- GQA: each KV head is expanded to its query group (a copy of one K/V part, [Tk, H_q, D];
  the parts the prefill passes are one host chunk, the static tier or the chunk itself).
- causal here means the queries are the *last* Tq keys (bottom-right), while ATen's
  `is_causal` aligns the first query with the first key. With Tq < Tk the keys before the
  queries are attended without a mask and the last Tq with ATen's mask, the two merged.

Falls back to the reference for what the fused kernel does not take (fp32, CPU tensors,
head_dim > 128 or not a multiple of 8).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvloft.kernels import reference

__all__ = ["attend", "fused_supported"]


def fused_supported(q: Tensor, k: Tensor) -> bool:
    d = q.shape[-1]
    return (q.is_cuda and k.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype
            and d % 8 == 0 and d <= 128)


def _bhtd(x: Tensor, group: int) -> Tensor:
    """[T, H, D] -> [1, H * group, T, D] (each head repeated `group` times, in query-head order)."""
    if group > 1:
        x = x.repeat_interleave(group, dim=1)
    return x.transpose(0, 1).unsqueeze(0)


def _fused(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    tq = q.shape[0]
    g = q.shape[1] // k.shape[1]
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        _bhtd(q, 1), _bhtd(k, g), _bhtd(v, g), None, True, 0.0, causal, scale=scale
    )[:2]
    # out [1, H_q, Tq, D]; lse [1, H_q, >= Tq] (padded to the kernel's block)
    return out[0].transpose(0, 1).contiguous(), lse[0, :, :tq].transpose(0, 1).contiguous().float()


def attend(q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: bool = False) -> tuple[Tensor, Tensor]:
    """Softmax attention of Tq queries over Tk keys (the reference's contract; see the module doc)."""
    tq, tk = q.shape[0], k.shape[0]
    if tk == 0 or tq == 0 or not fused_supported(q, k) or (causal and tq > tk):
        return reference.attend(q, k, v, scale=scale, causal=causal)
    if not causal or tq == tk:
        return _fused(q, k, v, scale, causal)
    o1, l1 = _fused(q, k[: tk - tq], v[: tk - tq], scale, False)
    o2, l2 = _fused(q, k[tk - tq :], v[tk - tq :], scale, True)
    return reference.merge([o1, o2], [l1, l2])

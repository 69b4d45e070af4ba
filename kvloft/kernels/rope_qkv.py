"""RoPE on a layer's queries and keys, and its values copied out, in one Triton launch.

From the q/k/v projections (slices of one fused [T, (H_q + 2 H_kv) D] GEMM output, or three
separate outputs) to contiguous q [T, H_q, D], k [T, H_kv, D] (both rotated) and v [T, H_kv, D]:

    out = x * cos + rot(x) * sin,    rot(x) = cat(-x[D/2:], x[:D/2])    (HF's rotate-half)

in fp32, cast to the dtype once, as runtime/model.py `rotate` does: x * cos rounded, then
rot * sin added by a fused multiply-add, as torch's addcmul computes on CUDA (and on the CPU:
tests/kernels/test_rope_qkv.py finds them equal bit for bit). Asked for by name, not left to
Triton's fp-fusion default (which changes in Triton 3.10). v is copied so the
attention backends get the contiguous tensors the modules gave them.

Replaces rotate's chunk/cat/neg/float/mul/addcmul/cast on q and on k (~14 launches) by one.
Grid (T, H_q + 2 H_kv), one head a program: read and write T (H_q + 2 H_kv) D values plus
2 T D fp32 of cos/sin. Reference: `reference` below.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kvloft.kernels import checks
from kvloft.kernels.rounding import round_to

__all__ = ["MAX_HEAD_DIM", "reference", "rope_qkv", "rope_qkv_unchecked"]

MAX_HEAD_DIM = 1024


@triton.jit(do_not_specialize=["n_q", "n_kv"])
def _rope_qkv_kernel(
    q_src, k_src, v_src,  # [T, H_q D], [T, H_kv D], [T, H_kv D]: last dim contiguous, own row strides
    cos, sin,  # [T, D] fp32 contiguous
    q_out, k_out, v_out,  # [T, H_q, D], [T, H_kv, D], [T, H_kv, D] contiguous
    n_q, n_kv,
    stride_q, stride_k, stride_v,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next_pow2(HEAD_DIM)
):
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < HEAD_DIM
    if head < n_q + n_kv:  # a query or key head: rotate
        if head < n_q:
            src = q_src + t * stride_q + head.to(tl.int64) * HEAD_DIM
            dst = q_out + (t * n_q + head) * HEAD_DIM
        else:
            src = k_src + t * stride_k + (head - n_q).to(tl.int64) * HEAD_DIM
            dst = k_out + (t * n_kv + head - n_q) * HEAD_DIM
        half = HEAD_DIM // 2
        first = cols < half
        partner = tl.where(first, cols + half, cols - half)
        x = tl.load(src + cols, mask=mask, other=0.0)
        xp = tl.load(src + partner, mask=mask, other=0.0).to(tl.float32)
        rot = tl.where(first, -xp, xp)
        c = tl.load(cos + t * HEAD_DIM + cols, mask=mask, other=0.0)
        s = tl.load(sin + t * HEAD_DIM + cols, mask=mask, other=0.0)
        y = tl.fma(rot, s, x.to(tl.float32) * c)  # addcmul's rounding on CUDA: the second product fused
        tl.store(dst + cols, round_to(y, x.dtype), mask=mask)
    else:  # a value head: copy
        h = (head - n_q - n_kv).to(tl.int64)
        x = tl.load(v_src + t * stride_v + h * HEAD_DIM + cols, mask=mask, other=0.0)
        tl.store(v_out + t * n_kv * HEAD_DIM + h * HEAD_DIM + cols, x, mask=mask)


def rope_qkv(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """q [T, H_q D], k/v [T, H_kv D] (one dtype, last dims contiguous, any row stride: slices of a
    fused qkv output do), cos/sin [T, D] fp32 -> q [T, H_q, D], k [T, H_kv, D] rotated, v [T, H_kv, D],
    all new and contiguous."""
    _validate(q, k, v, cos, sin, head_dim)
    return rope_qkv_unchecked(q, k, v, cos, sin, head_dim)


def rope_qkv_unchecked(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor,
                       head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """rope_qkv without the argument checks: for a declared route (kernels/gpu_layer.py)."""
    t, n_q, n_kv = q.shape[0], q.shape[1] // head_dim, k.shape[1] // head_dim
    q_out = torch.empty((t, n_q, head_dim), dtype=q.dtype, device=q.device)
    k_out = torch.empty((t, n_kv, head_dim), dtype=q.dtype, device=q.device)
    v_out = torch.empty((t, n_kv, head_dim), dtype=q.dtype, device=q.device)
    if t == 0:
        return q_out, k_out, v_out
    block = checks.next_pow2(head_dim)
    _rope_qkv_kernel[(t, n_q + 2 * n_kv)](
        q, k, v, cos, sin, q_out, k_out, v_out, n_q, n_kv, q.stride(0), k.stride(0), v.stride(0),
        HEAD_DIM=head_dim, BLOCK_D=block, num_warps=max(1, min(4, block // 64)),
    )  # fmt: skip
    return q_out, k_out, v_out


def _validate(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, d: int) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        checks.require_dim(f"rope_qkv: {name}", x, 2, "[T, H D]")
        checks.require_float(f"rope_qkv: {name}", x, q.dtype)
        if x.stride(1) != 1 or x.shape[0] != q.shape[0]:
            raise ValueError(f"rope_qkv: {name} must be [T={q.shape[0]}, H D] with a contiguous last dim, got "
                             f"shape {tuple(x.shape)} strides {x.stride()}")
    checks.require_runnable(q.device, _rope_qkv_kernel, "rope_qkv")
    if d % 2 or not 0 < d <= MAX_HEAD_DIM or q.shape[1] % d or k.shape[1] % d or k.shape != v.shape:
        raise ValueError(f"rope_qkv: head_dim must be even, at most {MAX_HEAD_DIM}, and divide q's and k's widths "
                         f"(k and v alike), got head_dim {d}, q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    for name, x in (("cos", cos), ("sin", sin)):
        if x.shape != (q.shape[0], d) or x.dtype != torch.float32 or not x.is_contiguous():
            raise ValueError(f"rope_qkv: {name} must be contiguous fp32 [T, D] = [{q.shape[0]}, {d}], got "
                             f"{tuple(x.shape)} {x.dtype}")
    checks.require_same_device("rope_qkv", q, k=k, v=v, cos=cos, sin=sin)


def reference(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """The torch arithmetic the kernel replaces: runtime/model.py `rotate` on q and k, v as is."""
    t = q.shape[0]
    return (_rotate(q.reshape(t, -1, head_dim), cos, sin), _rotate(k.reshape(t, -1, head_dim), cos, sin),
            v.reshape(t, -1, head_dim))


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:  # x [T, H, D], cos/sin [T, D]: model.rotate's
    x1, x2 = x.chunk(2, dim=-1)
    rot = torch.cat((-x2, x1), dim=-1)
    return torch.addcmul(x.float() * cos[:, None], rot.float(), sin[:, None]).to(x.dtype)

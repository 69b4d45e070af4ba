"""Log-sum-exp merge of partial attentions, in Triton.

Partial results over disjoint key sets (static sink+window part, retrieved part, the
splits of a split-K decode) combine exactly:

    lse = logsumexp_p lse_p,    out = sum_p exp(lse_p - lse) * out_p

An empty part has lse = -inf and contributes nothing; if every part is empty the
result is out = 0, lse = -inf (no NaN). The kernel runs the sum online (running max,
rescaled accumulator) over up to 32 parts at a time, so it reads each part once, in
ceil(P / 32) dependent trips.

Memory traffic for P parts of R rows of width D: read P*R*(D*itemsize + 4), write
R*(D*itemsize + 4). Reference: kernels/reference.py `merge`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from kvloft.kernels import checks

__all__ = ["merge", "merge_stacked"]

MAX_BLOCK_P = 32  # parts per memory trip
TILE = 4096  # fp32 values a program holds per part tile (32 registers a thread at 4 warps)


@triton.jit(do_not_specialize=["n_parts", "n_rows"])  # sizes: no recompiles per shape
def _merge_kernel(
    out_parts,  # [P, R, D] any float dtype, last dim contiguous
    lse_parts,  # [P, R] fp32, contiguous
    out,  # [R, D] output dtype, contiguous
    lse,  # [R] fp32
    n_parts,
    n_rows,
    stride_op,
    stride_or,
    HEAD_DIM: tl.constexpr,  # a constant, so the d-mask keeps vector loads
    BLOCK_P: tl.constexpr,  # parts read at once (one slot each)
    BLOCK_D: tl.constexpr,  # columns per program
):
    # One row per program (axis 0), a chunk of columns per axis-1 program. Each of BLOCK_P
    # slots merges parts slot, slot + BLOCK_P, ... online; the slots are combined at the
    # end. So P parts cost ceil(P / BLOCK_P) dependent memory trips, not P.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = cols < HEAD_DIM
    slots = tl.arange(0, BLOCK_P)
    m = tl.full([BLOCK_P], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_P], tl.float32)
    acc = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
    for p0 in range(0, n_parts, BLOCK_P):
        parts = (p0 + slots).to(tl.int64)
        pmask = parts < n_parts
        lse_p = tl.load(lse_parts + parts * n_rows + row, mask=pmask, other=float("-inf"))
        o_ptr = out_parts + parts[:, None] * stride_op + row * stride_or + cols[None, :]
        o_p = tl.load(o_ptr, mask=pmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        m_new = tl.maximum(m, lse_p)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all empty so far: weights 0, not NaN
        alpha = tl.exp(m - m_safe)
        w = tl.exp(lse_p - m_safe)
        acc = acc * alpha[:, None] + w[:, None] * o_p
        l_sum = l_sum * alpha + w
        m = m_new
    m_all = tl.max(m, 0)
    m_all_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    slot_w = tl.exp(m - m_all_safe)  # [BLOCK_P], 0 for empty slots
    l_all = tl.sum(slot_w * l_sum, 0)
    nonempty = l_all > 0
    l_safe = tl.where(nonempty, l_all, 1.0)
    res = tl.sum(slot_w[:, None] * acc, 0) / l_safe  # [BLOCK_D]
    tl.store(out + row * HEAD_DIM + cols, res.to(out.dtype.element_ty), mask=dmask)
    if tl.program_id(1) == 0:
        tl.store(lse + row, tl.where(nonempty, m_all_safe + tl.log(l_safe), float("-inf")))


def merge_stacked(out_parts: Tensor, lse_parts: Tensor, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Merge stacked parts: out_parts [P, R, D], lse_parts [P, R] fp32 -> (out [R, D], lse [R]).

    Internal entry (also combines the splits of sparse_decode); arguments are trusted.
    """
    n_parts, n_rows, head_dim = out_parts.shape
    out = torch.empty((n_rows, head_dim), dtype=out_dtype, device=out_parts.device)
    lse = torch.empty((n_rows,), dtype=torch.float32, device=out_parts.device)
    if n_rows == 0 or head_dim == 0:
        return out, lse.fill_(float("-inf"))
    if out_parts.stride(-1) != 1:
        out_parts = out_parts.contiguous()
    lse_parts = lse_parts.float().contiguous()
    block_p = min(checks.next_pow2(n_parts), MAX_BLOCK_P)
    block_d = min(checks.next_pow2(head_dim), max(16, TILE // block_p))  # tile <= TILE fp32 values
    grid = (n_rows, triton.cdiv(head_dim, block_d))
    _merge_kernel[grid](
        out_parts, lse_parts, out, lse, n_parts, n_rows,
        out_parts.stride(0), out_parts.stride(1),
        HEAD_DIM=head_dim, BLOCK_P=block_p, BLOCK_D=block_d,
        num_warps=max(1, min(4, block_p * block_d // 512)),
    )  # fmt: skip
    return out, lse


def _validate(outs: Sequence[Tensor], lses: Sequence[Tensor]) -> None:
    if len(outs) != len(lses) or not outs:
        raise ValueError(
            f"merge needs one lse per output and at least one part, got {len(outs)} outs, {len(lses)} lses"
        )
    ref = outs[0]
    if ref.dim() < 1:
        raise ValueError(f"merge: each out must be [..., D], got shape {tuple(ref.shape)}")
    checks.require_runnable(ref.device, _merge_kernel, "merge")
    for i, (o, s) in enumerate(zip(outs, lses)):
        checks.require_float(f"outs[{i}]", o)
        checks.require_float(f"lses[{i}]", s)
        if o.shape != ref.shape:
            raise ValueError(f"merge: outs[{i}] has shape {tuple(o.shape)}, outs[0] {tuple(ref.shape)}")
        if s.shape != ref.shape[:-1]:
            raise ValueError(
                f"merge: lses[{i}] must have shape {tuple(ref.shape[:-1])} (out without D), "
                f"got {tuple(s.shape)}"
            )
        checks.require_same_device("merge", ref, **{f"outs[{i}]": o, f"lses[{i}]": s})


def merge(outs: Sequence[Tensor], lses: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Exact log-sum-exp merge of partial attentions over disjoint key sets.

    outs: P tensors [..., D] (any float dtype; the result has outs[0]'s dtype);
    lses: P tensors [...] (fp32 natural log; -inf = empty part).
    Returns (out [..., D], lse [...] fp32), like reference.merge.
    """
    _validate(outs, lses)
    shape = outs[0].shape
    same = all(o.dtype == outs[0].dtype for o in outs)
    parts = torch.stack([o if same else o.float() for o in outs])  # [P, ..., D]
    parts = parts.reshape(len(outs), -1, shape[-1])  # [P, R, D]
    lse_parts = torch.stack([s.float() for s in lses]).reshape(len(lses), -1)  # [P, R]
    out, lse = merge_stacked(parts, lse_parts, outs[0].dtype)
    return out.view(shape), lse.view(shape[:-1])

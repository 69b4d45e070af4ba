"""Append one token's keys and values to each of B sequences' buffers, found through address tables.

A captured decode step (runtime/whole_step.py) must write token b's k, v into row rows[b] of
sequence b's own buffer of the layer, and the graph must not hold those buffers: sequences
join and leave the batch and buffers are reallocated as they grow. So the buffers are named
by their base addresses in device tables that the host fills before each replay, and this
kernel writes through them:

    for b:  if rows[b] >= 0:  k_buf_b[rows[b]] = k[b];  v_buf_b[rows[b]] = v[b]
                              (and pos_buf_b[rows[b]] = pos[b]: a tiered row's static tier keeps
                              each slot's position)

Grid (B,): program b copies one row [H_kv, D] of keys and one of values (read 2 * H_kv * D
elements, write as many; rows[b] < 0 writes nothing, the padding rows of a batch bucket).
Every buffer is contiguous [capacity, H_kv, D] in the keys' dtype (DenseKV's layout); rows are
not range-checked against the capacities (the caller makes room before it fills the tables).
Reference: write_rows_reference (index assignment into each buffer).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from kvloft.kernels import checks
from kvloft.kernels.addresses import rebase, table_align

__all__ = ["write_rows_reference", "write_rows_table"]


@triton.jit
def _write_kernel(
    k,  # [B, H_kv, D] contiguous: the token's keys, one row per sequence
    v,  # [B, H_kv, D]
    k_table,  # [B] int64 base address of sequence b's key buffer [capacity, H_kv, D]
    v_table,  # [B] int64 base address of its value buffer
    rows,  # [B] int64 the row each sequence's token goes to, < 0: none
    stride_n,  # elements between two rows of a buffer (H_kv * D for contiguous buffers)
    pos,  # [B] int64 the token's position (HAS_POS)
    p_table,  # [B] int64 base address of sequence b's position buffer [capacity] int64, 0: none (HAS_POS)
    ROW: tl.constexpr,  # H_kv * D
    BLOCK: tl.constexpr,  # next_pow2(ROW)
    HAS_POS: tl.constexpr,
    ALIGN: tl.constexpr,  # the buffers lie a multiple of ALIGN elements from k and v (addresses.table_align)
):
    b = tl.program_id(0).to(tl.int64)
    r = tl.load(rows + b)
    if r >= 0:
        offs = tl.arange(0, BLOCK)
        m = offs < ROW
        dk = rebase(k, tl.load(k_table + b), ALIGN) + r * stride_n  # 16-byte stores (kernels/addresses.py)
        dv = rebase(v, tl.load(v_table + b), ALIGN) + r * stride_n
        tl.store(dk + offs, tl.load(k + b * ROW + offs, mask=m), mask=m)
        tl.store(dv + offs, tl.load(v + b * ROW + offs, mask=m), mask=m)
        if HAS_POS:
            pa = tl.load(p_table + b)
            if pa != 0:
                tl.store(pa.to(tl.pointer_type(tl.int64)) + r, tl.load(pos + b))


def write_rows_table(k: Tensor, v: Tensor, k_table: Tensor, v_table: Tensor, rows: Tensor, like: Tensor,
                     pos: Tensor | None = None, p_table: Tensor | None = None) -> None:
    """k_buf_b[rows[b]] = k[b], v_buf_b[rows[b]] = v[b] for every b with rows[b] >= 0 (and
    pos_buf_b[rows[b]] = pos[b] where p_table[b] != 0, given pos and p_table).

    k, v: [B, H_kv, D] of one float dtype; k_table, v_table: [B] int64 base addresses of each
    sequence's buffers (contiguous [capacity, H_kv, D] in k's dtype; like: one of them, for the
    layout); rows: [B] int64, on k's device; pos: [B] int64 positions, p_table: [B] int64 base
    addresses of int64 position buffers [capacity] (0: the sequence has none, e.g. a dense row
    of a tiered batch). No host sync, no allocation: capturable."""
    checks.require_dim("k", k, 3, "[B, H_kv, D] (one token per sequence)")
    checks.require_float("k", k)
    checks.require_float("v", v, k.dtype)
    checks.require_float("like", like, k.dtype)
    nb, hkv, d = k.shape
    if v.shape != k.shape or like.shape[1:] != (hkv, d) or not like.is_contiguous():
        raise ValueError(f"write_rows_table: v must match k [B={nb}, H_kv={hkv}, D={d}] and like must be a "
                         f"contiguous [rows, {hkv}, {d}] buffer, got v {tuple(v.shape)}, like {tuple(like.shape)}")
    if (pos is None) != (p_table is None):
        raise ValueError("write_rows_table: give both pos and p_table, or neither")
    tables = [("k_table", k_table), ("v_table", v_table), ("rows", rows)]
    if pos is not None:
        tables += [("pos", pos), ("p_table", p_table)]
        checks.require_same_device("write_rows_table", k, pos=pos, p_table=p_table)
    for name, t in tables:
        if t.shape != (nb,) or t.dtype != torch.int64:
            raise ValueError(f"write_rows_table: {name} must be [B={nb}] int64, got {t.dtype} {tuple(t.shape)}")
    checks.require_same_device("write_rows_table", k, v=v, k_table=k_table, v_table=v_table, rows=rows)
    checks.require_runnable(k.device, _write_kernel, "write_rows_table")
    if nb == 0:
        return
    row = hkv * d
    has_pos = pos is not None
    k, v = k.contiguous(), v.contiguous()
    _write_kernel[(nb,)](k, v, k_table, v_table, rows, like.stride(0), pos if has_pos else rows,
                         p_table if has_pos else rows, ROW=row, BLOCK=checks.next_pow2(row), HAS_POS=has_pos,
                         ALIGN=table_align(like, k, v), num_warps=4 if row >= 1024 else 1)


def write_rows_reference(k: Tensor, v: Tensor, k_bufs: Sequence[Tensor], v_bufs: Sequence[Tensor],
                         rows: Sequence[int], pos: Tensor | None = None,
                         p_bufs: Sequence[Tensor | None] | None = None) -> None:
    """write_rows_table over the buffers themselves: k_bufs[b][rows[b]] = k[b] (rows[b] >= 0),
    p_bufs[b][rows[b]] = pos[b] where p_bufs[b] is not None."""
    for b, r in enumerate(rows):
        if r >= 0:
            k_bufs[b][r] = k[b]
            v_bufs[b][r] = v[b]
            if p_bufs is not None and p_bufs[b] is not None:
                p_bufs[b][r] = pos[b]

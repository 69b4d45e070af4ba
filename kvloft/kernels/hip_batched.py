"""One HiP pruning stage for the rows of a batched decode step, in one launch.

kernels/hip_stage.py searches the chunks of one session's key store; a batched step of G
sessions would launch it G times per stage and layer. `hip_stage_batched` searches every
row's chunks in one launch: row g's store is found through its own run of base addresses in
one concatenated table, its chunks are its own candidate lists (or, at stage 1, its first
n_chunks[g] * CHUNK host rows), and its query is q[g]. Rows hold different numbers of
chunks; the grid is (max chunks, G) and a program past its row's count reads nothing (its
loads are masked off) and writes rep -1, score -inf.

Each program runs the search of kernels/hip_stage.py's `_hip_stage_kernel` on one chunk
(the same loads and the same fp32 sums, so a row's scores equal its own launch's bit for
bit): 2 * log2(CHUNK) probe rows of [H_kv, D] read per live chunk, plus its CHUNK ids.

`hip_stage_batched_reference` is the torch twin: each row through hip_stage_reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from kvloft.kernels import checks
from kvloft.kernels.hip_stage import PROBES, hip_stage_reference

__all__ = ["META_FIELDS", "hip_stage_batched", "hip_stage_batched_reference"]

META_FIELDS = ("n_chunks", "table_offset", "chunk_rows")  # rows of the [3, G] meta tensor


@triton.jit
def _probe_row(table_ptr, k0_ptr, tb, row_id, chunk_rows, kv_off, q, hmask, kmask, stride_kn):
    # One probe of host row `row_id` of a row's store whose chunk addresses start at
    # table_ptr + tb; row_id -1 (padding, a dead chunk) reads nothing and scores -inf.
    valid = row_id >= 0
    safe = tl.maximum(row_id, 0)
    addr = tl.load(table_ptr + tb + safe // chunk_rows, mask=valid, other=0)
    base = addr.to(tl.pointer_type(k0_ptr.dtype.element_ty))
    k = tl.load(base + (safe % chunk_rows) * stride_kn + kv_off, mask=tl.where(valid, kmask, False), other=0.0).to(tl.float32)
    s = tl.where(hmask, tl.sum(q * k, axis=1), float("-inf"))  # [BLOCK_H]
    return tl.where(valid, tl.max(s, axis=0), float("-inf"))


@triton.jit
def _cand_id(cand_row, pos, live, IMPLICIT: tl.constexpr):
    # Candidate `pos` of chunk c: c * CHUNK + pos at stage 1 (IMPLICIT), else read from the list.
    if IMPLICIT:
        return tl.where(live, cand_row + pos, -1)
    return tl.load(cand_row + pos, mask=live, other=-1)


@triton.jit
def _hip_stage_batched_kernel(
    table_ptr,  # [T] int64 base addresses of every row's store chunks [chunk_rows, H_kv, D]
    k0_ptr,  # a store chunk (for the element type)
    cand_ptr,  # [G, C, CHUNK] int64 row ids (-1 pad), last dim contiguous; unused when IMPLICIT
    q_ptr,  # [G, H_q, D] float, contiguous
    meta_ptr,  # [3, G] int64 contiguous: n_chunks, table_offset, chunk_rows of each row
    rep_ptr,  # [G, C] int64 out: row id of each chunk's representative (-1 past n_chunks)
    score_ptr,  # [G, C] fp32 out (-inf past n_chunks)
    n_cols,  # C
    n_group,  # G
    stride_cg,
    stride_cc,
    stride_kn,
    stride_kh,
    H_Q: tl.constexpr,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CHUNK: tl.constexpr,
    LOG2_CHUNK: tl.constexpr,
    MIDDLE: tl.constexpr,
    IMPLICIT: tl.constexpr,
):
    tl.static_assert((1 << LOG2_CHUNK) == CHUNK)
    c = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1).to(tl.int64)
    live = c < tl.load(meta_ptr + g)
    tb = tl.load(meta_ptr + n_group + g)
    chunk_rows = tl.load(meta_ptr + 2 * n_group + g)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    hmask = h < H_Q
    kmask = hmask[:, None] & (d[None, :] < D)
    q = tl.load(q_ptr + g * H_Q * D + h[:, None] * D + d[None, :], mask=kmask, other=0.0).to(tl.float32)
    kv_off = (h // GROUP)[:, None].to(tl.int64) * stride_kh + d[None, :]
    if IMPLICIT:
        row0 = c * CHUNK
    else:
        row0 = cand_ptr + g * stride_cg + c * stride_cc
    lo = c * 0  # offset of the live range inside the chunk
    best = tl.full([], float("-inf"), tl.float32)
    if LOG2_CHUNK == 0:
        best = _probe_row(table_ptr, k0_ptr, tb, _cand_id(row0, lo, live, IMPLICIT), chunk_rows, kv_off, q,
                          hmask, kmask, stride_kn)
    for it in tl.static_range(LOG2_CHUNK):
        half = CHUNK >> (it + 1)
        off = (half // 2) * MIDDLE
        id_l = _cand_id(row0, lo + off, live, IMPLICIT)
        id_r = _cand_id(row0, lo + half + off, live, IMPLICIT)
        s_l = _probe_row(table_ptr, k0_ptr, tb, id_l, chunk_rows, kv_off, q, hmask, kmask, stride_kn)
        s_r = _probe_row(table_ptr, k0_ptr, tb, id_r, chunk_rows, kv_off, q, hmask, kmask, stride_kn)
        right = s_r > s_l
        lo = tl.where(right, lo + half, lo)
        best = tl.where(right, s_r, s_l)
    tl.store(rep_ptr + g * n_cols + c, _cand_id(row0, lo, live, IMPLICIT))
    tl.store(score_ptr + g * n_cols + c, tl.where(live, best, float("-inf")))


def _check(op: str, k0: Tensor, cand: Tensor | None, q: Tensor, meta: Tensor, chunk: int, probe: str) -> None:
    checks.require_dim("q", q, 3, "[G, H_q, D]")
    checks.require_dim("store chunk", k0, 3, "[chunk_rows, H_kv, D]")
    checks.require_float("q", q)
    checks.require_float("store chunk", k0)
    checks.require_rows_device(op, q[0], keys=k0)
    checks.require_runnable(q.device, _hip_stage_batched_kernel, op)
    checks.require_last_dim_contiguous("store chunk", k0)
    g, hq, d = q.shape
    hkv = k0.shape[1]
    if k0.shape[2] != d or hq % hkv:
        raise ValueError(f"{op}: q must be [G, H_q, {d}] with H_q a multiple of {hkv}, got {tuple(q.shape)}")
    if chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f"{op}: chunk must be a power of two >= 1, got {chunk}")
    if probe not in PROBES:
        raise ValueError(f"{op}: probe must be one of {PROBES}, got {probe!r}")
    if meta.shape != (len(META_FIELDS), g) or meta.dtype != torch.int64 or meta.device != q.device:
        raise ValueError(f"{op}: meta must be [{len(META_FIELDS)}, {g}] int64 on {q.device} "
                         f"({', '.join(META_FIELDS)}), got {tuple(meta.shape)} {meta.dtype} on {meta.device}")
    if cand is not None and (cand.dim() != 3 or cand.shape[0] != g or cand.shape[2] != chunk
                             or cand.dtype != torch.int64 or cand.device != q.device or cand.stride(2) != 1):
        raise ValueError(f"{op}: cand must be [{g}, C, {chunk}] int64 on {q.device}, last dim contiguous, "
                         f"got {tuple(cand.shape)} {cand.dtype} on {cand.device}")


def hip_stage_batched(table: Tensor, k0: Tensor, q: Tensor, meta: Tensor, n_cols: int, chunk: int,
                      cand: Tensor | None = None, probe: str = "first") -> tuple[Tensor, Tensor]:
    """Representatives of every row's chunks in one launch.

    table: [T] int64 on q's device, every row's store chunk addresses end to end (each store's
        ChunkedRows.pointer_table); row g's run starts at meta[1, g].
    k0: one store chunk [chunk_rows, H_kv, D]; every row's chunks share its dtype, row layout
        and strides (sessions of one model), on q's device or in pinned host memory.
    q: [G, H_q, D] each row's decode query (GQA: head h reads KV head h // (H_q // H_kv)).
    meta: [3, G] int64 on q's device: n_chunks (row g's live chunks, <= n_cols), table_offset,
        chunk_rows (rows per store chunk) of each row.
    cand: [G, C >= n_cols, chunk] int64 row ids (-1 = padding, a live chunk's first id valid;
        trusted: built from the stores), or None at stage 1: row g's chunk c holds host rows
        c * chunk .. c * chunk + chunk - 1.
    Returns (rep [G, n_cols] int64, score [G, n_cols] fp32), -1 / -inf past a row's n_chunks.
    """
    op = "hip_stage_batched"
    _check(op, k0, cand, q, meta, chunk, probe)
    g = q.shape[0]
    rep = torch.empty((g, n_cols), dtype=torch.long, device=q.device)
    score = torch.empty((g, n_cols), dtype=torch.float32, device=q.device)
    if n_cols == 0 or g == 0:
        return rep, score
    hq, d = q.shape[1], q.shape[2]
    stride_cg, stride_cc = (cand.stride(0), cand.stride(1)) if cand is not None else (0, 0)
    _hip_stage_batched_kernel[(n_cols, g)](
        table, k0, cand if cand is not None else rep, q.contiguous(), meta.contiguous(), rep, score,
        n_cols, g, stride_cg, stride_cc, k0.stride(0), k0.stride(1),
        H_Q=hq, GROUP=hq // k0.shape[1], D=d, BLOCK_H=checks.next_pow2(hq), BLOCK_D=checks.next_pow2(d),
        CHUNK=chunk, LOG2_CHUNK=chunk.bit_length() - 1, MIDDLE=probe == "middle", IMPLICIT=cand is None,
    )
    return rep, score


def hip_stage_batched_reference(stores: Sequence[Sequence[Tensor]], q: Tensor, n_chunks: Sequence[int],
                                n_cols: int, chunk: int, cand: Tensor | None = None,
                                probe: str = "first") -> tuple[Tensor, Tensor]:
    """Torch twin of `hip_stage_batched`: stores[g] row g's store chunks, q [G, H_q, D],
    n_chunks[g] its live chunks, cand as there -> (rep [G, n_cols], score [G, n_cols])."""
    g = q.shape[0]
    rep = torch.full((g, n_cols), -1, dtype=torch.long, device=q.device)
    score = torch.full((g, n_cols), float("-inf"), dtype=torch.float32, device=q.device)
    for j in range(g):
        m = n_chunks[j]
        if m == 0:
            continue
        rows = cand[j, :m] if cand is not None else torch.arange(m * chunk, device=q.device).view(m, chunk)
        rep[j, :m], score[j, :m] = hip_stage_reference(stores[j], rows, q[j], probe)
    return rep, score

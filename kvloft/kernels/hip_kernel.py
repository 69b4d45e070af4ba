"""The Triton kernel of HiP's chunk search (kernels/hip_stage.py says what the search does).

`hip_search_kernel` runs the hierarchical top-1 search of one chunk per program: halve the
chunk log2(CHUNK) times, each time scoring one probe row per half (max over the query heads
of q_h · k, GQA: head h reads KV head h // GROUP) and keeping the half that scores higher.
Its launchers are in kernels/hip_stage.py (`hip_stage1`: candidates are consecutive rows of
one buffer, IMPLICIT; `hip_stage`: candidate ids into a chunked store read through an address
table, TABLE) and kernels/hip_batched.py (`hip_stage_batched`: a row of a batch per grid
column, PER_ROW). 8-bit rows (CODES): a probe loads the row's codes and its per-head scales
and dequantizes in registers (_dequantize), as split_kernel.py's `_load_rows` does.

Memory traffic per program: 2 * log2(CHUNK) probe rows of [H_kv, D] (with CODES, H_kv * (D + 4)
bytes each), plus the chunk's CHUNK ids unless IMPLICIT.
Reference: kernels/hip_stage.py `hip_stage1_reference`, `hip_stage_reference`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kvloft.kernels.addresses import rebase

__all__ = ["hip_search_kernel"]


@triton.jit
def _probe(table_ptr, k0_ptr, tb, row_id, chunk_rows, kv_off, q, qb, hmask, kmask, stride_kn, scale_ptr, kv_head,
           TABLE: tl.constexpr, HAS_BIAS: tl.constexpr, CODES: tl.constexpr, ROUND: tl.constexpr,
           H_KV: tl.constexpr):
    # Score of host row `row_id`: max over query heads of q_h · k[row, h // group] (minus qb[h],
    # the head's bias, when HAS_BIAS); row_id -1
    # (padding, a dead chunk) reads nothing and scores -inf. TABLE: the row lives in store
    # chunk row_id // chunk_rows, whose base address is table_ptr[tb + that chunk] (k0_ptr,
    # one store chunk, gives the dtype); else it is row row_id of the rows at k0_ptr.
    # CODES (with TABLE): the chunks hold 8-bit codes (k0_ptr an int8 / uint8 chunk), and the
    # scales [chunk_rows, H_KV] fp32 of chunk c start at address scale_ptr[tb + c]; kv_head
    # [BLOCK_H] is h // group.
    valid = row_id >= 0
    safe = tl.maximum(row_id, 0)
    if TABLE:
        addr = tl.load(table_ptr + tb + safe // chunk_rows, mask=valid, other=0)
        base = rebase(k0_ptr, addr, TABLE)  # TABLE is the chunks' alignment (addresses.py)
        row = safe % chunk_rows
    else:
        base = k0_ptr
        row = safe
    raw = tl.load(base + row * stride_kn + kv_off, mask=tl.where(valid, kmask, False), other=0)
    if CODES != 0:
        s_addr = tl.load(scale_ptr + tb + safe // chunk_rows, mask=valid, other=0)
        s_row = s_addr.to(tl.pointer_type(tl.float32)) + row * H_KV  # scales are [chunk_rows, H_KV], contiguous
        scale = tl.load(s_row + kv_head, mask=tl.where(valid, hmask, False), other=0.0)  # [BLOCK_H]: a scale per KV head read
        k = _dequantize(raw, scale, CODES, ROUND)
    else:
        k = raw.to(tl.float32)
    s = tl.sum(q * k, axis=1)  # [BLOCK_H]
    if HAS_BIAS:
        s = s - qb
    s = tl.where(hmask, s, float("-inf"))
    return tl.where(valid, tl.max(s, axis=0), float("-inf"))


@triton.jit
def _dequantize(codes, scale, CODES: tl.constexpr, ROUND: tl.constexpr):
    # Rows [BLOCK_H, BLOCK_D] fp32 from their 8-bit codes and scale [BLOCK_H] (one per KV head
    # of the query head), as split_kernel.py's _load_rows: CODES 1 int8 values, 2 fp8 e4m3
    # bits kept as uint8; code * scale is one fp32 product, then rounded to the model dtype
    # (ROUND 1 fp16, 2 bf16, 0 fp32) as rowquant.dequantize_rows rounds.
    if CODES == 2:
        cf = codes.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:
        cf = codes.to(tl.float32)
    x = cf * scale[:, None]
    if ROUND == 1:
        x = x.to(tl.float16).to(tl.float32)
    elif ROUND == 2:
        x = x.to(tl.bfloat16).to(tl.float32)
    return x


@triton.jit
def _cand_id(row0, pos, live, end, IMPLICIT: tl.constexpr):
    # Candidate `pos` of a chunk. IMPLICIT: the chunk is the rows row0 .. row0 + CHUNK - 1 and
    # a row >= end is padding (-1); else row0 points at the chunk's list of ids, read when live.
    if IMPLICIT:
        out = tl.where(row0 + pos < end, row0 + pos, -1)
    else:
        out = tl.load(row0 + pos, mask=live, other=-1)
    return out


@triton.jit
def _search_chunk(table_ptr, k0_ptr, tb, row0, live, end, chunk_rows, kv_off, q, qb, hmask, kmask, stride_kn,
                  scale_ptr, kv_head,
                  CHUNK: tl.constexpr, LOG2_CHUNK: tl.constexpr, MIDDLE: tl.constexpr,
                  IMPLICIT: tl.constexpr, TABLE: tl.constexpr, HAS_BIAS: tl.constexpr,
                  CODES: tl.constexpr, ROUND: tl.constexpr, H_KV: tl.constexpr):
    # The hierarchical top-1 search of one chunk (candidates as in _cand_id, rows read as in
    # _probe) -> (row id of its representative, -1 for a dead chunk; its score, fp32).
    lo = tl.full([], 0, tl.int64)  # offset of the live range inside the chunk
    best = tl.full([], float("-inf"), tl.float32)
    if LOG2_CHUNK == 0:  # a chunk of one row: the row is its own representative
        best = _probe(table_ptr, k0_ptr, tb, _cand_id(row0, lo, live, end, IMPLICIT), chunk_rows, kv_off, q,
                      qb, hmask, kmask, stride_kn, scale_ptr, kv_head, TABLE, HAS_BIAS, CODES, ROUND, H_KV)
    for it in tl.static_range(LOG2_CHUNK):
        half = CHUNK >> (it + 1)
        off = (half // 2) * MIDDLE  # probe the first (0) or middle key of each half
        id_l = _cand_id(row0, lo + off, live, end, IMPLICIT)
        id_r = _cand_id(row0, lo + half + off, live, end, IMPLICIT)
        s_l = _probe(table_ptr, k0_ptr, tb, id_l, chunk_rows, kv_off, q, qb, hmask, kmask, stride_kn, scale_ptr,
                     kv_head, TABLE, HAS_BIAS, CODES, ROUND, H_KV)
        s_r = _probe(table_ptr, k0_ptr, tb, id_r, chunk_rows, kv_off, q, qb, hmask, kmask, stride_kn, scale_ptr,
                     kv_head, TABLE, HAS_BIAS, CODES, ROUND, H_KV)
        right = s_r > s_l
        lo = tl.where(right, lo + half, lo)
        best = tl.where(right, s_r, s_l)
    return _cand_id(row0, lo, live, end, IMPLICIT), best


@triton.jit
def hip_search_kernel(
    table_ptr,  # TABLE: [T] int64 base addresses of store chunks [chunk_rows, H_kv, D]
    k_ptr,  # TABLE: a store chunk (for the element type); else the rows [R, H_kv, D] themselves
    cand_ptr,  # [G, C, CHUNK] int64 row ids (-1 = padding), last dim contiguous; unused when IMPLICIT
    q_ptr,  # [G, H_q, D] float, contiguous
    meta_ptr,  # PER_ROW: [3, G] int64 contiguous, n_chunks, table_offset, chunk_rows of each row
    rep_ptr,  # [G, C] int64 out: row id of each chunk's representative (-1 past a row's n_chunks)
    score_ptr,  # [G, C] fp32 out (-inf past a row's n_chunks)
    n_cols,  # C
    n_group,  # G
    n_rows,  # IMPLICIT and not PER_ROW: rows past n_rows are padding
    chunk_rows,  # TABLE and not PER_ROW: rows per store chunk
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
    IMPLICIT: tl.constexpr,  # chunk c is rows c * CHUNK .. (stage 1); else its ids are in cand
    TABLE: tl.constexpr,  # >= 1: rows are read through table_ptr, chunk bases TABLE elements aligned
    #                       (addresses.table_align); 0: straight from k_ptr
    PER_ROW: tl.constexpr,  # each row g has its own n_chunks, table run and chunk_rows in meta
    bias_ptr=None,  # HAS_BIAS: [G, H_q] fp32 contiguous, subtracted from head h's logits (rank="z")
    HAS_BIAS: tl.constexpr = False,
    scale_ptr=None,  # CODES: [T] int64 base addresses of the chunks' scales [chunk_rows, H_kv] fp32, as table_ptr
    CODES: tl.constexpr = 0,  # TABLE: 0 rows in a float dtype; 1 int8 / 2 fp8 e4m3 codes (rowquant.CODES_FLAG)
    ROUND: tl.constexpr = 0,  # CODES: dequantized rows rounded to 0 fp32, 1 fp16, 2 bf16 (the model dtype)
):
    # One program per (chunk c, row g): reads 2 * log2(CHUNK) probe rows of [H_kv, D] (with
    # CODES: H_kv * (D + 4) bytes each), plus the chunk's CHUNK ids unless IMPLICIT.
    tl.static_assert((1 << LOG2_CHUNK) == CHUNK)
    tl.static_assert(CODES == 0 or TABLE != 0)
    H_KV: tl.constexpr = H_Q // GROUP
    c = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1).to(tl.int64)
    if PER_ROW:
        n_chunks = tl.load(meta_ptr + g)
        tb = tl.load(meta_ptr + n_group + g)
        rows = tl.load(meta_ptr + 2 * n_group + g)
        end = n_chunks * CHUNK
    else:
        n_chunks = n_cols
        tb = 0
        rows = chunk_rows
        end = n_rows
    live = c < n_chunks
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    hmask = h < H_Q
    kmask = hmask[:, None] & (d[None, :] < D)
    q = tl.load(q_ptr + g * H_Q * D + h[:, None] * D + d[None, :], mask=kmask, other=0.0).to(tl.float32)
    qb = tl.zeros([BLOCK_H], tl.float32)
    if HAS_BIAS:
        qb = tl.load(bias_ptr + g * H_Q + h, mask=hmask, other=0.0)
    kv_head = (h // GROUP).to(tl.int64)  # GQA: head h reads KV head h // GROUP
    kv_off = kv_head[:, None] * stride_kh + d[None, :]
    if IMPLICIT:
        row0 = c * CHUNK
    else:
        row0 = cand_ptr + g * stride_cg + c * stride_cc
    if CODES != 0:
        scales = scale_ptr
    else:
        scales = table_ptr  # never read (a pointer argument: a None passed down does not compile)
    rep = tl.full([], -1, tl.int64)
    best = tl.full([], float("-inf"), tl.float32)
    if live:  # a dead chunk (past its row's count: a padded grid) runs no search
        rep, best = _search_chunk(table_ptr, k_ptr, tb, row0, live, end, rows, kv_off, q, qb, hmask, kmask,
                                  stride_kn, scales, kv_head, CHUNK, LOG2_CHUNK, MIDDLE, IMPLICIT, TABLE,
                                  HAS_BIAS, CODES, ROUND, H_KV)
    tl.store(rep_ptr + g * n_cols + c, rep)
    tl.store(score_ptr + g * n_cols + c, tl.where(live, best, float("-inf")))

"""HiP chunk representatives: hierarchical top-1 search inside fixed-size chunks.

One pruning stage of HiP (arXiv 2406.09827, InfiniteHiP arXiv 2502.08910) splits its
candidate tokens into chunks of `chunk` tokens (a power of two) and finds, per chunk,
one representative key by halving the chunk log2(chunk) times: each iteration reads
two probe keys (one per half: its first key, or its middle key), scores each against
the decode query (max over query heads of q_h · k, GQA: head h reads KV head
h // group) and keeps the half whose probe scores higher. The chunk's score is the
score of the key the search ends on. Padding rows (past `n_rows`, or id -1) score -inf.

Cost per chunk: 2 * log2(chunk) key rows read (1 when chunk == 1), each [H_kv, D].

`hierarchical_top1` is the torch implementation over arbitrary candidate lists. One
Triton kernel, `hip_search_kernel`, serves two launchers here, each with its torch twin,
and the batched one of kernels/hip_batched.py:

- `hip_stage1` (`hip_stage1_reference`): the first stage, whose candidates are all the
  rows of one contiguous token-major buffer (one chunk of the key store);
- `hip_stage` (`hip_stage_reference`): a later stage, whose candidates are row ids
  [C, L] into a chunked store (tiers/chunked.py); the kernel reads each probe row
  through a table of the chunks' base addresses, so nothing is gathered or copied and
  the whole stage is one launch (a torch gather over chunks costs a sync per chunk).

8-bit host rows (CacheConfig.host_dtype; kernels/rowquant.py): `hip_stage` also takes a
PackedRows store's chunks (rowquant.PackedChunks: codes [R, H_kv, D] one byte each, scales
[R, H_kv] fp32, each found through its own address table, the layout split_kernel.py reads
with CODES). A probe then loads the row's codes and its per-head scales and dequantizes in
registers as split_kernel.py's `_load_rows` does (code * scale in fp32, rounded to the model
dtype), so its score is the reference's over `dequantize_rows`. A probe row costs
H_kv * (D + 4) bytes instead of H_kv * D * 2 for bf16.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from kvloft.kernels import checks
from kvloft.kernels.addresses import rebase, table_align
from kvloft.kernels.rowquant import CODES_FLAG, PackedChunks, dequantize_rows

__all__ = [
    "PROBES",
    "hierarchical_top1",
    "hip_search_kernel",
    "hip_stage",
    "hip_stage1",
    "hip_stage1_reference",
    "hip_stage_reference",
    "probe_scores",
    "probes_per_chunk",
]

PROBES = ("first", "middle")


def probe_scores(keys: Tensor, q: Tensor, bias: Tensor | None = None) -> Tensor:
    """Max over query heads of q_h · k - bias_h: keys [P, H_kv, D], q [H_q, D], bias None or
    [H_q] fp32 (HipParams rank="z": q and bias z-score each head's logits) -> [P] fp32."""
    hkv, d = keys.shape[1], keys.shape[2]
    qg = q.float().view(hkv, q.shape[0] // hkv, d)  # [H_kv, G, D]
    logits = torch.bmm(keys.float().transpose(0, 1), qg.transpose(1, 2))  # [H_kv, P, G]
    if bias is not None:
        logits = logits - bias.float().view(hkv, 1, q.shape[0] // hkv)
    return logits.amax(dim=(0, 2))


def probes_per_chunk(chunk: int) -> int:
    """Probe rows the search reads per chunk: 2 per halving (1 for a chunk of one row)."""
    return 1 if chunk == 1 else 2 * (chunk.bit_length() - 1)


def hierarchical_top1(
    cand: Tensor, fetch: Callable[[Tensor], Tensor], q: Tensor, probe: str = "first", bias: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Representative of each chunk of candidates.

    cand: [C, L] int64 row ids, -1 = padding (L a power of two; a chunk's first id is valid).
    fetch: ids [P] (all valid) -> keys [P, H_kv, D].
    q: [H_q, D]; bias: None or [H_q] fp32, subtracted from head h's logits (probe_scores).
    Returns (rep [C] int64 row ids, score [C] fp32). Reads C * probes_per_chunk(L) probe
    slots (padding slots are skipped here; the kernel re-reads a real row for them).
    """
    n_chunks, length = cand.shape
    if length == 1:
        return cand[:, 0], _scores_or_ninf(cand[:, 0], fetch, q, bias)
    lo = torch.zeros(n_chunks, dtype=torch.long, device=cand.device)  # start of the live range
    best = torch.full((n_chunks,), float("-inf"), device=cand.device)
    while length > 1:
        half = length // 2
        off = 0 if probe == "first" else half // 2
        pos = torch.stack([lo + off, lo + half + off])  # [2, C]
        ids = cand.gather(1, pos.t()).t()  # [2, C]
        s = _scores_or_ninf(ids.reshape(-1), fetch, q, bias).view(2, n_chunks)
        right = s[1] > s[0]
        lo = torch.where(right, lo + half, lo)
        best = torch.where(right, s[1], s[0])
        length = half
    return cand.gather(1, lo[:, None])[:, 0], best


def _scores_or_ninf(ids: Tensor, fetch: Callable[[Tensor], Tensor], q: Tensor, bias: Tensor | None) -> Tensor:
    valid = ids >= 0
    out = torch.full(ids.shape, float("-inf"), dtype=torch.float32, device=ids.device)
    if bool(valid.all()):
        return probe_scores(fetch(ids), q, bias)
    out[valid] = probe_scores(fetch(ids[valid]), q, bias)
    return out


def hip_stage1_reference(keys: Tensor, q: Tensor, chunk: int, probe: str = "first",
                         bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """keys [R, H_kv, D] contiguous rows, q [H_q, D], bias None or [H_q] fp32 -> (rep [C] row
    index, score [C] fp32), C = ceil(R/chunk)."""
    n_rows = keys.shape[0]
    n_chunks = -(-n_rows // chunk)
    cand = torch.arange(n_chunks * chunk, device=keys.device).view(n_chunks, chunk)
    cand = cand.masked_fill(cand >= n_rows, -1)
    return hierarchical_top1(cand, lambda ids: keys[ids], q, probe, bias)


def hip_stage_reference(chunks: Sequence[Tensor] | PackedChunks, cand: Tensor, q: Tensor, probe: str = "first",
                        bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """chunks: equal store chunks [R, H_kv, D], or a PackedRows store's PackedChunks (each probe
    row dequantized: rowquant.dequantize_rows); cand [C, L] row ids (-1 pad); bias None or [H_q]
    fp32 -> (rep [C] ids, score [C] fp32)."""
    return hierarchical_top1(cand, _chunk_rows(chunks), q, probe, bias)


def _chunk_rows(chunks: Sequence[Tensor] | PackedChunks) -> Callable[[Tensor], Tensor]:
    """fetch(ids [P]) -> rows [P, H_kv, D] of a chunk list (8-bit chunks: dequantized rows)."""
    if isinstance(chunks, PackedChunks):
        rows = chunks.codes[0].shape[0]

        def packed(ids: Tensor) -> Tensor:
            at = [(int(i) // rows, int(i) % rows) for i in ids]
            codes = torch.stack([chunks.codes[c][r] for c, r in at])
            scales = torch.stack([chunks.scales[c][r] for c, r in at])
            return dequantize_rows(codes, scales, chunks.kind, chunks.dtype)

        return packed
    rows = chunks[0].shape[0]
    return lambda ids: torch.stack([chunks[int(i) // rows][int(i) % rows] for i in ids])


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


def _check_common(op: str, keys: Tensor, q: Tensor, chunk: int, probe: str, kernel, codes: bool = False) -> None:
    checks.require_dim("keys", keys, 3, "[R, H_kv, D]")
    checks.require_dim("q", q, 2, "[H_q, D]")
    if not codes:
        checks.require_float("keys", keys)
    checks.require_float("q", q)
    checks.require_rows_device(op, q, keys=keys)  # on q's device, or pinned host memory (zero-copy)
    checks.require_runnable(q.device, kernel, op)
    checks.require_last_dim_contiguous("keys", keys)
    hkv, d = keys.shape[1], keys.shape[2]
    if q.shape[1] != d or q.shape[0] % hkv:
        raise ValueError(f"{op}: q must be [H_q, {d}] with H_q a multiple of {hkv}, got {tuple(q.shape)}")
    check_search(op, chunk, probe)


def check_search(op: str, chunk: int, probe: str) -> None:
    """The search's own arguments: chunk a power of two, probe one of PROBES."""
    if chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f"{op}: chunk must be a power of two >= 1, got {chunk}")
    if probe not in PROBES:
        raise ValueError(f"{op}: probe must be one of {PROBES}, got {probe!r}")


def kernel_meta(hq: int, hkv: int, d: int, chunk: int, probe: str) -> dict:
    """The constexpr arguments of a search kernel for H_q query heads over [*, H_kv, D] keys."""
    return {"H_Q": hq, "GROUP": hq // hkv, "D": d, "BLOCK_H": checks.next_pow2(hq), "BLOCK_D": checks.next_pow2(d),
            "CHUNK": chunk, "LOG2_CHUNK": chunk.bit_length() - 1, "MIDDLE": probe == "middle"}


def _bias_args(op: str, bias: Tensor | None, q: Tensor) -> dict:
    """The kernel's bias arguments: none (HAS_BIAS off, the launch as without a bias), or bias
    [H_q] fp32 on q's device (one row: the kernel reads it as [1, H_q])."""
    if bias is None:
        return {}
    if bias.shape != (q.shape[0],) or bias.dtype != torch.float32 or bias.device != q.device:
        raise ValueError(f"{op}: bias must be [H_q={q.shape[0]}] float32 on {q.device}, got "
                         f"{tuple(bias.shape)} {bias.dtype} on {bias.device}")
    return {"bias_ptr": bias.contiguous(), "HAS_BIAS": True}


def hip_stage(chunks: Sequence[Tensor] | PackedChunks, cand: Tensor, q: Tensor, probe: str = "first",
              table: Tensor | None = None, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Triton twin of `hip_stage_reference`: one launch for a whole later stage.

    chunks: the store's chunks, each [chunk_rows, H_kv, D], same dtype and strides, on q's
    device or (q on CUDA) in pinned host memory (tiers/chunked.py ChunkedRows.chunks); or an
    8-bit store's PackedChunks (tiers/packed.py PackedRows.chunks: codes read in place with
    their scales, dequantized in registers); cand: [C, L] int64 row ids (-1 = padding,
    a chunk's first id valid; ids are trusted: the caller built them from the store).
    table: the chunks' base addresses on q's device (ChunkedRows.pointer_table; for 8-bit
    chunks the codes' addresses, PackedRows.pointer_table), made here when None. bias: None or
    [H_q] fp32 on q's device, subtracted from head h's logits (probe_scores). Reads 2 * log2(L)
    probe rows per chunk plus the C * L ids.
    """
    op = "hip_stage"
    if not len(chunks):
        raise ValueError(f"{op}: the store has no chunks; select on an empty layer returns early")
    packed = isinstance(chunks, PackedChunks)
    k0 = chunks.codes[0] if packed else chunks[0]  # (indexing PackedChunks would dequantize a copy)
    _check_common(op, k0, q, cand.shape[-1] if cand.dim() == 2 else 0, probe, hip_search_kernel, codes=packed)
    if cand.dim() != 2 or cand.dtype != torch.int64 or cand.device != q.device:
        raise ValueError(f"{op}: cand must be [C, L] int64 on {q.device}, got {tuple(cand.shape)} {cand.dtype}")
    tensors = chunks.codes if packed else chunks
    if any(c.shape != k0.shape or c.dtype != k0.dtype or c.stride() != k0.stride() for c in tensors):
        raise ValueError(f"{op}: every chunk must match the first in shape, dtype and strides")
    codes = _codes_args(op, chunks, q) if packed else {}
    n_chunks, chunk = cand.shape
    rep = torch.empty(n_chunks, dtype=torch.long, device=q.device)
    score = torch.empty(n_chunks, dtype=torch.float32, device=q.device)
    if n_chunks == 0:
        return rep, score
    if table is None:
        table = checks.address_table(tensors, q.device)
    hip_search_kernel[(n_chunks, 1)](
        table, k0, cand.contiguous(), q.contiguous(), rep, rep, score, n_chunks, 1, 0, k0.shape[0], 0, chunk,
        k0.stride(0), k0.stride(1), IMPLICIT=False, TABLE=table_align(k0), PER_ROW=False,
        **kernel_meta(q.shape[0], k0.shape[1], k0.shape[2], chunk, probe), **_bias_args(op, bias, q), **codes,
    )
    return rep, score


ROUND_FLAG = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # hip_search_kernel's ROUND per model dtype


def _codes_args(op: str, chunks: PackedChunks, q: Tensor) -> dict:
    """The kernel's 8-bit arguments for a PackedRows store's chunks: codes [R, H_kv, D] and
    scales [R, H_kv] fp32, both contiguous, on q's device or pinned (the layout split_kernel.py
    reads); the scales' address table; the format and the model dtype rows round to."""
    c0 = chunks.codes[0]
    r, hkv, d = c0.shape
    for i, (c, s) in enumerate(zip(chunks.codes, chunks.scales, strict=True)):
        if not c.is_contiguous() or s.shape != (r, hkv) or not s.is_contiguous() or s.dtype != torch.float32:
            raise ValueError(f"{op}: 8-bit chunk {i} must hold contiguous codes [R={r}, H_kv={hkv}, D={d}] and "
                             f"contiguous fp32 scales [R, H_kv], got {tuple(c.shape)} and {s.dtype} {tuple(s.shape)}")
    # (the first chunks stand for all, as k0 does: a store pins every chunk or none)
    checks.require_rows_device(op, q, codes=c0, scales=chunks.scales[0])
    if chunks.dtype not in ROUND_FLAG:
        raise ValueError(f"{op}: 8-bit rows dequantize to float32, float16 or bfloat16, got {chunks.dtype}")
    return {"scale_ptr": chunks.scale_table(q.device), "CODES": CODES_FLAG[chunks.kind],
            "ROUND": ROUND_FLAG[chunks.dtype]}


def hip_stage1(keys: Tensor, q: Tensor, chunk: int, probe: str = "first",
               bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Triton twin of `hip_stage1_reference` (same arguments and results).

    keys [R, H_kv, D] (rows of one chunk of the key store), q [H_q, D] on the same device.
    One program per chunk; reads 2 * log2(chunk) rows of [H_kv, D] per chunk (the probe
    rows, each fetched as H_q head slices; the group's repeats hit L1).
    """
    op = "hip_stage1"
    _check_common(op, keys, q, chunk, probe, hip_search_kernel)
    n_rows = keys.shape[0]
    n_chunks = -(-n_rows // chunk)
    rep = torch.empty(n_chunks, dtype=torch.long, device=q.device)
    score = torch.empty(n_chunks, dtype=torch.float32, device=q.device)
    if n_chunks == 0:
        return rep, score
    hip_search_kernel[(n_chunks, 1)](
        keys, keys, rep, q.contiguous(), rep, rep, score, n_chunks, 1, n_rows, 1, 0, 0,
        keys.stride(0), keys.stride(1), IMPLICIT=True, TABLE=0, PER_ROW=False,
        **kernel_meta(q.shape[0], keys.shape[1], keys.shape[2], chunk, probe), **_bias_args(op, bias, q),
    )
    return rep, score

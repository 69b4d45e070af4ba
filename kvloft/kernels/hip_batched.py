"""One HiP pruning stage for the rows of a batched decode step, in one launch.

kernels/hip_stage.py searches the chunks of one session's key store; a batched step of G
sessions would launch it G times per stage and layer. `hip_stage_batched` searches every
row's chunks in one launch: row g's store is found through its own run of base addresses in
one concatenated table, its chunks are its own candidate lists (or, at stage 1, its first
n_chunks[g] * CHUNK host rows), and its query is q[g]. Rows hold different numbers of
chunks; the grid is (max chunks, G) and a program past its row's count reads nothing (its
loads are masked off) and writes rep -1, score -inf.

The launch is kernels/hip_kernel.py's `hip_search_kernel` with PER_ROW meta: one program
per (chunk, row) runs the search `hip_stage` runs on one chunk (the same loads and the same
fp32 sums, so a row's scores equal its own launch's bit for bit): 2 * log2(CHUNK) probe rows of [H_kv, D] read per live chunk, plus its CHUNK ids.

HiP's rank="z" rows pass their z-scaled queries as q and a per-head bias [G, H_q] (the kernel's
HAS_BIAS: head h of row g scores q_gh · k - bias_gh); a row ranking by raw logits in the same
launch passes its query (as fp32) and a bias of 0, which scores exactly as without one. Without
a bias HAS_BIAS is off and the launch compiles as before.

8-bit host rows (CacheConfig.host_dtype; tiers/packed.py PackedRows): `table` then holds every
row's codes' chunk addresses (k0 a codes chunk) and `scale_table` their scales' chunk addresses
in the same order (the kernel finds a chunk's scales at the table position of its codes), and
`packed` is one row's rowquant.PackedChunks standing for all (format, model dtype, layout: every
row's store is of one kind). A probe dequantizes in registers as `hip_stage`'s does (CODES,
ROUND: kernels/hip_stage.py codes_args), so a row's scores still equal its own launch's.
Without `packed` the launch compiles as before.

`hip_stage_batched_reference` is the torch twin: each row through hip_stage_reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kvloft.kernels import checks
from kvloft.kernels.addresses import table_align
from kvloft.kernels.hip_kernel import hip_search_kernel
from kvloft.kernels.hip_stage import check_search, codes_args, hip_stage_reference, kernel_meta
from kvloft.kernels.rowquant import PackedChunks, code_dtype

__all__ = ["META_FIELDS", "hip_stage_batched", "hip_stage_batched_reference"]

META_FIELDS = ("n_chunks", "table_offset", "chunk_rows")  # rows of the [3, G] meta tensor


def _check(op: str, k0: Tensor, cand: Tensor | None, q: Tensor, meta: Tensor, chunk: int, probe: str,
           bias: Tensor | None, packed: PackedChunks | None) -> None:
    checks.require_batched_store(op, q, k0, hip_search_kernel, codes=packed is not None)
    checks.require_rows_device(op, q[0], keys=k0)
    g, hq, _ = q.shape
    check_search(op, chunk, probe)
    checks.require_row_meta(op, meta, META_FIELDS, q)
    if cand is not None and (cand.dim() != 3 or cand.shape[0] != g or cand.shape[2] != chunk
                             or cand.dtype != torch.int64 or cand.device != q.device or cand.stride(2) != 1):
        raise ValueError(f"{op}: cand must be [{g}, C, {chunk}] int64 on {q.device}, last dim contiguous, "
                         f"got {tuple(cand.shape)} {cand.dtype} on {cand.device}")
    if bias is not None and (bias.shape != (g, hq) or bias.dtype != torch.float32 or bias.device != q.device):
        raise ValueError(f"{op}: bias must be [{g}, {hq}] float32 on {q.device} (one per row and query head), "
                         f"got {tuple(bias.shape)} {bias.dtype} on {bias.device}")
    if packed is not None and (k0.dtype != code_dtype(packed.kind) or k0.shape != packed.codes[0].shape):
        raise ValueError(f"{op}: with 8-bit rows k0 must be a codes chunk {tuple(packed.codes[0].shape)} "
                         f"{code_dtype(packed.kind)} ({packed.kind}), got {tuple(k0.shape)} {k0.dtype}")


def hip_stage_batched(table: Tensor, k0: Tensor, q: Tensor, meta: Tensor, n_cols: int, chunk: int,
                      cand: Tensor | None = None, probe: str = "first", bias: Tensor | None = None,
                      packed: PackedChunks | None = None, scale_table: Tensor | None = None) -> tuple[Tensor, Tensor]:
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
    bias: None, or [G, H_q] fp32 on q's device subtracted from each row's head logits (rank="z":
        q then holds the z-scaled queries; a row without one passes 0).
    packed: None (float rows), or 8-bit rows: one row's PackedChunks standing for every row's
        (kind, model dtype, contiguous codes [R, H_kv, D] and fp32 scales [R, H_kv]); table then
        holds the codes' chunk addresses (PackedRows.pointer_table) and k0 is a codes chunk.
    scale_table: with packed, [T] int64 on q's device: every row's scales' chunk addresses
        (PackedRows.scale_table) in table's order.
    Returns (rep [G, n_cols] int64, score [G, n_cols] fp32), -1 / -inf past a row's n_chunks.
    """
    op = "hip_stage_batched"
    _check(op, k0, cand, q, meta, chunk, probe, bias, packed)
    if (packed is None) != (scale_table is None):
        raise ValueError(f"{op}: 8-bit rows need both packed and scale_table (float rows neither)")
    if scale_table is not None and scale_table.shape != table.shape:
        raise ValueError(f"{op}: scale_table must match table ({tuple(table.shape)}: one scales chunk per codes "
                         f"chunk, in order), got {tuple(scale_table.shape)}")
    codes = {} if packed is None else codes_args(op, packed, q[0], scale_table)
    g = q.shape[0]
    rep = torch.empty((g, n_cols), dtype=torch.long, device=q.device)
    score = torch.empty((g, n_cols), dtype=torch.float32, device=q.device)
    if n_cols == 0 or g == 0:
        return rep, score
    hq, d = q.shape[1], q.shape[2]
    stride_cg, stride_cc = (cand.stride(0), cand.stride(1)) if cand is not None else (0, 0)
    hip_search_kernel[(n_cols, g)](
        table, k0, cand if cand is not None else rep, q.contiguous(), meta.contiguous(), rep, score,
        n_cols, g, 0, 0, stride_cg, stride_cc, k0.stride(0), k0.stride(1),
        IMPLICIT=cand is None, TABLE=table_align(k0), PER_ROW=True, **kernel_meta(hq, k0.shape[1], d, chunk, probe),
        **({} if bias is None else {"bias_ptr": bias.contiguous(), "HAS_BIAS": True}), **codes,
    )
    return rep, score


def hip_stage_batched_reference(stores: Sequence[Sequence[Tensor] | PackedChunks], q: Tensor, n_chunks: Sequence[int],
                                n_cols: int, chunk: int, cand: Tensor | None = None,
                                probe: str = "first", bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Torch twin of `hip_stage_batched`: stores[g] row g's store chunks (or an 8-bit store's
    PackedChunks, probe rows dequantized: hip_stage_reference), q [G, H_q, D], n_chunks[g] its live
    chunks, cand and bias [G, H_q] as there -> (rep [G, n_cols], score [G, n_cols])."""
    g = q.shape[0]
    rep = torch.full((g, n_cols), -1, dtype=torch.long, device=q.device)
    score = torch.full((g, n_cols), float("-inf"), dtype=torch.float32, device=q.device)
    for j in range(g):
        m = n_chunks[j]
        if m == 0:
            continue
        rows = cand[j, :m] if cand is not None else torch.arange(m * chunk, device=q.device).view(m, chunk)
        rep[j, :m], score[j, :m] = hip_stage_reference(stores[j], rows, q[j], probe, None if bias is None else bias[j])
    return rep, score

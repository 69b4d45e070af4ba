"""Gather whole token rows of a chunked host store into a device buffer, zero-copy.

The host tier keeps K and V token-major in chunks (tiers/chunked.py), one token's
row [H_kv, D] contiguous. With CUDA, the chunks are pinned, so a GPU kernel can read
them through unified virtual addressing: only the selected rows cross PCIe, with no CPU
gather and no staging copy (measured on the H200: ~51 GB/s for 2 KB rows, close to the
link; a CPU gather + H2D copy reaches 19-42 GB/s).

`gather_rows` (Triton): program p copies rows p*BLOCK_R .. p*BLOCK_R + BLOCK_R - 1 of the
token list, reading each row's chunk base address from a table, so rows of any chunk
come in one launch. Traffic: read m * 2 * ROW * itemsize over PCIe (+ 8 bytes of token id
per row), write the same to device memory.
`gather_rows_reference` (torch) does the same on the CPU, chunk by chunk.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from kvloft.kernels import checks
from kvloft.kernels.addresses import rebase, table_align

__all__ = ["gather_rows", "gather_rows_reference"]


@triton.jit(do_not_specialize=["n", "chunk_rows"])
def _gather_rows_kernel(
    k_table,  # [C] int64 base addresses of the K chunks [chunk_rows, ROW]
    v_table,  # [C] int64 base addresses of the V chunks
    k0,  # the first K chunk (gives the element type)
    tokens,  # [n] int64 host rows to copy, each in [0, C * chunk_rows)
    out_k,  # [>= n, ROW] contiguous, on the device
    out_v,
    n,
    chunk_rows,
    ROW: tl.constexpr,  # elements per row: H_kv * D
    BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr,
    ALIGN: tl.constexpr,  # chunk bases lie a multiple of ALIGN elements from k0 (addresses.table_align)
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < n
    tok = tl.load(tokens + r, mask=rmask, other=0).to(tl.int64)
    chunk = tok // chunk_rows
    src_off = (tok - chunk * chunk_rows) * ROW  # [BLOCK_R] element offset inside the chunk
    kb = rebase(k0, tl.load(k_table + chunk, mask=rmask, other=0), ALIGN)  # [BLOCK_R] (kernels/addresses.py)
    vb = rebase(k0, tl.load(v_table + chunk, mask=rmask, other=0), ALIGN)
    dst_off = r.to(tl.int64) * ROW
    for e0 in range(0, ROW, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        m = rmask[:, None] & (e[None, :] < ROW)
        src = src_off[:, None] + e[None, :]
        dst = dst_off[:, None] + e[None, :]
        tl.store(out_k + dst, tl.load(kb[:, None] + src, mask=m), mask=m)
        tl.store(out_v + dst, tl.load(vb[:, None] + src, mask=m), mask=m)


def chunk_table(chunks: Sequence[Tensor]) -> list[int]:
    """Base addresses of the chunks (for the table argument of gather_rows)."""
    return [c.data_ptr() for c in chunks]


def _check(k_chunks: Sequence[Tensor], v_chunks: Sequence[Tensor], out_k: Tensor, out_v: Tensor) -> None:
    if not k_chunks or len(k_chunks) != len(v_chunks):
        raise ValueError(f"need one V chunk per K chunk and at least one, got {len(k_chunks)} and {len(v_chunks)}")
    shape = k_chunks[0].shape
    for c in (*k_chunks, *v_chunks):
        if c.shape != shape or c.dtype != k_chunks[0].dtype or not c.is_contiguous():
            raise ValueError(f"chunks must be contiguous [chunk_rows, H_kv, D] of one shape and dtype; "
                             f"got {tuple(c.shape)} {c.dtype} next to {tuple(shape)}")
    for name, o in (("out_k", out_k), ("out_v", out_v)):
        if o.shape[1:] != shape[1:] or o.dtype != k_chunks[0].dtype or not o.is_contiguous():
            raise ValueError(f"{name} must be contiguous [rows, {', '.join(map(str, shape[1:]))}] "
                             f"{k_chunks[0].dtype}, got {tuple(o.shape)} {o.dtype}")


def gather_rows(
    k_chunks: Sequence[Tensor], v_chunks: Sequence[Tensor], tokens: Tensor, out_k: Tensor, out_v: Tensor,
    *, tables: Tensor | None = None, block_r: int = 4, num_warps: int = 4,
) -> None:  # fmt: skip
    """out_k[:m], out_v[:m] = rows `tokens` [m] (int64, on out's device) of the stores.

    k_chunks, v_chunks: the stores' chunks [chunk_rows, H_kv, D] (pinned host memory
    with out on CUDA; or CPU tensors with TRITON_INTERPRET=1). tables: optional [2, C]
    int64 on out's device holding chunk_table(k_chunks), chunk_table(v_chunks) (lets the
    caller ship it with other indices in one copy). Ids are not range-checked here.
    """
    _check(k_chunks, v_chunks, out_k, out_v)
    checks.require_runnable(out_k.device, _gather_rows_kernel, "gather_rows")
    m = tokens.shape[0]
    if m > out_k.shape[0] or m > out_v.shape[0]:
        raise ValueError(f"gather_rows: {m} rows do not fit outputs of {out_k.shape[0]} rows")
    if m == 0:
        return
    if tables is None:
        tables = torch.tensor([chunk_table(k_chunks), chunk_table(v_chunks)], dtype=torch.int64)
        tables = tables.to(out_k.device)
    row = k_chunks[0][0].numel()
    block_e = min(checks.next_pow2(row), 1024)
    _gather_rows_kernel[(triton.cdiv(m, block_r),)](
        tables[0], tables[1], k_chunks[0], tokens, out_k, out_v, m, k_chunks[0].shape[0],
        ROW=row, BLOCK_R=block_r, BLOCK_E=block_e, ALIGN=table_align(k_chunks[0], v_chunks[0]), num_warps=num_warps,
    )  # fmt: skip


def gather_rows_reference(
    k_chunks: Sequence[Tensor], v_chunks: Sequence[Tensor], tokens: Tensor, out_k: Tensor, out_v: Tensor
) -> None:
    """Torch twin of gather_rows, on the chunks' device (CPU): rows grouped by chunk."""
    _check(k_chunks, v_chunks, out_k, out_v)
    m = tokens.shape[0]
    if m == 0:
        return
    cr = k_chunks[0].shape[0]
    tokens = tokens.to(k_chunks[0].device)
    if len(k_chunks) == 1:  # the common case: straight into the output, no temporary
        torch.index_select(k_chunks[0], 0, tokens, out=out_k[:m])
        torch.index_select(v_chunks[0], 0, tokens, out=out_v[:m])
        return
    cid = tokens // cr
    for c in torch.unique(cid).tolist():
        at = (cid == c).nonzero().squeeze(1)
        off = tokens[at] - c * cr
        out_k.index_copy_(0, at.to(out_k.device), k_chunks[c].index_select(0, off).to(out_k.device))
        out_v.index_copy_(0, at.to(out_v.device), v_chunks[c].index_select(0, off).to(out_v.device))

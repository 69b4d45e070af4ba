"""Copy B sequences' selected host rows into device buffers, every size fixed: capturable.

A captured decode step (runtime/whole_hip.py) keeps each HiP row's stable selection (its last
stage's mask) in a device buffer, refreshed only where that stage refreshes. The rows live in
the host tier's chunks (pinned on CUDA, read in place through unified addressing) named by a
table of base addresses, as attend_table_fixed reads them; which rows and how many are data:

    for b, r < counts[b]:  out_k[b, r] = K row ids[b, r] of sequence b's chunks
                           (chunk slot_base_b + id // slot_rows_b, row id % slot_rows_b); V alike

Grid (ceil(W / BLOCK_R), B): a program past its sequence's count reads and writes nothing, so
one launch serves every step (counts 0 where a sequence copies nothing this step), with no host
sync and no allocation. Traffic: counts[b] * 2 * H_kv * D * itemsize read over PCIe per
sequence, as much written. The row copy of scheduler/rowcopy.py gather_rows, batched and with
its count on the device. Reference: gather_fixed_reference (index_select per sequence).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from kvloft.kernels import checks
from kvloft.kernels.addresses import rebase, table_align

__all__ = ["gather_fixed", "gather_fixed_reference"]


@triton.jit
def _gather_fixed_kernel(
    k_table,  # [n_slots] int64 base addresses of K chunks [slot_rows, ROW]
    v_table,  # [n_slots] int64 base addresses of V chunks
    first,  # a tensor of the rows' layout (the element type; the base `rebase` counts from)
    ids,  # [B, >= W] int64 row ids, rows ID_STRIDE apart (not read past counts[b])
    counts,  # [B] int64 rows to copy per sequence (<= W)
    row_meta,  # [B, 5] int64: slot base, slot rows, ... (attend_table_fixed's layout)
    out_k,  # [B, W, ROW] contiguous
    out_v,
    W,
    ID_STRIDE,
    ROW: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr,
    ALIGN: tl.constexpr,
):
    p, b = tl.program_id(0), tl.program_id(1)
    n = tl.load(counts + b)
    if p * BLOCK_R < n:
        r = p * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = r < n
        tok = tl.load(ids + b * ID_STRIDE + r, mask=rmask, other=0).to(tl.int64)
        base = tl.load(row_meta + b * 5)
        rows = tl.load(row_meta + b * 5 + 1)
        chunk = tok // rows
        src = (tok - chunk * rows) * ROW  # [BLOCK_R] element offset inside the chunk
        kb = rebase(first, tl.load(k_table + base + chunk, mask=rmask, other=0), ALIGN)
        vb = rebase(first, tl.load(v_table + base + chunk, mask=rmask, other=0), ALIGN)
        dst = (b * W + r).to(tl.int64) * ROW
        for e0 in range(0, ROW, BLOCK_E):
            e = e0 + tl.arange(0, BLOCK_E)
            m = rmask[:, None] & (e[None, :] < ROW)
            tl.store(out_k + dst[:, None] + e[None, :], tl.load(kb[:, None] + src[:, None] + e[None, :], mask=m), mask=m)
            tl.store(out_v + dst[:, None] + e[None, :], tl.load(vb[:, None] + src[:, None] + e[None, :], mask=m), mask=m)


def gather_fixed(k_table: Tensor, v_table: Tensor, row_meta: Tensor, ids: Tensor, counts: Tensor, out_k: Tensor,
                 out_v: Tensor, like: Tensor, *, block_r: int = 4) -> None:
    """out_k[b, :counts[b]], out_v[b, :counts[b]] = the rows ids[b, :counts[b]] of sequence b's chunks.

    k_table, v_table: [n_slots] int64 chunk base addresses (host tier chunks [slot_rows, H_kv, D],
    pinned with out on CUDA; CPU tensors under TRITON_INTERPRET=1); row_meta: [B, 5] int64
    (slot base, slot rows, ...: attend_table_fixed's); ids: [B, W] int64, contiguous along W (a
    slice of a wider buffer will do); counts: [B] int64,
    each in [0, W] (not checked on the device: the caller clamps); out_k, out_v: [B, W, H_kv, D]
    contiguous in like's dtype; like: [rows, H_kv, D] of the chunks' layout. No host sync, no
    allocation: capturable."""
    op = "gather_fixed"
    checks.require_dim("out_k", out_k, 4, "[B, W, H_kv, D]")
    nb, w = out_k.shape[:2]
    if out_v.shape != out_k.shape or out_k.shape[2:] != like.shape[1:] or not out_k.is_contiguous() \
            or not out_v.is_contiguous() or out_k.dtype != like.dtype or out_v.dtype != like.dtype:
        raise ValueError(f"{op}: out_k, out_v must be contiguous [B, W, {', '.join(map(str, like.shape[1:]))}] "
                         f"{like.dtype}, got {tuple(out_k.shape)} {out_k.dtype}, {tuple(out_v.shape)} {out_v.dtype}")
    if ids.shape != (nb, w) or ids.dtype != torch.int64 or ids.stride(1) != 1:
        raise ValueError(f"{op}: ids must be [{nb}, {w}] int64 contiguous along W, got {ids.dtype} "
                         f"{tuple(ids.shape)} with strides {ids.stride()}")
    for name, t, shape in (("counts", counts, (nb,)), ("row_meta", row_meta, (nb, 5))):
        if t.shape != shape or t.dtype != torch.int64 or not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous {list(shape)} int64, got {t.dtype} {tuple(t.shape)}")
    if k_table.dtype != torch.int64 or v_table.dtype != torch.int64 or k_table.dim() != 1 or v_table.dim() != 1:
        raise ValueError(f"{op}: k_table, v_table must be [n_slots] int64 base addresses")
    checks.require_same_device(op, out_k, out_v=out_v, ids=ids, counts=counts, row_meta=row_meta, k_table=k_table,
                               v_table=v_table)
    checks.require_runnable(out_k.device, _gather_fixed_kernel, op)
    if nb == 0 or w == 0:
        return
    row = like[0].numel()
    _gather_fixed_kernel[(triton.cdiv(w, block_r), nb)](
        k_table, v_table, like, ids, counts, row_meta, out_k, out_v, w, ids.stride(0),
        ROW=row, BLOCK_R=block_r, BLOCK_E=min(checks.next_pow2(row), 1024), ALIGN=table_align(like), num_warps=4,
    )  # fmt: skip


def gather_fixed_reference(k_chunks: Sequence[Sequence[Tensor]], v_chunks: Sequence[Sequence[Tensor]], ids: Tensor,
                           counts: Sequence[int], out_k: Tensor, out_v: Tensor) -> None:
    """Torch twin of gather_fixed: sequence b's chunks k_chunks[b] (each [slot_rows, H_kv, D])
    concatenated, its first counts[b] ids selected."""
    for b, n in enumerate(counts):
        if n:
            rows = ids[b, :n].to(k_chunks[b][0].device)
            out_k[b, :n] = torch.cat(list(k_chunks[b])).index_select(0, rows).to(out_k.device)
            out_v[b, :n] = torch.cat(list(v_chunks[b])).index_select(0, rows).to(out_v.device)

"""q·K scoring of the rows of a batched decode step in one launch (the exact retriever's scan).

kernels/scoring.py scores one decode token's query against one chunk of a session's key copy;
a batched step of G sessions would launch it G x (chunks) times per layer. `score_batched`
scores every row's keys in one launch: row g's keys are its own store (chunks of chunk_rows[g]
token-major rows, found through its run of one address table), its query q[g], its length
n_keys[g]; the GQA group is folded in registers ("max" or "sum") as there, or kept ("none":
every query head's logits, head h = kv_head * group + g as scoring.py stores them). One row
over one store's chunks is the scan of a whole chunked key mirror in one launch
(index/key_scan.py).

Grid (H_kv, cdiv(n_cols, BLOCK_N), G): program (h, b, g) reads BLOCK_N rows of KV head h of
row g once for all G_q query heads (the same tl.dot over the same blocks as scoring.py's kernel
when chunk_rows is a multiple of BLOCK_N, so a row's scores equal its own launches' bit for
bit). Positions past a row's n_keys score -inf. Reads sum(n_keys) * H_kv * D * itemsize, writes
G * H_kv * n_cols * 4 bytes (G * H_q * n_cols * 4 with reduce "none").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kvloft.kernels import checks
from kvloft.kernels.addresses import rebase, table_align
from kvloft.kernels.scoring import BLOCK_N, REDUCE_CODES, load_group_queries, reduce_group_scores

__all__ = ["score_batched", "score_batched_reference"]


@triton.jit(do_not_specialize=["n_cols", "n_group", "group"])
def _score_batched_kernel(
    q,  # [G, H_q, D] contiguous
    table_ptr,  # [T] int64 base addresses of every row's store chunks [chunk_rows, H_kv, D]
    k0_ptr,  # a store chunk (for the element type)
    meta_ptr,  # [3, G] int64 contiguous: n_keys, table_offset, chunk_rows of each row
    scores,  # [G, H_kv, n_cols] (REDUCE 1, 2) or [G, H_q, n_cols] (REDUCE 0) fp32 out, contiguous
    n_cols,
    n_group,
    group,
    scale,
    stride_kn,
    stride_kh,
    REDUCE: tl.constexpr,  # 0 none, 1 max, 2 sum over the group's query heads
    HEAD_DIM: tl.constexpr,
    H_KV: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ALIGN: tl.constexpr,  # chunk bases are a multiple of ALIGN elements apart (addresses.table_align)
):
    tl.static_assert(BLOCK_G >= 16)
    tl.static_assert(BLOCK_N >= 16)
    tl.static_assert(BLOCK_D >= 16)
    kv_head = tl.program_id(0)
    row = tl.program_id(2).to(tl.int64)
    n_keys = tl.load(meta_ptr + row)
    tb = tl.load(meta_ptr + n_group + row)
    chunk_rows = tl.load(meta_ptr + 2 * n_group + row)
    pos = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    qb, q_heads, gmask, d, dmask = load_group_queries(q + row * (H_KV * group * HEAD_DIM), kv_head, group,
                                                      HEAD_DIM, HEAD_DIM, BLOCK_G, BLOCK_D)
    valid = pos < n_keys
    safe = tl.where(valid, pos, 0)
    addr = tl.load(table_ptr + tb + safe // chunk_rows, mask=valid, other=0)
    base = rebase(k0_ptr, addr, ALIGN)  # [BLOCK_N] chunk bases (vector loads: kernels/addresses.py)
    k_ptr = base[:, None] + ((safe % chunk_rows) * stride_kn + kv_head.to(tl.int64) * stride_kh)[:, None] + d[None, :]
    kb = tl.load(k_ptr, mask=valid[:, None] & dmask[None, :], other=0.0)
    s = tl.dot(qb, tl.trans(kb), input_precision="ieee") * scale  # [BLOCK_G, BLOCK_N]
    if REDUCE == 0:  # every query head's row of logits
        s = tl.where(valid[None, :], s, float("-inf"))
        out = scores + (row * H_KV * group + q_heads.to(tl.int64))[:, None] * n_cols + pos[None, :]
        tl.store(out, s, mask=gmask[:, None] & (pos < n_cols)[None, :])
    else:
        r = tl.where(valid, reduce_group_scores(s, gmask, REDUCE), float("-inf"))
        out = scores + (row * H_KV + kv_head) * n_cols + pos
        tl.store(out, r, mask=pos < n_cols)


def score_batched(q: Tensor, table: Tensor, k0: Tensor, meta: Tensor, n_cols: int, *, reduce: str = "max",
                  scale: float = 1.0) -> Tensor:
    """Scores of every row's keys: q [G, H_q, D]; table [T] int64 on q's device, every row's
    store chunk addresses end to end; k0 a store chunk [chunk_rows, H_kv, D] whose dtype and
    strides every row's chunks share (on q's device, or pinned host memory); meta [3, G] int64
    on q's device: n_keys (above n_cols: rows to n_cols rounded up to BLOCK_N are read, columns
    past n_cols not written), table_offset, chunk_rows (a multiple of BLOCK_N) of each row. Returns [G, H_kv, n_cols] fp32 group-reduced ("max", "sum") or
    [G, H_q, n_cols] per query head ("none"), -inf past a row's n_keys."""
    op = "score_batched"
    checks.require_batched_store(op, q, k0, _score_batched_kernel)
    g_n, hq, d = q.shape
    hkv = k0.shape[1]
    if reduce not in REDUCE_CODES:
        raise ValueError(f"{op}: reduce must be 'none', 'max' or 'sum', got {reduce!r}")
    checks.require_row_meta(op, meta, ("n_keys", "table_offset", "chunk_rows"), q)
    out = torch.empty((g_n, hq if reduce == "none" else hkv, n_cols), dtype=torch.float32, device=q.device)
    if n_cols == 0 or g_n == 0:
        return out
    group = hq // hkv
    _score_batched_kernel[(hkv, triton.cdiv(n_cols, BLOCK_N), g_n)](
        q.to(k0.dtype).contiguous(), table, k0, meta.contiguous(), out, n_cols, g_n, group, float(scale),
        k0.stride(0), k0.stride(1), REDUCE=REDUCE_CODES[reduce], HEAD_DIM=d, H_KV=hkv,
        BLOCK_G=max(16, checks.next_pow2(group)), BLOCK_N=BLOCK_N, BLOCK_D=max(16, checks.next_pow2(d)),
        ALIGN=table_align(k0),
    )
    return out


def score_batched_reference(q: Tensor, keys: list[Tensor], n_cols: int, *, reduce: str = "max",
                            scale: float = 1.0) -> Tensor:
    """Torch twin: keys[g] row g's keys [n_g, H_kv, D] (n_g <= n_cols) -> [G, H_kv, n_cols] fp32
    ([G, H_q, n_cols] with reduce "none"), -inf padded."""
    from kvloft.kernels import reference

    hkv = keys[0].shape[1]
    heads = q.shape[1] if reduce == "none" else hkv
    out = torch.full((q.shape[0], heads, n_cols), float("-inf"), dtype=torch.float32, device=q.device)
    for g, k in enumerate(keys):
        s = reference.score(q[g].float(), k.float(), scale=scale)  # [H_q, n_g]
        out[g, :, : k.shape[0]] = s if reduce == "none" else reference.reduce_group(s, hkv, reduce)
    return out

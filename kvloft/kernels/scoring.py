"""q·K scoring with top-k, in Triton (the scan of exact and candidate-rescoring retrievers).

A kernel computes the logits of one decode token's query heads over token-major keys
k_rows [N, H_kv, D] (all N rows, or the candidate rows ids [M]) and, for reduce="max" /
"sum", folds the G = H_q / H_kv query heads of each GQA group in registers, so only
[H_kv, N] scores reach memory; torch.topk then picks the best.

Grid (H_kv, cdiv(M, BLOCK_N)): program (h, b) reads BLOCK_N key rows of KV head h once
for all G query heads (a tensor-core dot with G padded to BLOCK_G >= 16).
Memory traffic: read M*H_kv*D*itemsize (+ M*idx_bytes per KV head with ids), write
M*H_kv*4 bytes (reduced) or M*H_q*4 (reduce="none"); topk reads the scores once more.
Reference: kernels/reference.py `score_topk`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kvloft.kernels import checks

__all__ = ["score", "score_topk"]

REDUCE_CODES = {"none": 0, "max": 1, "sum": 2}
BLOCK_N = 64  # key rows per program
NUM_WARPS = 4


@triton.jit
def load_group_queries(q_ptr, kv_head, group, stride_qh, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    # The query heads of KV head kv_head's GQA group from q [H_q, D] at q_ptr: a [BLOCK_G, BLOCK_D]
    # tile (zero past the group and past HEAD_DIM), their head ids, and the row and column masks.
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    gmask = g < group
    dmask = d < HEAD_DIM
    q_heads = kv_head * group + g
    qb = tl.load(q_ptr + q_heads[:, None] * stride_qh + d[None, :], mask=gmask[:, None] & dmask[None, :], other=0.0)
    return qb, q_heads, gmask, d, dmask


@triton.jit
def reduce_group_scores(s, gmask, REDUCE: tl.constexpr):
    # [BLOCK_G, BLOCK_N] scores -> [BLOCK_N]: max (REDUCE 1) or sum (2) over the group's query heads
    if REDUCE == 1:
        r = tl.max(tl.where(gmask[:, None], s, float("-inf")), 0)
    else:
        r = tl.sum(tl.where(gmask[:, None], s, 0.0), 0)
    return r


@triton.jit(do_not_specialize=["n_keys", "group"])  # sizes: no recompiles per length
def _score_kernel(
    q,  # [H_q, D], last dim contiguous
    k,  # [N, H_kv, D], last dim contiguous
    ids,  # [M] int32/int64 candidate rows (unused when not HAS_IDS)
    scores,  # [H_q, M] (REDUCE == 0) or [H_kv, M] fp32, contiguous
    n_keys,  # M
    group,
    scale,
    stride_qh,
    stride_kn,
    stride_kh,
    HAS_IDS: tl.constexpr,
    REDUCE: tl.constexpr,  # 0 none, 1 max, 2 sum over the group's query heads
    HEAD_DIM: tl.constexpr,  # a constant, so the d-mask keeps 16-byte vector loads
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tl.static_assert(BLOCK_G >= 16)  # tl.dot needs every dimension >= 16
    tl.static_assert(BLOCK_N >= 16)
    tl.static_assert(BLOCK_D >= 16)
    kv_head = tl.program_id(0)
    pos = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    qb, q_heads, gmask, d, dmask = load_group_queries(q, kv_head, group, stride_qh, HEAD_DIM, BLOCK_G, BLOCK_D)
    valid = pos < n_keys
    if HAS_IDS:
        rows = tl.load(ids + pos, mask=valid, other=0).to(tl.int64)
    else:
        rows = pos.to(tl.int64)
    k_ptr = k + kv_head.to(tl.int64) * stride_kh + rows[:, None] * stride_kn + d[None, :]
    kb = tl.load(k_ptr, mask=valid[:, None] & dmask[None, :], other=0.0)
    s = tl.dot(qb, tl.trans(kb), input_precision="ieee") * scale  # [BLOCK_G, BLOCK_N]
    pos64 = pos.to(tl.int64)
    if REDUCE == 0:
        out_ptr = scores + q_heads.to(tl.int64)[:, None] * n_keys + pos64[None, :]
        tl.store(out_ptr, s, mask=gmask[:, None] & valid[None, :])
    else:
        r = reduce_group_scores(s, gmask, REDUCE)
        tl.store(scores + kv_head.to(tl.int64) * n_keys + pos64, r, mask=valid)


def _validate(q: Tensor, k_rows: Tensor, reduce: str, ids: Tensor | None) -> None:
    checks.require_dim("q", q, 2, "[H_q, D] (one decode token)")
    checks.require_dim("k_rows", k_rows, 3, "[N, H_kv, D] (token-major)")
    checks.require_float("q", q)
    checks.require_float("k_rows", k_rows, q.dtype)
    hq, d = q.shape
    hkv = k_rows.shape[1]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"score_topk: query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if k_rows.shape[2] != d:
        raise ValueError(f"score_topk: q has head dim {d} but k_rows has {k_rows.shape[2]}")
    if reduce not in REDUCE_CODES:
        raise ValueError(f"reduce must be 'none', 'max' or 'sum', got {reduce!r}")
    checks.require_runnable(q.device, _score_kernel, "score_topk")
    checks.require_same_device("score_topk", q, k_rows=k_rows)
    checks.require_last_dim_contiguous("k_rows", k_rows)
    if ids is not None:
        checks.require_index("ids", ids)
        checks.require_dim("ids", ids, 1, "[M] (candidate rows shared by all heads)")
        checks.require_same_device("score_topk", q, ids=ids)


def score(
    q: Tensor, k_rows: Tensor, *, reduce: str = "none", scale: float = 1.0, ids: Tensor | None = None,
    check_ids: bool | None = None, block_n: int = BLOCK_N, num_warps: int = NUM_WARPS,
) -> Tensor:  # fmt: skip
    """Scores only: q [H_q, D], k_rows [N, H_kv, D] -> [H_q, M] ("none") or [H_kv, M] fp32.

    M = N, or len(ids) over the rows k_rows[ids]. Arguments as in score_topk; block_n (a power
    of two >= 16) and num_warps shape the launch, for bench/score_speed.py.
    """
    _validate(q, k_rows, reduce, ids)
    if ids is not None and checks.want_id_check(check_ids, ids):
        checks.check_ids_range("score", ids, k_rows.shape[0], allow_padding=False)
    hq, d = q.shape
    hkv = k_rows.shape[1]
    m = k_rows.shape[0] if ids is None else ids.shape[0]
    out = torch.empty((hq if reduce == "none" else hkv, m), dtype=torch.float32, device=q.device)
    if m == 0:
        return out
    if d == 0:
        return out.zero_()
    q = q.contiguous()
    group = hq // hkv
    _score_kernel[(hkv, triton.cdiv(m, block_n))](
        q, k_rows, ids.contiguous() if ids is not None else q, out,
        m, group, float(scale), q.stride(0), k_rows.stride(0), k_rows.stride(1),
        HAS_IDS=ids is not None, REDUCE=REDUCE_CODES[reduce], HEAD_DIM=d,
        BLOCK_G=max(16, checks.next_pow2(group)), BLOCK_N=block_n, BLOCK_D=max(16, checks.next_pow2(d)),
        num_warps=num_warps,
    )  # fmt: skip
    return out


def score_topk(
    q: Tensor,
    k_rows: Tensor,
    topk: int,
    *,
    reduce: str = "max",
    scale: float = 1.0,
    ids: Tensor | None = None,
    check_ids: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """q·K scores and the top-k keys.

    q [H_q, D]; k_rows [N, H_kv, D]; ids optional [M] shared candidate rows (int32/int64).
    reduce: "none" -> per query head ([H_q, k]); "max"/"sum" -> per KV head ([H_kv, k]).
    check_ids: verify 0 <= ids < N (None = only for ids on the CPU; on CUDA it syncs).
    Returns (scores fp32, ids int64) sorted by descending score; ids index k_rows.
    """
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 0:
        raise ValueError(f"score_topk: topk must be a non-negative int, got {topk!r}")
    s = score(q, k_rows, reduce=reduce, scale=scale, ids=ids, check_ids=check_ids)
    vals, idx = torch.topk(s, min(topk, s.shape[1]), dim=-1)
    if ids is not None:
        idx = ids.long()[idx]
    return vals, idx

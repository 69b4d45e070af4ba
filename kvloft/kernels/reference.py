"""Pure-torch reference ops. Every Triton kernel is tested against these.

Layout conventions (DESIGN.md, Tiers): keys and values are token-major,
`[T, H_kv, D]`; queries `[T, H_q, D]` (or `[H_q, D]` for one decode token).
GQA: query head h reads KV head h // (H_q // H_kv).
Every attention op returns `(out, lse)`: out in the query's dtype, lse in fp32,
natural log of the softmax denominator (of the scaled logits). An empty set of
keys gives out = 0 and lse = -inf, which `merge` treats as "no contribution".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

NEG_INF = float("-inf")


def _expand_kv(x: Tensor, group: int) -> Tensor:
    # x: [T, H_kv, D] -> [H_q, T, D] with each KV head repeated for its group
    return x.transpose(0, 1).repeat_interleave(group, dim=0)


def attend(q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: bool = False) -> tuple[Tensor, Tensor]:
    """Softmax attention of Tq queries over Tk keys.

    q: [Tq, H_q, D]; k, v: [Tk, H_kv, D].
    causal: queries are the last Tq positions of the keys; query i sees keys j <= Tk - Tq + i.
    Returns out [Tq, H_q, D] (q.dtype), lse [Tq, H_q] fp32.
    """
    tq, hq, d = q.shape
    tk, hkv = k.shape[0], k.shape[1]
    if tk == 0:
        return q.new_zeros(q.shape), torch.full((tq, hq), NEG_INF, dtype=torch.float32, device=q.device)
    group = hq // hkv
    qf = q.float().transpose(0, 1)  # [H_q, Tq, D]
    kf = _expand_kv(k.float(), group)  # [H_q, Tk, D]
    vf = _expand_kv(v.float(), group)
    logits = torch.matmul(qf, kf.transpose(1, 2)) * scale  # [H_q, Tq, Tk]
    if causal:
        i = torch.arange(tq, device=q.device)[:, None]
        j = torch.arange(tk, device=q.device)[None, :]
        logits = logits.masked_fill(j > (tk - tq + i), NEG_INF)
    lse = torch.logsumexp(logits, dim=-1)  # [H_q, Tq]
    p = torch.exp(logits - lse.clamp_min(torch.finfo(torch.float32).min)[..., None])
    out = torch.matmul(p, vf)  # [H_q, Tq, D]
    return out.transpose(0, 1).to(q.dtype), lse.transpose(0, 1).contiguous()


def decode_attend(q: Tensor, k: Tensor, v: Tensor, *, scale: float) -> tuple[Tensor, Tensor]:
    """One query token over contiguous keys. q [H_q, D]; k, v [T, H_kv, D] -> (out [H_q, D], lse [H_q])."""
    out, lse = attend(q[None], k, v, scale=scale)
    return out[0], lse[0]


def gather_kv(rows: Tensor, ids: Tensor) -> Tensor:
    """Pick rows of a token-major buffer.

    rows: [N, H_kv, D]; ids: [H_kv, n] (per KV head) or [n] (shared) int64, -1 = padding.
    Returns [n, H_kv, D]; padded entries are zero.
    """
    hkv = rows.shape[1]
    if ids.dim() == 1:
        ids = ids[None].expand(hkv, -1)
    safe = ids.clamp_min(0)
    heads = torch.arange(hkv, device=rows.device)[:, None].expand_as(ids)
    out = rows[safe, heads]  # [H_kv, n, D]
    out = out.masked_fill((ids < 0)[..., None], 0)
    return out.transpose(0, 1)


def gather_attend(
    q: Tensor, k_rows: Tensor, v_rows: Tensor, ids: Tensor, *, scale: float
) -> tuple[Tensor, Tensor]:
    """One query over rows picked by index lists.

    q: [H_q, D]; k_rows, v_rows: [N, H_kv, D]; ids: [H_kv, n] or [n] int64 (-1 = padding,
    ignored). Returns (out [H_q, D], lse [H_q] fp32).
    """
    hq, d = q.shape
    hkv = k_rows.shape[1]
    group = hq // hkv
    if ids.dim() == 1:
        ids = ids[None].expand(hkv, -1)
    if ids.shape[1] == 0:
        return q.new_zeros(q.shape), torch.full((hq,), NEG_INF, dtype=torch.float32, device=q.device)
    k = gather_kv(k_rows, ids).float().transpose(0, 1).repeat_interleave(group, 0)  # [H_q, n, D]
    v = gather_kv(v_rows, ids).float().transpose(0, 1).repeat_interleave(group, 0)
    logits = torch.einsum("hd,hnd->hn", q.float(), k) * scale
    logits = logits.masked_fill((ids < 0).repeat_interleave(group, 0), NEG_INF)
    lse = torch.logsumexp(logits, dim=-1)
    p = torch.exp(logits - lse.clamp_min(torch.finfo(torch.float32).min)[:, None])
    out = torch.einsum("hn,hnd->hd", p, v)
    return out.to(q.dtype), lse


def merge(outs: Sequence[Tensor], lses: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Exact log-sum-exp merge of partial attentions over disjoint key sets.

    outs: each [..., D]; lses: each [...] fp32 (-inf = empty part).
    out = sum_i exp(lse_i - lse) * out_i,  lse = logsumexp_i lse_i.
    """
    if len(outs) != len(lses) or not outs:
        raise ValueError("merge needs one lse per output and at least one part")
    lse_all = torch.stack([x.float() for x in lses])  # [P, ...]
    lse = torch.logsumexp(lse_all, dim=0)
    # all parts empty -> lse = -inf; weights are then 0 instead of NaN
    w = torch.exp(lse_all - lse.clamp_min(torch.finfo(torch.float32).min)[None])
    w = torch.nan_to_num(w, nan=0.0)
    out = sum(wi[..., None] * o.float() for wi, o in zip(w, outs))
    return out.to(outs[0].dtype), lse


def score(q: Tensor, k_rows: Tensor, *, scale: float = 1.0, ids: Tensor | None = None) -> Tensor:
    """Logits of each query head over keys: q [H_q, D], k_rows [N, H_kv, D] -> [H_q, N] fp32.

    With ids [M] (shared candidates) the result is [H_q, M] over k_rows[ids].
    """
    hq = q.shape[0]
    hkv = k_rows.shape[1]
    group = hq // hkv
    keys = k_rows if ids is None else k_rows[ids]
    kf = keys.float().transpose(0, 1).repeat_interleave(group, 0)  # [H_q, N, D]
    return torch.einsum("hd,hnd->hn", q.float(), kf) * scale


def reduce_group(scores: Tensor, n_kv_heads: int, how: str) -> Tensor:
    """[H_q, N] -> [H_kv, N]: combine the query heads of each GQA group by max or sum."""
    hq, n = scores.shape
    g = scores.view(n_kv_heads, hq // n_kv_heads, n)
    if how == "max":
        return g.amax(dim=1)
    if how == "sum":
        return g.sum(dim=1)
    raise ValueError(f"reduce must be 'max' or 'sum', got {how!r}")


def score_topk(
    q: Tensor,
    k_rows: Tensor,
    topk: int,
    *,
    reduce: str = "max",
    scale: float = 1.0,
    ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """q·K scores and the top-k keys.

    q [H_q, D]; k_rows [N, H_kv, D]; ids optional [M] shared candidate rows.
    reduce: "none" -> per query head ([H_q, k]); "max"/"sum" -> per KV head ([H_kv, k]).
    Returns (scores fp32, ids int64) sorted by descending score; ids index k_rows.
    """
    s = score(q, k_rows, scale=scale, ids=ids)
    if reduce != "none":
        s = reduce_group(s, k_rows.shape[1], reduce)
    k = min(topk, s.shape[1])
    vals, idx = torch.topk(s, k, dim=-1)
    if ids is not None:
        idx = ids[idx]
    return vals, idx

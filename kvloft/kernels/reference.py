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
# ATen's flash attention for CPU tensors, which also returns the log-sum-exp (None if absent)
_FUSED_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _acc(x: Tensor) -> Tensor:
    """Accumulate in fp32, or in fp64 when the input is fp64 (oracles)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _expand_kv(x: Tensor, group: int) -> Tensor:
    # x: [T, H_kv, D] -> [H_q, T, D] with each KV head repeated for its group
    return x.transpose(0, 1).repeat_interleave(group, dim=0)


def attend(q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: bool = False) -> tuple[Tensor, Tensor]:
    """Softmax attention of Tq queries over Tk keys.

    q: [Tq, H_q, D]; k, v: [Tk, H_kv, D].
    causal: queries are the last Tq positions of the keys; query i sees keys j <= Tk - Tq + i.
    Returns out [Tq, H_q, D] (q.dtype), lse [Tq, H_q] fp32.

    CPU tensors in fp32/bf16/fp16 go through ATen's fused flash attention for the CPU
    (`_attend_fused_cpu`: no [Tq, Tk] logits in memory, K and V read in place, one parallel
    region instead of one per elementwise op); everything else (fp64 oracles, CUDA tensors)
    through `attend_math`.
    """
    tq, tk = q.shape[0], k.shape[0]
    if _fused_cpu_ok(q, k, v) and tq > 0 and tk > 0 and not (causal and tq > tk):
        if not causal or tq == tk:
            return _attend_fused_cpu(q, k, v, scale, causal)
        # ATen's causal mask aligns the first query with the first key: the keys before the
        # queries go unmasked, the last Tq (a square) under its mask, the two merged exactly
        o1, l1 = _attend_fused_cpu(q, k[: tk - tq], v[: tk - tq], scale, False)
        o2, l2 = _attend_fused_cpu(q, k[tk - tq :], v[tk - tq :], scale, True)
        return merge([o1, o2], [l1, l2])
    return attend_math(q, k, v, scale=scale, causal=causal)


def _fused_cpu_ok(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """q [..., H_q, D] (Tq tokens or one), k, v [T, H_kv, D]: ATen's CPU flash attention takes them."""
    return (q.device.type == "cpu" and k.device.type == "cpu" and v.device.type == "cpu"
            and q.dtype in (torch.float32, torch.bfloat16, torch.float16) and k.dtype == v.dtype == q.dtype
            and q.shape[-2] % k.shape[1] == 0 and _FUSED_CPU is not None)


def _attend_fused_cpu(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    """ATen's CPU flash attention (causal: top-left, callers pass square blocks).

    q [Tq, H_q, D], k, v [Tk, H_kv, D] (any strides) -> out [Tq, H_q, D], lse [Tq, H_q] fp32.
    K and V are never copied: the KV heads are the batch dimension. Without a mask, all the
    queries of a KV head's group are rows of one head ([H_kv, 1, g*Tq, D]), so each K and V
    block is read once per KV head rather than once per query head (a decode token over 6K
    keys: ~5x faster than the per-head layout on one core). Causal, the group is the head
    dimension (each row's mask follows its own position) and K, V are expanded over it with
    stride 0.
    """
    tq, hq, d = q.shape
    tk, hkv = k.shape[0], k.shape[1]
    g = hq // hkv
    qb = q.view(tq, hkv, g, d).permute(1, 2, 0, 3)  # [H_kv, g, Tq, D]
    kb, vb = k.transpose(0, 1)[:, None], v.transpose(0, 1)[:, None]  # [H_kv, 1, Tk, D]
    if causal:
        kb, vb = kb.expand(hkv, g, tk, d), vb.expand(hkv, g, tk, d)  # stride 0 over g
    else:
        qb = qb.reshape(hkv, 1, g * tq, d)  # a copy only when Tq > 1 (the queries, not K, V)
    out, lse = _FUSED_CPU(qb, kb, vb, 0.0, causal, scale=scale)  # [H_kv, g or 1, (g*)Tq, D], lse alike
    out, lse = out.view(hkv, g, tq, d), lse.view(hkv, g, tq)
    return out.permute(2, 0, 1, 3).reshape(tq, hq, d), lse.permute(2, 0, 1).reshape(tq, hq).float()


def attend_math(q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: bool = False) -> tuple[Tensor, Tensor]:
    """`attend` written out in torch (the [Tq, Tk] logits materialized, fp32 or fp64): the
    oracle the fused routes are tested against. Same arguments and results."""
    tq, hq, d = q.shape
    tk, hkv = k.shape[0], k.shape[1]
    if tk == 0:
        return q.new_zeros(q.shape), torch.full((tq, hq), NEG_INF, dtype=torch.float32, device=q.device)
    g = hq // hkv
    # group the query heads of each KV head: K and V are read once per group, never copied
    qf = _acc(q).view(tq, hkv, g, d).permute(1, 2, 0, 3).reshape(hkv, g * tq, d)  # [H_kv, g*Tq, D]
    kf = _acc(k).transpose(0, 1)  # [H_kv, Tk, D]
    vf = _acc(v).transpose(0, 1)
    logits = torch.bmm(qf, kf.transpose(1, 2)).mul_(scale).view(hkv, g, tq, tk)
    if causal:
        i = torch.arange(tq, device=q.device)[:, None]
        j = torch.arange(tk, device=q.device)[None, :]
        logits.masked_fill_(j > (tk - tq + i), NEG_INF)
    lse = torch.logsumexp(logits, dim=-1)  # [H_kv, g, Tq]
    p = logits.sub_(lse.clamp_min(torch.finfo(lse.dtype).min)[..., None]).exp_()
    out = torch.bmm(p.view(hkv, g * tq, tk), vf).view(hkv, g, tq, d)
    out = out.permute(2, 0, 1, 3).reshape(tq, hq, d)
    return out.to(q.dtype), lse.permute(2, 0, 1).reshape(tq, hq).contiguous()


def decode_attend(q: Tensor, k: Tensor, v: Tensor, *, scale: float) -> tuple[Tensor, Tensor]:
    """One query token over contiguous keys. q [H_q, D]; k, v [T, H_kv, D] -> (out [H_q, D], lse [H_q]).

    fp32 on the CPU, K and V contiguous: the compiled kernel of kernels/cpu_attend.py (each
    token-major row read once, every head at once, where ATen's flash attention reads the
    strided view a head at a time; figures there). Other CPU dtypes straight into ATen's flash attention, each KV head's
    group of queries the rows of one head ([H_kv, 1, g, D], as _attend_fused_cpu lays out one
    token): a dense decode step calls this once per layer, so the dozen reshapes of the general
    path are skipped."""
    hq, d = q.shape
    tk, hkv = k.shape[0], k.shape[1]
    if tk and q.dtype == torch.float32 and q.device.type == "cpu":
        from kvloft.kernels import cpu_attend  # numba loads only where it is used

        if cpu_attend.enabled and cpu_attend.applies(q, k, v):
            return cpu_attend.decode_attend_unchecked(q, k, v, scale)
    if tk and _fused_cpu_ok(q, k, v):
        out, lse = _FUSED_CPU(q.reshape(hkv, 1, hq // hkv, d), k.transpose(0, 1)[:, None], v.transpose(0, 1)[:, None],
                              0.0, False, scale=scale)
        return out.reshape(hq, d), lse.reshape(hq).float()
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


def rotate_keys(k: Tensor, delta: Tensor, inv_freq: Tensor) -> Tensor:
    """Move RoPE-rotated keys to new positions: rotate each key by `delta` positions.

    RoPE is a rotation by angle pos * theta, so a key stored at position p moves to
    p + delta by one more rotation (HF rotate-half layout, theta = inv_freq repeated):
        k' = k * cos(delta * theta) + rotate_half(k) * sin(delta * theta).
    k: [n, H_kv, D]; delta: [n] (all heads) or [H_kv, n] int64 positions; inv_freq: [D/2]
    fp32 (the model's `inv_freq`). Angles in fp64 (exact at 1M positions), products in
    fp32 (fp64 for fp64 keys); returns [n, H_kv, D] in k's dtype (one rounding).
    """
    n, hkv, d = k.shape
    if d % 2 or inv_freq.shape != (d // 2,):
        raise ValueError(f"rotate_keys: inv_freq must be [D/2={d // 2}] for head dim {d} (even), "
                         f"got {tuple(inv_freq.shape)}")
    if delta.shape not in ((n,), (hkv, n)):
        raise ValueError(f"rotate_keys: delta must be [n={n}] or [H_kv={hkv}, n={n}], got {tuple(delta.shape)}")
    delta = delta[None].expand(hkv, -1) if delta.dim() == 1 else delta
    ang = delta.t().to(k.device, torch.float64)[..., None] * inv_freq.to(k.device, torch.float64)  # [n, H_kv, D/2]
    kf = _acc(k)
    cos, sin = ang.cos().to(kf.dtype), ang.sin().to(kf.dtype)
    x1, x2 = kf.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(k.dtype)


def gather_attend(
    q: Tensor, k_rows: Tensor, v_rows: Tensor, ids: Tensor, *, scale: float,
    rot_delta: Tensor | None = None, inv_freq: Tensor | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """One query over rows picked by index lists.

    q: [H_q, D]; k_rows, v_rows: [N, H_kv, D]; ids: [H_kv, n] or [n] int64 (-1 = padding,
    ignored). Returns (out [H_q, D], lse [H_q] fp32).
    rot_delta: optional [H_kv, n] or [n] int64, aligned with ids: each gathered key is
    rotated by that many positions first (see rotate_keys; needs inv_freq [D/2] fp32).
    """
    hq, d = q.shape
    hkv = k_rows.shape[1]
    group = hq // hkv
    if (rot_delta is None) != (inv_freq is None):
        raise ValueError("gather_attend: pass rot_delta and inv_freq together (or neither)")
    if ids.dim() == 1:
        ids = ids[None].expand(hkv, -1)
    if ids.shape[1] == 0:
        return q.new_zeros(q.shape), torch.full((hq,), NEG_INF, dtype=torch.float32, device=q.device)
    kg = _acc(gather_kv(k_rows, ids))  # [n, H_kv, D]
    if rot_delta is not None:
        if rot_delta.shape[-1] != ids.shape[1]:
            raise ValueError(f"gather_attend: rot_delta {tuple(rot_delta.shape)} must align with ids "
                             f"{tuple(ids.shape)}")
        kg = rotate_keys(kg, rot_delta, inv_freq)
    kg = kg.transpose(0, 1)  # [H_kv, n, D]
    vg = _acc(gather_kv(v_rows, ids)).transpose(0, 1)
    logits = torch.bmm(_acc(q).view(hkv, group, d), kg.transpose(1, 2)).mul_(scale)  # [H_kv, g, n]
    logits.masked_fill_((ids < 0)[:, None, :], NEG_INF)
    lse = torch.logsumexp(logits, dim=-1)  # [H_kv, g]
    p = logits.sub_(lse.clamp_min(torch.finfo(lse.dtype).min)[..., None]).exp_()
    out = torch.bmm(p, vg).view(hq, d)
    lse = lse.view(hq)
    return out.to(q.dtype), lse


def merge(outs: Sequence[Tensor], lses: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Exact log-sum-exp merge of partial attentions over disjoint key sets.

    outs: each [..., D]; lses: each [...] fp32 (-inf = empty part).
    out = sum_i exp(lse_i - lse) * out_i,  lse = logsumexp_i lse_i.
    """
    if len(outs) != len(lses) or not outs:
        raise ValueError("merge needs one lse per output and at least one part")
    lse_all = torch.stack([_acc(x) for x in lses])  # [P, ...]
    lse = torch.logsumexp(lse_all, dim=0)
    # all parts empty -> lse = -inf; weights are then 0 instead of NaN
    w = torch.exp(lse_all - lse.clamp_min(torch.finfo(lse.dtype).min)[None])
    w = torch.nan_to_num(w, nan=0.0)
    out = sum(wi[..., None] * _acc(o) for wi, o in zip(w, outs))
    return out.to(outs[0].dtype), lse


def score(q: Tensor, k_rows: Tensor, *, scale: float = 1.0, ids: Tensor | None = None) -> Tensor:
    """Logits of each query head over keys: q [H_q, D], k_rows [N, H_kv, D] -> [H_q, N] fp32.

    With ids [M] (shared candidates) the result is [H_q, M] over k_rows[ids].
    """
    hq, d = q.shape
    hkv = k_rows.shape[1]
    keys = k_rows if ids is None else k_rows[ids]
    qg = _acc(q).view(hkv, hq // hkv, d)  # [H_kv, g, D]
    s = torch.bmm(qg, _acc(keys).permute(1, 2, 0)).view(hq, -1)  # [H_kv, g, N] as [H_q, N]
    return s if scale == 1.0 else s.mul_(scale)


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

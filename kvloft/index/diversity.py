"""Top-k with a cap on near-identical keys (RetrievalConfig.max_similar).

A prompt whose text repeats (a haystack of the same sentences) yields thousands of keys
that are nearly the same vector; in extrapolation mode, where keys are compared without
their positions, they tie in a top-k and can fill it: one token repeated in 98% of the
slots (docs/quality.md). Keys are bucketed by random-hyperplane hashing (SimHash: the
signs of `bits` fixed random projections, so keys at a small angle share a bucket with
high probability) and at most `cap` keys of a bucket are taken, the highest-scoring ones;
what the cap frees goes to the next keys by score.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["capped_topk", "similarity_buckets"]

_PLANES: dict[tuple[int, int, str], Tensor] = {}


def _planes(d: int, bits: int, device: torch.device) -> Tensor:
    key = (d, bits, str(device))
    if key not in _PLANES:
        gen = torch.Generator().manual_seed(0x5EED)
        _PLANES[key] = torch.randn(d, bits, generator=gen).to(device)
    return _PLANES[key]


def similarity_buckets(keys: Tensor, bits: int = 16) -> Tensor:
    """keys [N, H, D] (token-major) -> int64 bucket ids [H, N] (SimHash with `bits` planes)."""
    proj = keys.float() @ _planes(keys.shape[-1], bits, keys.device)  # [N, H, bits]
    weights = 2 ** torch.arange(bits, device=keys.device)
    return ((proj > 0).long() * weights).sum(-1).transpose(0, 1).contiguous()


def capped_topk(scores: Tensor, buckets: Tensor, k: int, cap: int, refill: bool = False) -> Tensor:
    """Row-wise top-k of scores [H, N] taking at most `cap` entries of any bucket (buckets
    [H, N]). Returns indices [H, min(k, N)], best first; where fewer than k entries pass the
    cap the row is padded with -1 (the selection is smaller: the point is to attend to fewer
    copies), or with `refill` the best of the capped-out entries fill it."""
    h, n = scores.shape
    k = min(k, n)
    if cap <= 0 or k == 0:
        return torch.topk(scores, k, dim=-1).indices
    order = scores.argsort(dim=-1, descending=True)  # [H, N] best first
    b = buckets.gather(-1, order)
    by_bucket = b.argsort(dim=-1, stable=True)  # groups buckets, best first inside each
    bs = b.gather(-1, by_bucket)
    pos = torch.arange(n, device=scores.device).expand(h, n)
    starts = torch.where(torch.cat([torch.ones_like(bs[:, :1], dtype=torch.bool), bs[:, 1:] != bs[:, :-1]], 1),
                         pos, 0).cummax(dim=-1).values
    rank_in_bucket = torch.empty_like(pos).scatter_(-1, by_bucket, pos - starts)  # in `order` space
    kept = rank_in_bucket < cap
    # kept entries first (by score), then the others (by score)
    key = torch.where(kept, pos, pos + n)
    top = key.topk(k, dim=-1, largest=False)  # positions in `order`, ascending key
    ids = order.gather(-1, top.indices)
    return ids if refill else ids.masked_fill(top.values >= n, -1)

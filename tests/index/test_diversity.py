"""Top-k with a cap on near-identical keys, against a brute-force reference."""

from __future__ import annotations

import pytest
import torch

from kvloft.config import ModelConfig, RetrievalConfig
from kvloft.index.base import make_retriever
from kvloft.index.diversity import capped_topk, similarity_buckets

MODEL = ModelConfig.from_name("tiny")  # 9 query heads over 3 KV heads, head_dim 16


def _brute(scores, buckets, k, cap):
    out = []
    for s, b in zip(scores.tolist(), buckets.tolist()):
        order = sorted(range(len(s)), key=lambda i: -s[i])
        seen, kept, rest = {}, [], []
        for i in order:
            seen[b[i]] = seen.get(b[i], 0) + 1
            (kept if seen[b[i]] <= cap else rest).append(i)
        kept = kept[:k]
        out.append((kept, rest[: k - len(kept)]))
    return out


@pytest.mark.parametrize("cap", [1, 2, 5])
def test_capped_topk_matches_brute_force(cap):
    gen = torch.Generator().manual_seed(cap)
    scores = torch.randn(3, 200, generator=gen)
    buckets = torch.randint(0, 12, (3, 200), generator=gen)
    for k in (1, 17, 60, 200):
        want = _brute(scores, buckets, k, cap)
        assert capped_topk(scores, buckets, k, cap, refill=True).tolist() == [w[0] + w[1] for w in want]
        assert capped_topk(scores, buckets, k, cap).tolist() == [w[0] + [-1] * len(w[1]) for w in want]
    assert torch.equal(capped_topk(scores, buckets, 50, 0), torch.topk(scores, 50).indices)


def test_near_identical_keys_share_a_bucket_and_distinct_ones_rarely_do():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(1, 3, 64, generator=gen)
    copies = base + 1e-3 * torch.randn(50, 3, 64, generator=gen)
    others = torch.randn(500, 3, 64, generator=gen)
    b = similarity_buckets(torch.cat([copies, others]), bits=16)  # [3, 550]
    assert bool((b[:, :50] == b[:, :1]).all())
    assert (b[:, 50:] == b[:, :1]).float().mean() < 0.01


def test_exact_retriever_caps_a_flood_of_copies_and_keeps_the_needle():
    # 300 copies of one key outscore the needle; without the cap they fill the budget
    gen = torch.Generator().manual_seed(1)
    hkv, d = MODEL.n_kv_heads, MODEL.head_dim
    q = torch.randn(MODEL.n_heads, d, generator=gen)
    direction = q.view(hkv, -1, d).mean(1)  # [H_kv, D]
    keys = 0.1 * torch.randn(hkv, 1000, d, generator=gen)
    keys[:, 100:400] = 4.0 * direction[:, None] + 1e-4 * torch.randn(hkv, 300, d, generator=gen)
    orth = torch.randn(hkv, d, generator=gen)
    orth -= (orth * direction).sum(-1, keepdim=True) / direction.pow(2).sum(-1, keepdim=True) * direction
    orth *= direction.norm(dim=-1, keepdim=True) / orth.norm(dim=-1, keepdim=True)
    keys[:, 700] = 1.5 * direction + 1.5 * orth  # the needle: another direction, below the copies' score
    ids = {}
    for cap in (0, 4):
        r = make_retriever(RetrievalConfig(method="exact", budget=64, max_similar=cap), MODEL, "cpu")
        r.build(0, keys, None)
        ids[cap] = r.select(0, q, 64).ids
    assert not bool((ids[0] == 700).any())  # the copies took every slot
    assert bool((ids[4] == 700).any(dim=-1).all())  # with the cap, every KV head reads the needle
    copies = ((ids[4] >= 100) & (ids[4] < 400)).sum(dim=-1)
    assert int(copies.max()) <= 4, copies


def test_bad_values_are_refused():
    with pytest.raises(ValueError, match="max_similar"):
        RetrievalConfig(max_similar=-1)
    with pytest.raises(ValueError, match="similar_bits"):
        RetrievalConfig(similar_bits=63)

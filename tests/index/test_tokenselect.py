"""TokenSelect retriever: dense identity, soft-vote reference, needles, selection cache, params."""

import pytest
import torch

from kvloft.config import ModelConfig, RetrievalConfig
from kvloft.index.base import make_retriever
from kvloft.index.tokenselect import TokenSelectRetriever
from kvloft.kernels import reference

MODEL = ModelConfig.from_name("tiny")  # 9 query heads over 3 KV heads, head_dim 16
HQ, HKV, D = MODEL.n_heads, MODEL.n_kv_heads, MODEL.head_dim
GROUP = HQ // HKV


def _retriever(**options) -> TokenSelectRetriever:
    return make_retriever(RetrievalConfig(method="tokenselect", options=options), MODEL, "cpu")


def _soft_vote(q, keys, scale=1.0):
    """Hand-written criticality: q [H_q, D], keys [N, H_kv, D] -> [N], query head h reads KV head h // G."""
    total = torch.zeros(keys.shape[0])
    for h in range(HQ):
        total += torch.softmax(keys[:, h // GROUP].double() @ q[h].double() * scale, dim=0).float()
    return total


def _merged_vs_dense(q, k, v, n_sink, n_window, ids):
    """Static (sink + window) part merged with the selected host part vs dense attention."""
    t, scale = k.shape[0], D**-0.5
    static = torch.cat([torch.arange(n_sink), torch.arange(t - n_window, t)])
    o_s, l_s = reference.decode_attend(q, k[static], v[static], scale=scale)
    host = slice(n_sink, t - n_window)
    o_r, l_r = reference.gather_attend(q, k[host], v[host], ids, scale=scale)
    out, lse = reference.merge([o_s, o_r], [l_s, l_r])
    o_d, l_d = reference.decode_attend(q, k, v, scale=scale)
    return (out, lse), (o_d, l_d)


def test_covering_budget_equals_dense():
    t, n_sink, n_window = 131, 4, 16
    k, v, q = torch.randn(t, HKV, D), torch.randn(t, HKV, D), torch.randn(HQ, D)
    host = k[n_sink : t - n_window]  # [N, H_kv, D], N = 111
    r = _retriever(chunk_rows=32)
    r.build(0, host[:80].transpose(0, 1), None)
    r.add(0, host[80:].transpose(0, 1), torch.arange(n_sink + 80, t - n_window))
    sel = r.select(0, q, budget=200)
    assert sel.shared and torch.equal(sel.ids, torch.arange(host.shape[0]))
    (out, lse), (o_d, l_d) = _merged_vs_dense(q, k, v, n_sink, n_window, sel.ids)
    torch.testing.assert_close(out, o_d, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, l_d, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale_scores", [False, True])
def test_criticality_matches_soft_vote_reference(scale_scores):
    keys = torch.randn(301, HKV, D)
    q = torch.randn(HQ, D)
    r = _retriever(chunk_rows=64, scale_scores=scale_scores)  # 5 chunks: softmax spans chunks
    r.build(1, keys.transpose(0, 1), None)
    want = _soft_vote(q, keys, D**-0.5 if scale_scores else 1.0)
    torch.testing.assert_close(r.criticality(1, q), want, atol=1e-5, rtol=1e-5)
    sel = r.select(1, q, budget=17)
    assert sel.shared and sel.scanned == 301 * HKV
    assert set(sel.ids.tolist()) == set(torch.topk(want, 17).indices.tolist())


def test_planted_needles_are_selected():
    n, needles = 2000, torch.tensor([13, 404, 1111, 1500, 1999])
    keys = torch.randn(n, HKV, D)
    u = torch.nn.functional.normalize(torch.randn(HKV, D), dim=-1)  # one direction per KV head
    q = 3 * u.repeat_interleave(GROUP, 0) + 0.1 * torch.randn(HQ, D)
    keys[needles] = 8 * u  # aligned with the queries of every group
    r = _retriever()
    r.build(0, keys.transpose(0, 1), None)
    sel = r.select(0, q, budget=8)
    assert set(needles.tolist()) <= set(sel.ids.tolist())


def _rotate_towards(a, b, cos):
    """A unit vector at cosine `cos` from a, in the plane of a and b (flattened)."""
    a, b = a.flatten(), b.flatten()
    a = a / a.norm()
    b = b - (b @ a) * a
    b = b / b.norm()
    return (cos * a + (1 - cos**2) ** 0.5 * b).view(HQ, D)


def test_selection_cache_hits_and_misses_follow_query_similarity():
    keys = torch.randn(500, HKV, D)
    r = _retriever(theta=0.9)
    r.build(0, keys.transpose(0, 1), None)
    q0, q1 = torch.randn(HQ, D), torch.randn(HQ, D)
    first = r.select(0, q0, 32)
    assert first.scanned == 500 * HKV
    near = r.select(0, _rotate_towards(q0, q1, 0.95), 32)  # cos 0.95 >= 0.9: reuse
    assert near.scanned == 0 and torch.equal(near.ids, first.ids)
    far = r.select(0, _rotate_towards(q0, q1, 0.85), 32)  # cos 0.85 < 0.9: score again
    assert far.scanned == 500 * HKV
    fresh = torch.topk(_soft_vote(_rotate_towards(q0, q1, 0.85), keys), 32).indices
    assert set(far.ids.tolist()) == set(fresh.tolist())
    # the reference is now the last query that ran selection (at 0.85 from q0)
    again = r.select(0, _rotate_towards(q0, q1, 0.85) * 2.0, 32)  # same direction, other norm
    assert again.scanned == 0
    assert r.select(0, q1, 31).scanned > 0  # another budget is always a miss
    st = r.stats()
    assert (st["cache_hits"], st["cache_misses"], st["calls"]) == (2, 3, 5)
    assert st["cache_hit_rate"] == pytest.approx(2 / 5)


def test_selection_cache_is_per_layer_and_can_be_disabled():
    keys = torch.randn(200, HKV, D)
    q = torch.randn(HQ, D)
    r = _retriever()
    for layer in (0, 1):
        r.build(layer, keys.transpose(0, 1), None)
    assert r.select(0, q, 10).scanned > 0
    assert r.select(1, q, 10).scanned > 0  # layer 1 has no cached query yet
    assert r.select(0, q, 10).scanned == 0
    off = _retriever(selection_cache=False)
    off.build(0, keys.transpose(0, 1), None)
    assert all(off.select(0, q, 10).scanned > 0 for _ in range(3))
    assert off.stats()["cache_hit_rate"] == 0.0


def test_covering_budget_skips_scoring_and_empty_tier():
    r = _retriever()
    assert r.select(0, torch.randn(HQ, D), 5).ids.numel() == 0  # layer never built
    r.build(0, torch.randn(HKV, 7, D), None)
    sel = r.select(0, torch.randn(HQ, D), 7)
    assert sel.scanned == 0 and torch.equal(sel.ids, torch.arange(7))


@pytest.mark.parametrize(
    "options, error",
    [
        ({"theta": -0.1}, ValueError),
        ({"theta": 1.5}, ValueError),
        ({"chunk_rows": 0}, ValueError),
        ({"k": 10}, ValueError),  # unknown option: k is the budget argument
        ({"scale_scores": "yes"}, TypeError),
    ],
)
def test_bad_parameters_raise(options, error):
    with pytest.raises(error):
        _retriever(**options)


def test_bad_budget_raises():
    r = _retriever()
    r.build(0, torch.randn(HKV, 10, D), None)
    with pytest.raises(ValueError, match="budget"):
        r.select(0, torch.randn(HQ, D), -1)

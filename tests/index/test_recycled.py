"""Recycled Attention retriever: dense identity, full-step ranking, needles, schedules, eviction, params."""

import pytest
import torch
import torch.nn.functional as F

from kvloft.config import ModelConfig, RetrievalConfig
from kvloft.index.base import make_retriever
from kvloft.index.recycled import RecycledRetriever
from kvloft.kernels import reference

MODEL = ModelConfig.from_name("tiny")  # 9 query heads over 3 KV heads, head_dim 16
HQ, HKV, D = MODEL.n_heads, MODEL.n_kv_heads, MODEL.head_dim
GROUP = HQ // HKV


def _retriever(budget=64, **options) -> RecycledRetriever:
    cfg = RetrievalConfig(method="recycled", budget=budget, options=options)
    return make_retriever(cfg, MODEL, "cpu")


def _pooled_group_max(q, keys, kernel=7):
    """Hand-written full-step ranking: q [H_q, D], keys [N, H_kv, D] -> [H_kv, N]."""
    n = keys.shape[0]
    out = torch.zeros(HKV, n, dtype=torch.float64)
    for h in range(HQ):
        p = torch.softmax(keys[:, h // GROUP].double() @ q[h].double() * D**-0.5, dim=0)
        pooled = torch.stack([p[max(0, j - kernel // 2) : j + kernel // 2 + 1].max() for j in range(n)])
        out[h // GROUP] = torch.maximum(out[h // GROUP], pooled)
    return out


def _merged_vs_dense(q, k, v, n_sink, n_window, ids):
    t, scale = k.shape[0], D**-0.5
    static = torch.cat([torch.arange(n_sink), torch.arange(t - n_window, t)])
    o_s, l_s = reference.decode_attend(q, k[static], v[static], scale=scale)
    host = slice(n_sink, t - n_window)
    o_r, l_r = reference.gather_attend(q, k[host], v[host], ids, scale=scale)
    merged = reference.merge([o_s, o_r], [l_s, l_r])
    return merged, reference.decode_attend(q, k, v, scale=scale)


def _is_full(sel) -> bool:
    return sel.shared  # full steps select every host row, shared; partial steps are per head


def test_covering_budget_equals_dense_on_full_and_partial_steps():
    t, n_sink, n_window = 131, 4, 16
    k, v = torch.randn(t, HKV, D), torch.randn(t, HKV, D)
    r = _retriever(budget=200)
    r.build(0, k[n_sink : t - n_window - 10].transpose(0, 1), None)
    full = r.select(0, torch.randn(HQ, D), 200)
    assert _is_full(full) and full.scanned == (t - n_window - 10 - n_sink) * HKV
    r.add(0, k[t - n_window - 10 : t - n_window].transpose(0, 1), torch.arange(t - n_window - 10, t - n_window))
    q = torch.randn(HQ, D)
    part = r.select(0, q, 200)
    assert not _is_full(part) and part.ids.shape == (HKV, t - n_window - n_sink) and part.scanned == 0
    got, dense = _merged_vs_dense(q, k, v, n_sink, n_window, part.ids)
    torch.testing.assert_close(got, dense, atol=1e-5, rtol=1e-5)  # (out, lse)
    # a full step attends to every host row: the same identity holds for it
    got, dense = _merged_vs_dense(q, k, v, n_sink, n_window + 10, full.ids)
    torch.testing.assert_close(got, dense, atol=1e-5, rtol=1e-5)


def test_full_step_ranking_matches_reference():
    keys, q = torch.randn(203, HKV, D), 3 * torch.randn(HQ, D)
    r = _retriever(budget=24, chunk_rows=64)  # 4 chunks: the softmax spans chunks
    r.build(0, keys.transpose(0, 1), None)
    want = _pooled_group_max(q, keys)
    torch.testing.assert_close(r.full_step_scores(0, q).double(), want, atol=1e-6, rtol=1e-5)
    r.select(0, q, 24)
    part = r.select(0, torch.randn(HQ, D), 24).ids  # [H_kv, 24]
    got = torch.gather(want, 1, part).sort(dim=1, descending=True).values
    torch.testing.assert_close(got, torch.topk(want, 24, dim=1).values)  # ties make ids ambiguous


def test_planted_needles_enter_the_partial_set_per_head():
    n, keys = 3000, torch.randn(3000, HKV, D)
    u = F.normalize(torch.randn(HKV, D), dim=-1)
    needles = {c: torch.randperm(n)[:3] for c in range(HKV)}  # different needles per KV head
    for c, rows in needles.items():
        keys[rows, c] = 8 * u[c]
    q = 3 * u.repeat_interleave(GROUP, 0) + 0.1 * torch.randn(HQ, D)
    r = _retriever(budget=21)  # 3 needles x pooled neighbourhood of 7
    r.build(0, keys.transpose(0, 1), None)
    r.select(0, q, 21)
    part = r.select(0, q, 21).ids
    for c, rows in needles.items():
        assert set(rows.tolist()) <= set(part[c].tolist())


def test_stride_schedule_runs_full_steps_at_multiples_of_s_per_layer():
    r = _retriever(budget=16, stride=4)
    for layer in (0, 1):
        r.build(layer, torch.randn(HKV, 100, D), None)
    full = {0: [], 1: []}
    for t in range(13):
        for layer in (0, 1):
            if _is_full(r.select(layer, torch.randn(HQ, D), 16)):
                full[layer].append(t)
    assert full == {0: [0, 4, 8, 12], 1: [0, 4, 8, 12]}
    st = r.stats()
    assert (st["full_steps"], st["partial_steps"]) == (8, 18)
    assert st["scanned"] == 8 * 100 * HKV


def test_dynamic_schedule_triggers_on_query_change_only():
    r = _retriever(budget=16, schedule="dynamic", query_check=2, sim_threshold=0.85)
    r.build(0, torch.randn(HKV, 100, D), None)
    q0, q1 = torch.randn(HQ, D), torch.randn(HQ, D)
    queries = [q0] * 7 + [q1] * 9  # the change arrives at t = 7, checked at t = 8
    full = [t for t, q in enumerate(queries) if _is_full(r.select(0, q + 0.01 * torch.randn(HQ, D), 16))]
    assert full == [0, 8]
    assert r.stats()["full_steps"] == 2


def test_budget_change_forces_a_full_step():
    r = _retriever(budget=16, stride=50)
    r.build(0, torch.randn(HKV, 100, D), None)
    q = torch.randn(HQ, D)
    assert [_is_full(r.select(0, q, b)) for b in (16, 16, 8, 8)] == [True, False, True, False]


def test_added_rows_evict_the_lowest_and_keep_the_set_size():
    k = 10
    keys = torch.randn(50, HKV, D)
    r = _retriever(budget=k, stride=1000)
    r.build(0, keys.transpose(0, 1), None)
    q = torch.randn(HQ, D)
    r.select(0, q, k)
    scores = r.full_step_scores(0, q)  # [H_kv, 50]
    r.add(0, torch.randn(HKV, 3, D), torch.arange(3))  # rows 50, 51, 52
    part = r.select(0, q, k).ids
    assert part.shape == (HKV, k)
    for c in range(HKV):
        kept = [i for i in part[c].tolist() if i < 50]
        assert {50, 51, 52} <= set(part[c].tolist()) and len(kept) == k - 3
        assert scores[c, kept].min() >= torch.topk(scores[c], k - 3).values[-1]
    r.add(0, torch.randn(HKV, 12, D), torch.arange(12))  # more than K at once: the last K stay
    part = r.select(0, q, k).ids
    assert part.shape == (HKV, k)
    assert all(set(part[c].tolist()) == set(range(55, 65)) for c in range(HKV))


def test_small_host_tier_grows_the_set_up_to_k():
    r = _retriever(budget=10, stride=1000)
    r.build(0, torch.randn(HKV, 5, D), None)
    q = torch.randn(HQ, D)
    r.select(0, q, 10)
    sizes = []
    for _ in range(4):
        r.add(0, torch.randn(HKV, 2, D), torch.arange(2))
        sizes.append(r.select(0, q, 10).ids.shape[1])
    assert sizes == [7, 9, 10, 10]
    assert set(range(5, 13)) <= set(r.select(0, q, 10).ids[0].tolist())  # new rows are kept


def test_empty_host_tier():
    r = _retriever(budget=8)
    assert r.select(0, torch.randn(HQ, D), 8).ids.numel() == 0
    r.add(0, torch.randn(HKV, 3, D), torch.arange(3))
    assert sorted(r.select(0, torch.randn(HQ, D), 8).ids[0].tolist()) == [0, 1, 2]


@pytest.mark.parametrize(
    "budget, options",
    [
        (0, {}),  # K <= 0
        (16, {"stride": 0}),
        (16, {"stride": -5}),
        (16, {"query_check": 0}),
        (16, {"schedule": "sometimes"}),
        (16, {"sim_threshold": 1.5}),
        (16, {"pool_kernel": 6}),
        (16, {"scale": 0.0}),
        (16, {"window": 3}),  # unknown option
    ],
)
def test_bad_parameters_raise(budget, options):
    with pytest.raises(ValueError):
        _retriever(budget=budget, **options)


def test_bad_budget_in_select_raises():
    r = _retriever()
    with pytest.raises(ValueError, match="budget"):
        r.select(0, torch.randn(HQ, D), 0)

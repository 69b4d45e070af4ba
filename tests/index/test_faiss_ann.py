"""faiss baselines (flat / IVF / HNSW on keys) against exact search, and their scan counts."""

from __future__ import annotations

import dataclasses

import faiss
import numpy as np
import pytest
import torch

from kvloft.config import ModelConfig, RetrievalConfig
from kvloft.index.base import make_retriever
from kvloft.index.exact import ExactRetriever
from kvloft.index.synthetic import ood_attention_data

H_KV, GROUP, DIM, N = 2, 3, 32, 3000


def model_cfg() -> ModelConfig:
    return ModelConfig(name="test", hidden_size=DIM * H_KV * GROUP, n_heads=H_KV * GROUP,
                       n_kv_heads=H_KV, head_dim=DIM)


def faiss_retriever(reduce: str = "max", **options):
    cfg = RetrievalConfig(method="faiss", gqa_reduce=reduce, options=options)
    return make_retriever(cfg, model_cfg())


@pytest.fixture(scope="module")
def data():
    return ood_attention_data(N, 10, 12, dim=DIM, n_kv_heads=H_KV, group=GROUP, seed=11)


def exact(data, reduce: str) -> ExactRetriever:
    ex = ExactRetriever(RetrievalConfig(method="exact", gqa_reduce=reduce), model_cfg(), torch.device("cpu"))
    ex.build(0, data.keys, None)
    return ex


def recall(got: torch.Tensor, want: torch.Tensor) -> float:
    hits = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(got, want)]
    return float(np.mean(hits)) / want.shape[1]


@pytest.mark.parametrize("reduce", ["max", "sum"])
def test_flat_is_exact_and_scans_everything(data, reduce):
    r = faiss_retriever(reduce, index="flat")
    r.build(0, data.keys, data.train_queries)
    ex = exact(data, reduce)
    for t in range(data.test_queries.shape[1]):
        q = data.test_queries[:, t]
        sel = r.select(0, q, 40)
        assert sel.ids.shape == (H_KV, 40) and sel.scanned == H_KV * N
        scores = ex.scores(0, q)  # [H_kv, N]
        for h in range(H_KV):
            kth = torch.topk(scores[h], 40).values[-1]
            assert len(set(sel.ids[h].tolist())) == 40
            assert (scores[h][sel.ids[h]] >= kth - 1e-4 * (1 + abs(float(kth)))).all()


def test_ivf_scanned_is_the_probed_list_sizes(data):
    single = ModelConfig(name="one", hidden_size=DIM, n_heads=1, n_kv_heads=1, head_dim=DIM)
    r = make_retriever(RetrievalConfig(method="faiss", options={"index": "ivf", "nlist": 30, "nprobe": 4}), single)
    keys = data.keys[:1]  # [1, N, D]
    r.build(0, keys, None)
    ivf = faiss.extract_index_ivf(r.heads[0][0].index)
    for q in data.test_queries[0, :5]:  # [D]
        sel = r.select(0, q[None], 20)
        _, lists = ivf.quantizer.search(q[None].numpy(), 4)
        assert sel.scanned == sum(ivf.invlists.list_size(int(li)) for li in lists[0])


def test_ivf_probing_every_list_is_exact(data):
    r = faiss_retriever(index="ivf", nlist=16, nprobe=16)
    r.build(0, data.keys, None)
    ex = exact(data, "max")
    got = [r.select(0, data.test_queries[:, t], 30) for t in range(6)]
    want = [ex.select(0, data.test_queries[:, t], 30).ids for t in range(6)]
    assert recall(torch.cat([s.ids for s in got]), torch.cat(want)) >= 0.999
    assert all(s.scanned == H_KV * N for s in got)  # capped: each KV head scores every key


def test_hnsw_recall_and_scan_grow_with_ef(data):
    ex = exact(data, "max")
    r = faiss_retriever(index="hnsw")
    r.build(0, data.keys, None)
    results = []
    for ef in (40, 400):
        r.params = dataclasses.replace(r.params, ef_search=ef)  # one build serves both efforts
        sels = [r.select(0, data.test_queries[:, t], 30) for t in range(8)]
        want = torch.cat([ex.select(0, data.test_queries[:, t], 30).ids for t in range(8)])
        results.append((recall(torch.cat([s.ids for s in sels]), want), np.mean([s.scanned for s in sels])))
    (rec_lo, scan_lo), (rec_hi, scan_hi) = results
    assert 0 < scan_lo < scan_hi <= H_KV * N
    assert rec_hi >= rec_lo and rec_hi >= 0.95


def test_add_empty_and_budget_over_n(data):
    r = faiss_retriever(index="flat")
    q = data.test_queries[:, 0]
    assert r.select(0, q, 10).ids.shape == (H_KV, 0)  # nothing built
    r.build(0, data.keys[:, :0], None)
    assert r.select(0, q, 10).ids.shape == (H_KV, 0)
    r.add(0, data.keys[:, :50], torch.arange(50))
    sel = r.select(0, q, 80)  # budget above N: every key
    assert sel.ids.shape == (H_KV, 50) and sorted(sel.ids[0].tolist()) == list(range(50))
    needle = 10 * q.view(H_KV, GROUP, DIM).mean(1)[:, None]  # [H_kv, 1, D], tops the group
    r.add(0, needle, torch.tensor([50]))
    sel = r.select(0, q, 5)
    assert (sel.ids == 50).any(dim=1).all()


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_add_after_build_is_searchable(data, index):
    r = faiss_retriever(index=index, nprobe=64, efSearch=64)
    r.build(0, data.keys[:, :1000], None)
    r.add(0, data.keys[:, 1000:], torch.arange(1000, N))
    assert r.heads[0][0].n == N
    ex = exact(data, "max")
    got = torch.cat([r.select(0, data.test_queries[:, t], 20).ids for t in range(6)])
    want = torch.cat([ex.select(0, data.test_queries[:, t], 20).ids for t in range(6)])
    assert recall(got, want) >= 0.9


@pytest.mark.parametrize(
    "options",
    [{"index": "lsh"}, {"index": "ivf", "nprobe": 0}, {"nlist": -1}, {"efSearch": 2.5}, {"hnsw_m": 1},
     {"bogus": 1}, {"use_gpu": "always"}],
)
def test_bad_params_rejected(options):
    with pytest.raises((ValueError, TypeError)):
        faiss_retriever(**options)


def test_bad_shapes_rejected(data):
    r = faiss_retriever(index="flat")
    with pytest.raises(ValueError, match="keys"):
        r.build(0, data.keys[:1], None)
    r.build(0, data.keys, None)
    with pytest.raises(ValueError, match="q must be"):
        r.select(0, data.test_queries[0, :1], 4)

"""ExactRetriever's ranking rules: group max of logits (default) or of per-head log-probabilities."""

from __future__ import annotations

import pytest
import torch

from kvloft.config import ModelConfig, RetrievalConfig
from kvloft.index.base import make_retriever

MODEL = ModelConfig.from_name("tiny")  # 9 query heads over 3 KV heads, head_dim 16
HQ, HKV, D = MODEL.n_heads, MODEL.n_kv_heads, MODEL.head_dim


def _exact(**options):
    return make_retriever(RetrievalConfig(method="exact", options=options), MODEL, "cpu")


def _loud_and_quiet(gen: torch.Generator):
    """Keys [H_kv, 512, D] and a query [H_q, D]: in every group, head 0 spreads its attention
    over 200 keys with logits ~5 (each holds ~0.5% of its mass); head 1 puts ~40% of its mass
    on 10 needle keys with logits ~3.5, below head 0's. Returns keys, q, needle rows."""
    basis, _ = torch.linalg.qr(torch.randn(HKV, D, 2, generator=gen))
    u, w = basis[..., 0], basis[..., 1]  # [H_kv, D]
    keys = 0.1 * torch.randn(HKV, 512, D, generator=gen)
    keys[:, :200] += 5.0 * u[:, None]
    needles = torch.arange(300, 310)
    keys[:, needles] += 1.0 * w[:, None]
    q = 0.1 * torch.randn(HQ, D, generator=gen)
    q[0::3] += 4.0 * u  # scale 1/4: logits 5 on the 200 keys
    q[1::3] += 14.0 * w  # logits 3.5 on the needles
    return keys, q, needles


def _mass_recall(keys, q, ids):
    """Mean over query heads of the softmax mass (all 512 keys) on the selected rows of its KV head."""
    logits = torch.einsum("hd,hnd->hn", q, keys.repeat_interleave(HQ // HKV, 0)) * D**-0.5
    p = torch.softmax(logits, -1)
    return float(p.gather(1, ids.repeat_interleave(HQ // HKV, 0)).sum(-1).mean())


def test_probability_rank_keeps_the_quiet_heads_needles():
    gen = torch.Generator().manual_seed(0)
    keys, q, needles = _loud_and_quiet(gen)
    by_logit, by_prob = _exact(), _exact(rank="prob")
    for r in (by_logit, by_prob):
        r.build(0, keys, None)
    ids_l, ids_p = by_logit.select(0, q, 64).ids, by_prob.select(0, q, 64).ids  # [H_kv, 64]
    for h in range(HKV):
        assert not set(needles.tolist()) & set(ids_l[h].tolist())  # the loud head took every slot
        assert set(needles.tolist()) <= set(ids_p[h].tolist())
    # the quiet heads' 40% comes back for ~10 of the loud heads' 64 x 0.5%
    assert _mass_recall(keys, q, ids_p) > _mass_recall(keys, q, ids_l) + 0.05


def test_probability_rank_budget_over_n_and_bad_option():
    gen = torch.Generator().manual_seed(1)
    keys, q, _ = _loud_and_quiet(gen)
    r = _exact(rank="prob")
    r.build(0, keys, None)
    assert torch.equal(r.select(0, q, 600).ids, torch.arange(512).expand(HKV, -1))
    with pytest.raises(ValueError, match="rank"):
        _exact(rank="probability")


@pytest.mark.parametrize("chunk_rows,n,budget", [(100, 1003, 256), (4096, 700, 699), (64, 50, 8)])
def test_compiled_cpu_ranking_selects_the_torch_routes_rows(monkeypatch, chunk_rows, n, budget):
    """fp32 on the CPU, select ranks through kernels/cpu_rank.py: the same rows per KV head as the
    torch route (amax, topk), the store split over chunks or not; ids compared as sets (the CPU
    top-k returns them in no order)."""
    from kvloft.kernels import cpu_rank

    gen = torch.Generator().manual_seed(n)
    keys, q = torch.randn(HKV, n, D, generator=gen), torch.randn(HQ, D, generator=gen)
    r = _exact(chunk_rows=chunk_rows)
    r.build(0, keys, None)
    got = r.select(0, q, budget)
    monkeypatch.setattr(cpu_rank, "enabled", False)
    want = r.select(0, q, budget)
    assert got.ids.shape == want.ids.shape == (HKV, budget) and got.scanned == want.scanned == n * HKV
    assert [set(x.tolist()) for x in got.ids] == [set(x.tolist()) for x in want.ids]


def test_build_copies_the_keys_chunk_by_chunk():
    """build() fills the key copy from the host tier's keys [H_kv, N, D] (a transposed view) one
    chunk's slice at a time: the rows land where append puts them, across chunk boundaries."""
    from kvloft.config import ModelConfig, RetrievalConfig
    from kvloft.index.exact import ExactRetriever

    cfg = ModelConfig.from_name("tiny")
    r = ExactRetriever(RetrievalConfig(method="exact", options={"keys_on": "device", "chunk_rows": 32}), cfg,
                       torch.device("cpu"))
    keys = torch.randn(100, cfg.n_kv_heads, cfg.head_dim).transpose(0, 1)  # [H_kv, N, D], not contiguous
    r.build(0, keys, None)
    r.add(0, keys[:, :5], torch.arange(100, 105))
    store = r.keys[0]
    assert len(store) == 105 and len(store.chunks) == 4 and store.nbytes == 4 * 32 * cfg.n_kv_heads * cfg.head_dim * 4
    assert torch.equal(store.all(), torch.cat([keys, keys[:, :5]], dim=1).transpose(0, 1))


@pytest.mark.gpu
def test_build_holds_no_second_copy_on_the_device():
    """Building a layer's key copy on CUDA from host keys peaks at the copy itself (whole chunks),
    not the copy plus the layer's keys moved up whole first (0.25 GiB per layer at 128K for
    Llama-3-8B: what put an exact keys_on='device' decode at 128K over its 24 GiB plan)."""
    from kvloft.config import ModelConfig, RetrievalConfig
    from kvloft.index.exact import ExactRetriever

    cfg = ModelConfig.from_name("tiny")
    r = ExactRetriever(RetrievalConfig(method="exact", options={"keys_on": "device", "chunk_rows": 4096}), cfg,
                       torch.device("cuda"))
    keys = torch.randn(cfg.n_kv_heads, 40000, cfg.head_dim, dtype=torch.bfloat16)  # host, [H_kv, N, D]
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    r.build(0, keys, None)
    torch.cuda.synchronize()
    held = r.keys[0].nbytes
    assert torch.cuda.memory_allocated() - base == held
    assert torch.cuda.max_memory_allocated() - base <= held + 2**20  # the copy, no whole temporary

"""The exact retriever's batched search (kernels/scoring_batched.py, ExactRetriever.select_batch):
every row's keys scored in one launch, one top-k; each row selects the keys its own select() does."""

from __future__ import annotations

import pytest
import torch

from kvloft.config import ModelConfig, RetrievalConfig
from kvloft.index.base import batch_search_key, make_retriever
from kvloft.index.exact import ExactRetriever
from kvloft.kernels.checks import address_table
from kvloft.kernels.scoring import score
from kvloft.kernels.scoring_batched import score_batched, score_batched_reference

MODEL = ModelConfig.from_name("tiny")  # 9 query heads over 3 KV heads, head_dim 16
HQ, HKV, D = MODEL.n_heads, MODEL.n_kv_heads, MODEL.head_dim


def test_score_batched_equals_each_rows_launches_bit_for_bit():
    """D 59, 9 heads over 3, stores of 3, 1 and 2 chunks of 128 rows, lengths 300 / 97 / 256:
    row g's scores equal scoring.py's launches over its chunks bit for bit, -inf past its
    length, and the torch twin's to fp32 rounding."""
    gen = torch.Generator().manual_seed(0)
    stores = [[torch.randn(128, 3, 59, generator=gen) for _ in range(n)] for n in (3, 1, 2)]
    n_keys = [300, 97, 256]
    table = torch.cat([address_table(s, torch.device("cpu")) for s in stores])
    meta = torch.tensor([n_keys, [0, 3, 4], [128] * 3])
    q = torch.randn(3, 9, 59, generator=gen)
    for reduce in ("max", "sum"):
        out = score_batched(q, table, stores[0][0], meta, 320, reduce=reduce)
        for g, (s, n) in enumerate(zip(stores, n_keys, strict=True)):
            own = torch.cat([score(q[g], c, reduce=reduce) for c in s], dim=1)[:, :n]
            assert torch.equal(out[g, :, :n], own)
            assert bool((out[g, :, n:] == float("-inf")).all())
        ref = score_batched_reference(q, [torch.cat(s)[:n] for s, n in zip(stores, n_keys, strict=True)], 320,
                                      reduce=reduce)
        assert bool(torch.isclose(out, ref, atol=1e-4, rtol=1e-5).all())


def test_score_batched_checks_its_arguments():
    k0 = torch.randn(64, 3, 16)
    table = address_table([k0], torch.device("cpu"))
    q = torch.randn(2, 9, 16)
    with pytest.raises(ValueError, match="meta must be"):
        score_batched(q, table, k0, torch.zeros(3, 3, dtype=torch.long), 64)
    with pytest.raises(ValueError, match="reduce must be"):
        score_batched(q, table, k0, torch.zeros(3, 2, dtype=torch.long), 64, reduce="mean")


def _rows(lengths, device="cpu"):
    gen = torch.Generator().manual_seed(3)
    out = []
    for n in lengths:
        r = make_retriever(RetrievalConfig(method="exact", options={"keys_on": "device", "chunk_rows": 128}),
                           MODEL, device)
        r.build(0, torch.randn(HKV, n, D, generator=gen), None)
        out.append(r)
    return out


def test_select_batch_selects_what_each_row_selects():
    """Rows of 700, 20 (under the budget: every row) and 333 keys, budgets 24 / 24 / 40: each
    row's ids per KV head are its own select()'s (the CPU select returns them unordered, so
    both are compared sorted), counters equal. On the CPU rows search alone in a batched step
    (search_key None: the CPU search hands its logits to the attention)."""
    lengths, budgets = [700, 20, 333], [24, 24, 40]
    alone, batched = _rows(lengths), _rows(lengths)
    assert batch_search_key(batched[0]) is None
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        q = torch.randn(len(lengths), HQ, D, generator=gen)
        want = [r.select(0, q[g], budgets[g]) for g, r in enumerate(alone)]
        got = ExactRetriever.select_batch(batched, 0, q, budgets)
        for w, s in zip(want, got, strict=True):
            assert torch.equal(torch.sort(s.ids, -1).values, torch.sort(w.ids, -1).values)
            assert (s.scanned, s.padded) == (w.scanned, w.padded)
        new = torch.randn(HKV, 5, D, generator=gen)
        for r in alone + batched:
            r.add(0, new, torch.arange(5))
    assert [r.stats() for r in alone] == [r.stats() for r in batched]


@pytest.mark.gpu
def test_cuda_select_batch_equals_each_row():
    """On CUDA (bf16 key copies, Llama-3-8B heads, 16K-row chunks): the same ids per KV head as
    each row's own select (compared sorted: a top-k over another length may order exactly tied
    scores otherwise), for rows of three lengths incl. one under the budget."""
    cfg = ModelConfig.from_name("llama3-8b")
    gen = torch.Generator().manual_seed(5)
    rows = {"alone": [], "batched": []}
    for n in (40000, 1500, 20000):
        keys = torch.randn(cfg.n_kv_heads, n, cfg.head_dim, generator=gen).to(torch.bfloat16)
        for found in rows.values():
            r = make_retriever(RetrievalConfig(method="exact"), cfg, "cuda")
            r.build(0, keys, None)
            found.append(r)
    assert batch_search_key(rows["batched"][0]) is not None
    for _ in range(5):
        q = torch.randn(3, cfg.n_heads, cfg.head_dim, generator=gen).to("cuda", torch.bfloat16)
        want = [r.select(0, q[g], 2048) for g, r in enumerate(rows["alone"])]
        got = ExactRetriever.select_batch(rows["batched"], 0, q, [2048] * 3)
        for w, s in zip(want, got, strict=True):
            assert torch.equal(torch.sort(w.ids, -1).values, torch.sort(s.ids, -1).values)

"""Offloaded chunked prefill and sparse prefill (runtime/attention.py, module docstring).

- chunked prefill over several host chunks (streamed one at a time) + greedy decode gives
  the tokens of prefilling the whole prompt in one chunk, for the exact retriever and for
  TokenSelect;
- sparse prefill (past prefill_dense_tokens) with a budget covering the host tier equals
  dense prefill; with a small budget it reads fewer host keys and attends to exactly the
  sink, window and top blocks for the chunk's mean query (hand-computed);
- the block summary and the block selection against brute force; config errors.
"""

from __future__ import annotations

import pytest
import torch

from kvloft import CacheConfig, RetrievalConfig, RuntimeConfig, Session, load_model
from kvloft.config import ModelConfig
from kvloft.kernels import REFERENCE
from kvloft.runtime.attention import TieredAttention
from kvloft.runtime.prefill import top_block_rows
from kvloft.tiers.block_summary import BlockSummary
from kvloft.tiers.kvcache import TieredKVCache

N_DECODE = 20
LOGIT_TOL = 1e-5  # relative L2 error of the stacked logits, fp32 (measured ~1e-7)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu", dtype="float32", seed=11)


def _greedy(model, rcfg, prompt, chunk, host_chunk=16, n_decode=N_DECODE):
    """Prefill `prompt` in chunks of `chunk`, then decode greedily; (logits [1 + n, V], tokens, session)."""
    s = Session(model, rcfg, RuntimeConfig(prefill_chunk=chunk, progress=False),
                CacheConfig(host_chunk_tokens=host_chunk))
    s.feed(prompt)
    logits, tokens = [s.last_logits.clone()], []
    for _ in range(n_decode):
        tokens.append(int(logits[-1].argmax()))
        logits.append(s.step(tokens[-1]).clone())
    return torch.stack(logits), tokens, s


def _rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("method,budget", [("exact", 10_000), ("exact", 48), ("tokenselect", 48)])
def test_offloaded_prefill_gives_the_tokens_of_one_chunk(tiny, method, budget):
    prompt = torch.randint(0, tiny.config.vocab_size, (300,))
    rcfg = RetrievalConfig(method=method, budget=budget, n_sink=4, n_window=32)
    whole, tok_whole, s_whole = _greedy(tiny, rcfg, prompt, chunk=1000)
    parts, tok_parts, s_parts = _greedy(tiny, rcfg, prompt, chunk=24)
    tiers = s_parts.backend.cache[0]
    assert len(tiers.host_k.chunks) > 10  # the prompt's host tier spans many host chunks
    st = s_parts.backend.prefill_stats
    assert st["dense_chunks"] == 13 and st["sparse_chunks"] == 0
    # every chunk read all host rows before it: sum over chunks of (start - 36), all layers, heads
    host_before = sum(max(0, i - 36) for i in range(0, 300, 24))
    assert st["host_keys"] == host_before * tiny.config.n_layers * tiny.config.n_kv_heads
    assert s_whole.backend.prefill_stats["host_keys"] == 0
    assert tok_parts == tok_whole
    assert _rel_err(parts, whole) < LOGIT_TOL


def test_offloaded_prefill_equals_dense_attention(tiny):
    """The offloaded chunked prefill is dense attention: against the dense backend."""
    prompt = torch.randint(0, tiny.config.vocab_size, (200,))
    dense, tok_dense, _ = _greedy(tiny, RetrievalConfig(method="dense"), prompt, chunk=24, n_decode=5)
    rcfg = RetrievalConfig(method="exact", budget=10_000, n_sink=0, n_window=16)
    got, tok_got, _ = _greedy(tiny, rcfg, prompt, chunk=24, host_chunk=7, n_decode=5)
    assert tok_got == tok_dense
    assert _rel_err(got, dense) < LOGIT_TOL


def test_sparse_prefill_with_covering_budget_equals_dense(tiny):
    prompt = torch.randint(0, tiny.config.vocab_size, (300,))
    base = RetrievalConfig(method="exact", budget=10_000, n_sink=4, n_window=32)
    dense, tok_dense, s_dense = _greedy(tiny, base, prompt, chunk=24)
    sparse_cfg = base.replace(prefill_dense_tokens=60, prefill_budget=10_000, prefill_block=7)
    sparse, tok_sparse, s = _greedy(tiny, sparse_cfg, prompt, chunk=24)
    st = s.backend.prefill_stats
    assert st["sparse_chunks"] == sum(i > 60 for i in range(0, 300, 24)) == 10
    assert st["dense_chunks"] == 3 and s_dense.backend.prefill_stats["sparse_chunks"] == 0
    assert "prefill_sparse_attention" in s.stats()["timings_s"]
    assert tok_sparse == tok_dense
    assert _rel_err(sparse, dense) < LOGIT_TOL


def test_sparse_prefill_small_budget_reads_fewer_keys(tiny):
    prompt = torch.randint(0, tiny.config.vocab_size, (300,))
    base = RetrievalConfig(method="exact", budget=10_000, n_sink=4, n_window=32)
    dense, _, s_dense = _greedy(tiny, base, prompt, chunk=24, n_decode=3)
    cfg = base.replace(prefill_dense_tokens=60, prefill_budget=16, prefill_block=8)
    got, _, s = _greedy(tiny, cfg, prompt, chunk=24, n_decode=3)
    st, st_dense = s.backend.prefill_stats, s_dense.backend.prefill_stats
    # sparse chunks read at most 16 rows per KV head for the mean query and 16 for the last one
    n_dense_host = sum(max(0, i - 36) for i in range(0, 61, 24))  # chunks at 0, 24, 48
    per_layer_head = n_dense_host + 10 * 2 * 16
    assert st["host_keys"] <= per_layer_head * tiny.config.n_layers * tiny.config.n_kv_heads
    assert st["host_keys"] < st_dense["host_keys"] / 3
    assert torch.isfinite(got).all()
    assert _rel_err(got, dense) > 1e-4  # selective: not the dense result
    assert s.stats()["bytes"]["summary"] > 0  # the block summaries, on the compute device


# ---- hand-computed: what a sparse chunk attends to ------------------------------------------

CFG = ModelConfig(name="sparse", vocab_size=16, hidden_size=96, intermediate_size=32, n_layers=1,
                  n_heads=6, n_kv_heads=3, head_dim=16)


def _attention_over(q, keys, vals, rows_per_head, scale):
    """q [H_q, D] over keys/vals [N, H_kv, D], KV head h reading rows_per_head[h] only."""
    g = CFG.group_size
    out = []
    for hq in range(CFG.n_heads):
        rows = torch.as_tensor(sorted(rows_per_head[hq // g]))
        p = torch.softmax(keys[rows, hq // g] @ q[hq] * scale, 0)
        out.append(p @ vals[rows, hq // g])
    return torch.stack(out)


def _blocks_by_hand(q, host_k, block, budget, reduce):
    """Host rows per KV head: block means, mean query, group reduce, greedy best-first fill."""
    n = host_k.shape[0]
    starts = list(range(0, n, block))
    means = torch.stack([host_k[s : s + block].mean(0) for s in starts])  # [n_blocks, H_kv, D]
    qm = q.mean(0)  # [H_q, D]
    g = CFG.group_size
    rows = []
    for h in range(CFG.n_kv_heads):
        s = torch.stack([means[:, h] @ qm[h * g + j] for j in range(g)])  # [g, n_blocks]
        s = s.amax(0) if reduce == "max" else s.sum(0)
        taken, used = [], 0
        for b in s.argsort(descending=True).tolist():
            size = min(block, n - starts[b])
            if taken and used + size > budget:
                break
            taken += range(starts[b], starts[b] + size)
            used += size
        rows.append(taken)
    return rows


@pytest.mark.parametrize("reduce", ["max", "sum"])
def test_sparse_chunk_attends_to_sink_window_and_top_blocks(reduce):
    n_sink, n_window, first, t = 2, 4, 40, 6
    q = torch.randn(first + t, 6, 16)
    k, v = torch.randn(first + t, 3, 16), torch.randn(first + t, 3, 16)
    pos = torch.arange(first + t)
    rcfg = RetrievalConfig(budget=12, n_sink=n_sink, n_window=n_window, gqa_reduce=reduce,
                           prefill_dense_tokens=first - 1, prefill_block=5)
    cache = TieredKVCache(CFG, n_sink=n_sink, n_window=n_window, host_chunk=8, device=torch.device("cpu"),
                          dtype=torch.float32)
    att = TieredAttention(CFG, rcfg, cache, None, REFERENCE, torch.device("cpu"))
    att.attend(0, q[:first], k[:first], v[:first], pos[:first])  # dense: nothing before it
    n_host = first - n_sink - n_window  # rows 0..33 = tokens 2..35; 7 blocks, the last of 4
    assert att.prefill_stats == {"dense_chunks": 1, "sparse_chunks": 0, "host_keys": 0}
    got = att.attend(0, q[first:], k[first:], v[first:], pos[first:])
    assert att.prefill_stats["sparse_chunks"] == 1

    host_k = k[n_sink : n_sink + n_host]
    static = set(range(n_sink)) | set(range(first - n_window, first))
    scale = 16**-0.5
    by_mean = _blocks_by_hand(q[first:], host_k, 5, 12, reduce)
    by_last = _blocks_by_hand(q[-1:], host_k, 5, 12, reduce)  # the last query selects alone
    for i in range(t):
        rows = by_mean if i < t - 1 else by_last
        seen = [static | {n_sink + r for r in rr} | set(range(first, first + i + 1)) for rr in rows]
        want = _attention_over(q[first + i], k, v, seen, scale)
        torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-5)
    assert all(len(r) <= 12 for r in by_mean + by_last)
    read = sum(len(r) for r in by_mean + by_last)
    assert att.prefill_stats["host_keys"] == read < 2 * n_host * 3


def test_top_block_rows_hand_computed():
    scores = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 4.0]])  # blocks of 4, 4, 3 rows (n = 11)
    assert top_block_rows(scores, 11, 4, 7).tolist() == [[0, 1, 2, 3, 8, 9, 10], [4, 5, 6, 7, 8, 9, 10]]
    assert top_block_rows(scores, 11, 4, 5).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert top_block_rows(scores, 11, 4, 2).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]  # one block at least
    assert top_block_rows(scores, 11, 4, 11).tolist() == [list(range(11))] * 2  # covering: every row
    assert top_block_rows(scores, 11, 4, 0).shape == (2, 0)
    part = torch.tensor([[0.0, 0.0, 9.0], [9.0, 0.0, 0.0]])  # head 0 takes the partial block: a pad
    assert top_block_rows(part, 11, 4, 4).tolist() == [[8, 9, 10, -1], [0, 1, 2, 3]]


def test_block_summary_matches_brute_force():
    rows = torch.randn(103, 3, 16)
    s = BlockSummary(8, (3, 16), torch.float32, torch.device("cpu"))
    for a, b in [(0, 1), (1, 5), (5, 21), (21, 24), (24, 90), (90, 103)]:  # across block edges
        s.add(rows[a:b])
        want = torch.stack([rows[i : min(i + 8, b)].mean(0) for i in range(0, b, 8)])
        torch.testing.assert_close(s.means(), want, rtol=1e-5, atol=1e-6)


def test_block_summary_catches_up_from_the_host_tier():
    """A summary made after rows reached the host tier reads them back, then follows appends."""
    cache = TieredKVCache(CFG, n_sink=2, n_window=4, host_chunk=8, device=torch.device("cpu"),
                          dtype=torch.float32)
    k = torch.randn(60, 3, 16)
    tiers = cache[0]
    tiers.append(k[:30], k[:30], torch.arange(30))
    s = tiers.block_summary(5)
    tiers.append(k[30:], k[30:], torch.arange(30, 60))
    host = k[2:56]
    want = torch.stack([host[i : i + 5].mean(0) for i in range(0, 54, 5)])
    torch.testing.assert_close(tiers.block_summary(5).means(), want, rtol=1e-5, atol=1e-6)
    assert s is tiers.summary and cache.bytes()["summary"] > 0


@pytest.mark.parametrize("field,value,err", [
    ("prefill_dense_tokens", -1, ValueError),
    ("prefill_dense_tokens", 1.5, TypeError),
    ("prefill_budget", -2, ValueError),
    ("prefill_budget", True, TypeError),
    ("prefill_block", 0, ValueError),
    ("prefill_block", "64", TypeError),
])
def test_bad_prefill_config_is_refused(field, value, err):
    with pytest.raises(err, match=field):
        RetrievalConfig(**{field: value})


def test_prefill_budget_defaults_to_budget():
    assert RetrievalConfig(budget=96).sparse_prefill_budget == 96
    assert RetrievalConfig(budget=96, prefill_budget=0).sparse_prefill_budget == 0


# ---- CUDA: streamed host chunks, asynchronous copy down -------------------------------------


@pytest.mark.gpu
def test_cuda_offloaded_prefill_matches_one_chunk():
    model = load_model("tiny", device="cuda", dtype="float32", seed=11)
    prompt = torch.randint(0, model.config.vocab_size, (300,))
    rcfg = RetrievalConfig(method="exact", budget=10_000, n_sink=4, n_window=32)
    whole, tok_whole, _ = _greedy(model, rcfg, prompt, chunk=1000)
    parts, tok_parts, s = _greedy(model, rcfg, prompt, chunk=24)
    assert tok_parts == tok_whole and _rel_err(parts, whole) < 1e-4  # TF32 matmuls allowed
    sparse, tok_sparse, _ = _greedy(model, rcfg.replace(prefill_dense_tokens=60), prompt, chunk=24)
    assert tok_sparse == tok_whole and _rel_err(sparse, whole) < 1e-4
    tiers = s.backend.cache[0]
    assert tiers.host_k.pin and len(tiers.host_k.chunks) > 10


@pytest.mark.gpu
def test_cuda_dense_prefill_streams_two_host_chunks_at_most():
    """A chunk over a 64K-token host tier: dense attention's result, with device memory for
    two host chunks (plus the chunk's logits), not for the host tier."""
    cfg = ModelConfig(name="wide", vocab_size=16, hidden_size=1024, intermediate_size=32, n_layers=1,
                      n_heads=16, n_kv_heads=8, head_dim=64)
    dev, n_host, chunk, t = torch.device("cuda"), 262144, 4096, 64
    cache = TieredKVCache(cfg, n_sink=0, n_window=1, host_chunk=chunk, device=dev, dtype=torch.float16)
    rcfg = RetrievalConfig(budget=16, n_sink=0, n_window=1, prefill_dense_tokens=10**9)  # dense
    att = TieredAttention(cfg, rcfg, cache, None, REFERENCE, dev)
    k = torch.randn(n_host + 1 + t, 8, 64, dtype=torch.float16)
    v = torch.randn_like(k)
    q = torch.randn(t, 16, 64, dtype=torch.float16, device=dev)
    cache[0].append(k[: n_host + 1].to(dev), v[: n_host + 1].to(dev), torch.arange(n_host + 1, device=dev))
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    kc, vc = k[n_host + 1 :].to(dev), v[n_host + 1 :].to(dev)
    got = att.attend(0, q, kc, vc, torch.arange(n_host + 1, n_host + 1 + t, device=dev))
    peak = torch.cuda.max_memory_allocated() - base
    host_bytes = 2 * n_host * 8 * 64 * 2
    chunk_bytes = 2 * chunk * 8 * 64 * 2
    logits_bytes = 16 * t * chunk * 4
    assert peak < 2 * chunk_bytes + 4 * logits_bytes + (8 << 20), (peak, host_bytes)
    assert peak < host_bytes / 4
    assert att.prefill_stats["dense_chunks"] == 1
    want, _ = REFERENCE.attend(q.float(), k.to(dev).float(), v.to(dev).float(), scale=64**-0.5, causal=True)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-3)
    assert torch.equal(cache[0].host_k.all(), k[: n_host + t])  # the asynchronous copies down landed

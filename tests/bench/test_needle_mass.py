"""bench/needle_mass.py's HiP ladder: its selections against the retrievers they stand for, its ranks by hand."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from needle_mass import WINDOW, chunk_pick, chunk_rank, hip_ladder, needle_rows, value_rows

from kvloft.config import ModelConfig, RetrievalConfig
from kvloft.eval.attention_report import Layer
from kvloft.index.base import make_retriever
from kvloft.kernels.hip_stage import hip_stage1_reference


def test_chunk_rank_and_pick_by_hand():
    score = torch.tensor([0.5, 3.0, 1.0, 3.0, 2.0])  # chunks of 4 rows
    assert chunk_rank(score, 4, torch.tensor([9])) == 4  # row 9 -> chunk 2 (1.0): below 3.0, 3.0, 2.0
    assert chunk_rank(score, 4, torch.tensor([0, 17])) == 3  # best of chunks 0 and 4 (2.0): two above
    assert chunk_rank(score, 4, torch.tensor([99])) == -1  # past the last whole chunk
    # best 2 chunks, ties to the earlier: 1 then 3; a budget of 6 keeps 6 // 4 whole chunks (as HiP's n_keep)
    assert chunk_pick(score, 4, 8).tolist() == [4, 5, 6, 7, 12, 13, 14, 15]
    assert chunk_pick(score, 4, 6).tolist() == [4, 5, 6, 7]


def _layer(t=WINDOW + 700, hq=4, hkv=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Layer(torch.randn(t, hq, d, generator=g), torch.randn(t, hkv, d, generator=g),
                 torch.randn(t, hkv, d, generator=g))


def test_ladder_equals_exact_and_hip_retrievers():
    """ladder exact = ExactRetriever's ids per KV head; ladder hip_first = a one-stage HiP (chunks of 8,
    refreshed every step) built on the same host rows, in the same order."""
    tr, sink, budget, chunk = _layer(), 16, 128, 8
    pos = tr.q.shape[0] - 1
    stop = pos - WINDOW + 1
    sels, ranks = hip_ladder({0: tr}, range(pos, pos + 1), budget, chunk, [sink + 40, sink + 41], sink)
    cfg = ModelConfig(name="t", n_heads=4, n_kv_heads=2, head_dim=16, hidden_size=64, n_layers=1)
    keys = tr.k[sink:stop].transpose(0, 1).contiguous()
    ex = make_retriever(RetrievalConfig(method="exact", budget=budget), cfg, "cpu")
    ex.build(0, keys, None)
    want = ex.select(0, tr.q[pos], budget).ids
    got = sels["exact"][(0, pos)][0]
    assert [set(r.tolist()) for r in got] == [set(r.tolist()) for r in want]
    opts = {"chunk_sizes": (chunk,), "kept_tokens": (budget,), "refresh_steps": (1,), "kernel": "torch"}
    for probe in ("first", "middle"):
        hip = make_retriever(RetrievalConfig(method="hip", budget=budget, options={**opts, "probe": probe}), cfg, "cpu")
        hip.build(0, keys, None)
        assert torch.equal(sels[f"hip_{probe}"][(0, pos)][0], hip.select(0, tr.q[pos], budget).ids)
    shared = sels["shared_tokens"][(0, pos)][0]
    score = torch.einsum("hd,nhd->hn", tr.q[pos], tr.k[sink:stop].repeat_interleave(2, 1)).amax(0)
    assert set(shared.tolist()) == set(score.topk(budget).indices.tolist())
    assert sels["kv_chunks"][(0, pos)][0].shape == (2, budget)
    # the needle rows' chunk (rows 40-41 -> chunk 5) ranked by HiP's own chunk scores
    n_full = (stop - sink) // chunk
    hip_score = hip_stage1_reference(tr.k[sink:stop], tr.q[pos], chunk, "first")[1][:n_full]
    assert ranks[(0, pos)]["hip_first"] == int((hip_score > hip_score[5]).sum()) + 1


def test_z_scores_ignore_a_kv_heads_offset_and_a_heads_scale():
    """z_chunks and hipz_*: a constant added to every key of KV head 1 and a query head scaled by 5 change
    no per-head softmax, and change no z-scored pick; the raw max-logit pick (shared_chunks) moves."""
    tr, sink, budget, chunk = _layer(seed=1), 16, 128, 8
    pos = tr.q.shape[0] - 1
    k2 = tr.k.clone()
    k2[:, 1] += 3.0 * tr.q[pos, 2:].mean(0)  # KV head 1 (query heads 2, 3) gains a large common logit
    q2 = tr.q.clone()
    q2[:, 0] *= 5.0
    a, _ = hip_ladder({0: tr}, range(pos, pos + 1), budget, chunk, [sink + 40], sink)
    b, _ = hip_ladder({0: Layer(q2, k2, tr.v)}, range(pos, pos + 1), budget, chunk, [sink + 40], sink)
    for name in ("z_chunks", "hipz_first", "hipz_middle"):
        assert torch.equal(a[name][(0, pos)][0], b[name][(0, pos)][0]), name
    assert not torch.equal(a["shared_chunks"][(0, pos)][0], b["shared_chunks"][(0, pos)][0])



def test_value_rows_finds_a_value_the_answer_numbers():
    # a chat answer "1. 42": the answer's first two digits are "14", the value "42" sits at 3-4 and 7-8
    digits = {100 + i: str(i) for i in range(10)}
    dot, space, word = 7, 8, 9
    ids = [word, word, word, 104, 102, word, word, 104, 102, word] + [101, dot, space, 104, 102]
    prompt = 10
    assert needle_rows(ids, prompt, digits, 2) == []
    assert value_rows(ids, prompt, digits, "42") == [3, 4, 7, 8]
    assert value_rows(ids, prompt, digits, "4") == [3, 7]
    assert value_rows(ids, prompt, digits, "99") == []

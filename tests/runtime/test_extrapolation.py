"""Extrapolation mode (RetrievalConfig.position_mode="extrapolate"; runtime/attention.py docstring).

- the mapping, hand-computed: which position each sink / retrieved / window key is read at,
  in decode and in prefill, checked on the deltas and on the attention output;
- where the mapping is the identity (context within sink + window; a budget covering the
  host tier), the session equals dense attention;
- neighbour widening (RetrievalConfig.neighbor_radius): against set arithmetic, what a decode
  step reads (hand-computed), and the prefill selection against scores computed by hand;
- a prefill chunk's tail selecting per block (prefill_tail): the blocks, the queries they
  search with, and each block's rows against a chunk that took that block's keys whole;
- SmolLM2 (trained at 8K) finds a pass key at ~12K tokens (slow; KVLOFT_SLOW=1 runs it).
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from kvloft import RetrievalConfig, RuntimeConfig, Session, load_model
from kvloft.config import ModelConfig
from kvloft.index.base import Selection
from kvloft.index.diversity import capped_topk, similarity_buckets
from kvloft.kernels import REFERENCE
from kvloft.runtime.attention import TieredAttention, remap_deltas, widen_selection
from kvloft.runtime.model import rope_inv_freq, rotate
from kvloft.tiers.kvcache import TieredKVCache

CFG = ModelConfig(
    name="remap",
    vocab_size=16,
    hidden_size=96,
    intermediate_size=32,
    n_layers=1,
    n_heads=6,
    n_kv_heads=3,
    head_dim=16,
    rope_theta=10000.0,
)


def test_remap_deltas_hand_computed():
    # window starts at 20; sink at 0, 1, 2; per-head retrieved positions in score order
    ret = torch.tensor([[15, 4, 9], [7, -1, 11], [-1, -1, -1]])
    sink_d, ret_d = remap_deltas(torch.tensor(20), torch.tensor([0, 1, 2]), ret)
    # head 0: 4 -> 17, 9 -> 18, 15 -> 19; sink -> 14, 15, 16
    # head 1: 7 -> 18, 11 -> 19; sink -> 15, 16, 17
    # head 2: nothing retrieved; sink right before the window -> 17, 18, 19
    assert ret_d.tolist() == [[19 - 15, 17 - 4, 18 - 9], [18 - 7, 0, 19 - 11], [0, 0, 0]]
    assert sink_d.tolist() == [[14, 14, 14], [15, 15, 15], [17, 17, 17]]
    sink_s, ret_s = remap_deltas(torch.tensor(20), torch.tensor([0, 1, 2]), torch.tensor([9, 4]))
    assert ret_s.tolist() == [19 - 9, 18 - 4] and sink_s.tolist() == [15, 15, 15]


class FixedRetriever:
    """Returns fixed host rows (to hand-compute what the query sees), cycling through `ids`."""

    needs_queries = False

    def __init__(self, *ids: torch.Tensor) -> None:
        self.ids = list(ids)
        self.calls = 0

    def build(self, layer, keys, queries):
        pass

    def add(self, layer, keys, positions):
        pass

    def select(self, layer, q, budget):
        self.calls += 1
        return Selection(ids=self.ids[(self.calls - 1) % len(self.ids)].clone(), scanned=0)

    def stats(self):
        return {}


def rope(pos: torch.Tensor, inv: torch.Tensor):
    ang = pos.double()[:, None] * inv.double()[None]
    ang = torch.cat((ang, ang), dim=-1)
    return ang.cos().float(), ang.sin().float()


def attention_at(q0, qpos, k0, v, seen, inv, scale):
    """Dense attention of one unrotated query q0 [H_q, D] at qpos over unrotated keys
    k0/v [T, H_kv, D], KV head h reading token t at position seen[h][t]."""
    q = rotate(q0[None], *rope(torch.tensor([qpos]), inv))[0]
    g = CFG.group_size
    out = []
    for hq in range(CFG.n_heads):
        h = hq // g
        toks = sorted(seen[h])
        keys = rotate(k0[toks, h : h + 1], *rope(torch.tensor([seen[h][t] for t in toks]), inv))[:, 0]
        p = torch.softmax(keys @ q[hq] * scale, 0)
        out.append(p @ v[toks, h])
    return torch.stack(out)


# host rows picked per KV head (row r holds position r + 2: two sink tokens come first)
IDS = torch.tensor([[5, 1], [6, -1], [0, 7]])
# hand-computed positions each KV head reads the sink and retrieved tokens at (token: position)
PREFILL_SEEN = [  # chunk 12..13; window 9..11 (w0 = 9)
    {0: 5, 1: 6, 3: 7, 7: 8},  # rows 1, 5 = tokens 3, 7 (k = 2)
    {0: 6, 1: 7, 8: 8},  # row 6 = token 8 (k = 1, one pad)
    {0: 5, 1: 6, 2: 7, 8: 8},  # rows 0, 6 = tokens 2, 8 (row 7 is not in the host tier yet)
]
# the chunk's last query (13) selects for itself: these rows, hand-mapped the same way
LAST_IDS = torch.tensor([[2, 3], [4, 0], [-1, -1]])
LAST_SEEN = [
    {0: 5, 1: 6, 4: 7, 5: 8},  # rows 2, 3 = tokens 4, 5
    {0: 5, 1: 6, 2: 7, 6: 8},  # rows 0, 4 = tokens 2, 6 (in score order 4, 0)
    {0: 7, 1: 8},  # nothing retrieved: the sink sits right before the window
]
DECODE_SEEN = [  # query 14; window 12..14 (w0 = 12)
    {0: 8, 1: 9, 3: 10, 7: 11},
    {0: 9, 1: 10, 8: 11},
    {0: 8, 1: 9, 2: 10, 9: 11},
]


@pytest.mark.parametrize("host_chunk", [4, 64])  # several host chunks, or one
def test_positions_seen_in_prefill_and_decode(host_chunk):
    n_tok = 15
    k0, v = torch.randn(n_tok, 3, 16), torch.randn(n_tok, 3, 16)
    q0 = torch.randn(n_tok, 6, 16)
    inv = rope_inv_freq(CFG)
    pos = torch.arange(n_tok)
    cos, sin = rope(pos, inv)
    q, k = rotate(q0, cos, sin), rotate(k0, cos, sin)  # stored after RoPE at true positions
    rcfg = RetrievalConfig(budget=2, n_sink=2, n_window=3, position_mode="extrapolate")
    cache = TieredKVCache(
        CFG, n_sink=2, n_window=3, host_chunk=host_chunk, device=torch.device("cpu"), dtype=torch.float32
    )
    prefill_ids = IDS.clone()
    prefill_ids[2, 1] = 6  # 7 host rows before the second chunk
    retr = FixedRetriever(prefill_ids, LAST_IDS)  # the chunk's mean query, then its last query
    att = TieredAttention(CFG, rcfg, cache, retr, REFERENCE, torch.device("cpu"))
    scale = 16**-0.5

    att.attend(0, q[:12], k[:12], v[:12], pos[:12])  # first chunk: no host tier yet
    att.build_indexes()
    got = att.attend(0, q[12:14], k[12:14], v[12:14], pos[12:14])
    assert retr.calls == 2
    for i, (qpos, mapped) in enumerate(((12, PREFILL_SEEN), (13, LAST_SEEN))):
        seen = [{**m, **{t: t for t in range(9, qpos + 1)}} for m in mapped]
        want = attention_at(q0[qpos], qpos, k0, v, seen, inv, scale)
        torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-5)

    retr.ids = [IDS]
    att.decoding = True
    got = att.attend(0, q[14:], k[14:], v[14:], pos[14:])
    seen = [{**m, 12: 12, 13: 13, 14: 14} for m in DECODE_SEEN]
    want = attention_at(q0[14], 14, k0, v, seen, inv, scale)
    torch.testing.assert_close(got[0], want, rtol=1e-4, atol=1e-5)


def _tiers_and_qkv(n_tok, rcfg, host_chunk=4):
    """Unrotated q0, k0, v and the stored (rotated) q, k; an attention over a fresh cache."""
    k0, v = torch.randn(n_tok, 3, 16), torch.randn(n_tok, 3, 16)
    q0 = torch.randn(n_tok, 6, 16)
    inv = rope_inv_freq(CFG)
    cos, sin = rope(torch.arange(n_tok), inv)
    cache = TieredKVCache(CFG, n_sink=rcfg.n_sink, n_window=rcfg.n_window, host_chunk=host_chunk,
                          device=torch.device("cpu"), dtype=torch.float32)
    return q0, k0, v, rotate(q0, cos, sin), rotate(k0, cos, sin), cache, inv


@pytest.mark.parametrize("radius", [0, 1, 3])
def test_widen_selection_against_sets(radius):
    g = torch.Generator().manual_seed(radius)
    n_host = 40
    ids = torch.randint(0, n_host, (3, 7), generator=g)
    ids[0, 2] = ids[0, 5]  # a repeated pick
    ids[1, :3] = -1  # padding
    ids[2] = torch.tensor([0, 1, 39, 38, -1, 20, 22])  # at both ends; overlapping neighbourhoods
    got = widen_selection(ids, radius, n_host)
    assert got.shape == (3, 7 * (2 * radius + 1))
    for h in range(3):
        want = {j for c in ids[h].tolist() if c >= 0
                for j in range(c - radius, c + radius + 1) if 0 <= j < n_host}
        rows = [r for r in got[h].tolist() if r >= 0]
        assert len(rows) == len(set(rows)) and set(rows) == want
    shared = widen_selection(ids[2], radius, n_host)
    assert shared.tolist() == got[2].tolist()


def test_similarity_cap_defaults_follow_the_position_mode():
    exact, extra = RetrievalConfig(), RetrievalConfig(position_mode="extrapolate")
    assert (exact.max_similar, exact.similar_bits) == (0, 16)
    assert (extra.max_similar, extra.similar_bits) == (4, 8)
    assert exact.replace(position_mode="extrapolate") == extra
    assert extra.replace(position_mode="exact") == exact
    kept = RetrievalConfig(max_similar=2).replace(position_mode="extrapolate")  # set by hand: kept
    assert (kept.max_similar, kept.similar_bits) == (2, 8)
    assert extra.replace(budget=7).max_similar == 4


def test_neighbor_radius_is_validated():
    with pytest.raises(ValueError, match="neighbor_radius"):
        RetrievalConfig(neighbor_radius=-1)
    with pytest.raises(TypeError, match="neighbor_radius"):
        RetrievalConfig(neighbor_radius=1.5)
    with pytest.raises(ValueError, match="prefill_tail_block"):
        RetrievalConfig(prefill_tail_block=0)
    with pytest.raises(ValueError, match="prefill_tail"):
        RetrievalConfig(prefill_tail=-1)


# budget 6, radius 1: the retriever picks 6 // 3 = 2 rows per head, each widened by one row a side
WIDE_DECODE_SEEN = [  # query 14; window 12..14 (w0 = 12); host row r = token r + 2
    {0: 4, 1: 5, 2: 6, 3: 7, 4: 8, 6: 9, 7: 10, 8: 11},  # rows 5, 1 -> rows 0-2, 4-6 (k = 6)
    {0: 7, 1: 8, 7: 9, 8: 10, 9: 11},  # rows 6, pad -> rows 5-7 (k = 3)
    {0: 5, 1: 6, 2: 7, 3: 8, 8: 9, 9: 10, 10: 11},  # rows 0, 7 -> rows 0-1, 6-8 (k = 5)
]


def test_decode_reads_widened_rows_at_remapped_positions():
    rcfg = RetrievalConfig(budget=6, n_sink=2, n_window=3, position_mode="extrapolate", neighbor_radius=1)
    q0, k0, v, q, k, cache, inv = _tiers_and_qkv(15, rcfg)
    retr = RecordingRetriever(IDS)
    att = TieredAttention(CFG, rcfg, cache, retr, REFERENCE, torch.device("cpu"))
    pos = torch.arange(15)
    att.attend(0, q[:14], k[:14], v[:14], pos[:14])  # one chunk: no host tier before it
    att.build_indexes()
    att.decoding = True
    got = att.attend(0, q[14:], k[14:], v[14:], pos[14:])
    assert retr.budget == 2
    seen = [{**m, 12: 12, 13: 13, 14: 14} for m in WIDE_DECODE_SEEN]
    want = attention_at(q0[14], 14, k0, v, seen, inv, 16**-0.5)
    torch.testing.assert_close(got[0], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("radius", [0, 2])
def test_prefill_selection_by_hand(radius):
    """Before the index is built a prefill chunk picks, per KV head, the host rows whose
    position-free key scores highest for the chunk's mean query seen n_window after them
    (max over the GQA group), budget // (2r + 1) of them, widened by r rows a side."""
    rcfg = RetrievalConfig(budget=10, n_sink=2, n_window=3, position_mode="extrapolate",
                           neighbor_radius=radius, max_similar=0)
    q0, k0, v, q, k, cache, inv = _tiers_and_qkv(60, rcfg)
    att = TieredAttention(CFG, rcfg, cache, FixedRetriever(IDS), REFERENCE, torch.device("cpu"))
    pos = torch.arange(60)
    att.attend(0, q[:50], k[:50], v[:50], pos[:50])  # host: tokens 2..46 (45 rows)
    got = att._prefill_select(0, cache[0], q[50:60], pos[50:60])
    q_search = rotate(q0[50:60], *rope(torch.full((10,), rcfg.n_window), inv)).mean(0)  # [H_q, D]
    logits = torch.einsum("hd,nhd->hn", q_search, k0[2:47].repeat_interleave(2, dim=1))  # [H_q, 45]
    best = logits.view(3, 2, 45).amax(1).topk(10 // (2 * radius + 1), dim=-1).indices  # [H_kv, m]
    for h in range(3):
        want = {j for c in best[h].tolist() for j in range(c - radius, c + radius + 1) if 0 <= j < 45}
        rows = [r for r in got[h].tolist() if r >= 0]
        assert len(rows) == len(set(rows)) and set(rows) == want


def test_prefill_selections_in_one_pass_match_each_range_by_hand():
    """Several query ranges selected in one pass over the host keys (the chunk and its tail
    blocks), with the near-duplicate cap on: each range's rows are the capped top keys of its
    own mean query, by hand, with buckets hashed from all position-free keys at once (the
    pass uses buckets cached as rows arrived, over several host chunks)."""
    rcfg = RetrievalConfig(budget=9, n_sink=2, n_window=3, position_mode="extrapolate",
                           neighbor_radius=1, max_similar=2, similar_bits=2)
    q0, k0, v, q, k, cache, inv = _tiers_and_qkv(60, rcfg)
    att = TieredAttention(CFG, rcfg, cache, FixedRetriever(IDS), REFERENCE, torch.device("cpu"))
    pos = torch.arange(60)
    att.attend(0, q[:30], k[:30], v[:30], pos[:30])
    att.attend(0, q[30:50], k[30:50], v[30:50], pos[30:50])  # host: tokens 2..46 (45 rows, 12 chunks)
    assert len(att._free_buckets[0]) == 25  # synced lazily: the rows before the second chunk
    ranges = [(0, 10), (4, 8), (9, 10)]
    got = att._prefill_selections(0, cache[0], q[50:60], pos[50:60], ranges)
    assert len(att._free_keys[0]) == 45 and len(att._free_buckets[0]) == 45
    free = k0[2:47]  # [45, H_kv, D] position-free keys
    buckets = similarity_buckets(free, 2)  # [H_kv, 45]
    for (a, b), ids in zip(ranges, got):
        q_search = rotate(q0[50 + a : 50 + b], *rope(torch.full((b - a,), rcfg.n_window), inv)).mean(0)
        logits = torch.einsum("hd,nhd->hn", q_search, free.repeat_interleave(2, dim=1))  # [H_q, 45]
        best = capped_topk(logits.view(3, 2, 45).amax(1), buckets, 9 // 3, 2)  # [H_kv, 3]
        for h in range(3):
            want = {j for c in best[h].tolist() if c >= 0 for j in (c - 1, c, c + 1) if 0 <= j < 45}
            rows = [r for r in ids[h].tolist() if r >= 0]
            assert len(rows) == len(set(rows)) and set(rows) == want


@pytest.mark.parametrize(("n", "tail", "block", "want"), [
    (512, 64, 8, [(a, a + 8) for a in range(448, 512, 8)] + [(511, 512)]),
    (20, 16, 8, [(4, 12), (12, 20), (19, 20)]),
    (9, 64, 8, [(0, 8), (8, 9)]),  # the tail is clipped to the chunk; the last block is the last query
    (2, 64, 8, [(1, 2)]),  # a block holding the whole chunk is the chunk's own selection
    (10, 0, 8, [(9, 10)]),  # no tail: the last query alone
    (1, 64, 8, []),
])
def test_tail_blocks(n, tail, block, want):
    rcfg = RetrievalConfig(position_mode="extrapolate", prefill_tail=tail, prefill_tail_block=block)
    att = TieredAttention(CFG, rcfg, None, FixedRetriever(IDS), REFERENCE, torch.device("cpu"))
    assert att.tail_blocks(n) == want


def test_tail_blocks_select_for_themselves():
    """Chunk 12..16, tail 4 in blocks of 2: queries 13-14, 15-16, then 16 alone search with
    their own mean query (placed n_window after the keys) and each block's rows equal those of
    a chunk that read that block's keys whole (no tail; hand-checked above for one chunk)."""
    n_tok = 17
    rcfg = RetrievalConfig(budget=2, n_sink=2, n_window=3, position_mode="extrapolate", neighbor_radius=0,
                           prefill_tail=4, prefill_tail_block=2)
    q0, _, v, q, k, _, inv = _tiers_and_qkv(n_tok, rcfg)
    pos = torch.arange(n_tok)
    picks = [torch.tensor([[5, 1], [6, -1], [0, 6]]), LAST_IDS, torch.tensor([[0, 6], [3, -1], [5, 1]]),
             torch.tensor([[4, -1], [2, 6], [1, 0]])]  # host rows 0..6 = tokens 2..8

    def chunk_out(rc, retr, whole_chunk_only=False):
        cache = TieredKVCache(CFG, n_sink=2, n_window=3, host_chunk=4, device=torch.device("cpu"),
                              dtype=torch.float32)
        att = TieredAttention(CFG, rc, cache, retr, REFERENCE, torch.device("cpu"))
        att.select_last_query = not whole_chunk_only
        att.attend(0, q[:12], k[:12], v[:12], pos[:12])
        att.build_indexes()
        return att.attend(0, q[12:], k[12:], v[12:], pos[12:])

    retr = RecordingRetriever(*picks)
    got = chunk_out(rcfg, retr)
    assert retr.calls == 4
    for (a, b), query in zip([(0, 5), (1, 3), (3, 5), (4, 5)], retr.queries):
        want_q = rotate(q0[12 + a : 12 + b], *rope(torch.full((b - a,), rcfg.n_window), inv)).mean(0)
        torch.testing.assert_close(query, want_q, rtol=1e-5, atol=1e-5)
    whole = rcfg.replace(prefill_tail=0)
    for (a, b), ids in zip([(0, 1), (1, 3), (3, 4), (4, 5)], [picks[0], picks[1], picks[2], picks[3]]):
        want = chunk_out(whole, FixedRetriever(ids), whole_chunk_only=True)
        torch.testing.assert_close(got[a:b], want[a:b], rtol=1e-5, atol=1e-6)


class RecordingRetriever(FixedRetriever):
    def build(self, layer, keys, queries):
        self.built_keys = keys

    def add(self, layer, keys, positions):
        self.added = (keys, positions)

    def select(self, layer, q, budget):
        self.query, self.budget = q, budget
        self.queries = [*getattr(self, "queries", []), q]
        return super().select(layer, q, budget)


def test_index_sees_position_free_keys_and_queries():
    """Extrapolate mode indexes keys with RoPE undone and searches with the query placed
    n_window after them: a key is ranked by the logit it has where retrieved keys are read."""
    k0, v = torch.randn(15, 3, 16), torch.randn(15, 3, 16)
    q0 = torch.randn(15, 6, 16)
    inv = rope_inv_freq(CFG)
    pos = torch.arange(15)
    cos, sin = rope(pos, inv)
    q, k = rotate(q0, cos, sin), rotate(k0, cos, sin)
    rcfg = RetrievalConfig(budget=2, n_sink=2, n_window=3, position_mode="extrapolate")
    cache = TieredKVCache(
        CFG, n_sink=2, n_window=3, host_chunk=4, device=torch.device("cpu"), dtype=torch.float32
    )
    retr = RecordingRetriever(IDS)
    att = TieredAttention(CFG, rcfg, cache, retr, REFERENCE, torch.device("cpu"))
    att.attend(0, q[:12], k[:12], v[:12], pos[:12])
    att.build_indexes()
    torch.testing.assert_close(
        retr.built_keys, k0[2:9].transpose(0, 1), rtol=0, atol=1e-5
    )  # host: tokens 2..8
    att.decoding = True
    att.attend(0, q[12:13], k[12:13], v[12:13], pos[12:13])
    torch.testing.assert_close(
        retr.added[0], k0[9:10].transpose(0, 1), rtol=0, atol=1e-5
    )  # token 9 left the window
    want = rotate(q0[12:13], *rope(torch.tensor([rcfg.n_window]), inv))[0]
    torch.testing.assert_close(retr.query, want, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu", dtype="float32", seed=7)


def _run(model, rcfg, parts, steps, chunk=64):
    """Feed each prompt part, then decode `steps` tokens after each; stacked logits."""
    s = Session(model, rcfg, RuntimeConfig(prefill_chunk=chunk, progress=False))
    out = []
    for part in parts:
        s.feed(part)
        out.append(s.last_logits.clone())
        out += [s.step(int(t)).clone() for t in steps]
    return torch.stack(out), s


def _rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("radius", [0, 2])
def test_covering_budget_equals_dense(tiny, radius):
    """Retrieving the whole host tier puts every key back on its true position, in decode,
    in the first prefill (exact scores on the host tier) and a later one (the retriever)."""
    g = torch.Generator().manual_seed(0)
    parts = [torch.randint(0, 512, (300,), generator=g), torch.randint(0, 512, (90,), generator=g)]
    steps = torch.randint(0, 512, (4,), generator=g)
    dense, _ = _run(tiny, RetrievalConfig(method="dense"), parts, steps)
    rcfg = RetrievalConfig(method="exact", budget=4096, n_sink=8, n_window=32, position_mode="extrapolate",
                           neighbor_radius=radius)
    got, s = _run(tiny, rcfg, parts, steps)
    assert s.stats()["tier_tokens"]["host"] > 300
    assert _rel_err(got, dense) < 1e-5


def test_context_within_sink_and_window_equals_dense(tiny):
    prompt = torch.randint(0, 512, (30,))
    steps = torch.randint(0, 512, (5,))
    dense, _ = _run(tiny, RetrievalConfig(method="dense"), [prompt], steps, chunk=16)
    rcfg = RetrievalConfig(method="exact", budget=16, n_sink=8, n_window=32, position_mode="extrapolate")
    got, s = _run(tiny, rcfg, [prompt], steps, chunk=16)
    assert s.stats()["tier_tokens"]["host"] == 0
    assert _rel_err(got, dense) < 1e-5


def test_small_budget_remaps(tiny):
    """With a selective budget the two modes differ (keys moved), and both stay finite."""
    prompt = torch.randint(0, 512, (400,))
    steps = torch.randint(0, 512, (3,))

    def run(mode):
        rcfg = RetrievalConfig(method="exact", budget=32, n_sink=4, n_window=16, position_mode=mode)
        return _run(tiny, rcfg, [prompt], steps)[0]

    exact, extra = run("exact"), run("extrapolate")
    assert torch.isfinite(extra).all()
    assert _rel_err(extra, exact) > 1e-3


SLOW = pytest.mark.skipif(
    os.environ.get("KVLOFT_SLOW") != "1",
    reason="prefills 12K tokens of SmolLM2 on the CPU; set KVLOFT_SLOW=1 to run",
)


@pytest.mark.slow
@SLOW
def test_smollm2_passkey_beyond_training_length():
    from kvloft.eval.scoring import score
    from kvloft.eval.tasks import build_prompt, generate

    model = load_model("smollm2", device="cpu")
    sample = generate("passkey", model.tokenizer, 12000, seed=0, depth=0.4)
    assert sample.actual_tokens > model.config.max_position_embeddings
    rcfg = RetrievalConfig(method="exact", budget=512, n_sink=64, n_window=512, position_mode="extrapolate")
    s = Session(model, rcfg, RuntimeConfig(progress=False))
    t0 = time.perf_counter()
    s.feed(build_prompt(sample))
    answer = s.generate(max_new_tokens=8, stop=["\n"])
    print(
        f"passkey at {sample.actual_tokens} tokens: {answer!r} (want {sample.references}), "
        f"{time.perf_counter() - t0:.0f} s; {s.stats()['timings_s']}"
    )
    assert score("passkey", answer, sample.references) == 1.0, answer


@pytest.mark.gpu
def test_gpu_triton_extrapolation_matches_reference_and_dense():
    """On CUDA the Triton kernels rotate retrieved rows read zero-copy from pinned host chunks."""
    model = load_model("tiny", device="cuda", dtype="float32", seed=7)
    g = torch.Generator().manual_seed(2)
    parts = [torch.randint(0, 512, (600,), generator=g), torch.randint(0, 512, (70,), generator=g)]
    steps = torch.randint(0, 512, (4,), generator=g)

    def run(kernels, rcfg):
        s = Session(model, rcfg, RuntimeConfig(prefill_chunk=64, progress=False, kernels=kernels))
        out = []
        for part in parts:
            s.feed(part)
            out.append(s.last_logits.clone())
            out += [s.step(int(t)).clone() for t in steps]
        return torch.stack(out)

    dense = run("reference", RetrievalConfig(method="dense"))
    cover = RetrievalConfig(method="exact", budget=4096, n_sink=8, n_window=32, position_mode="extrapolate")
    assert _rel_err(run("triton", cover), dense) < 1e-4
    small = cover.replace(budget=48)
    assert _rel_err(run("triton", small), run("reference", small)) < 1e-4


@pytest.mark.parametrize(("n", "after", "want"), [
    (512, 0, [(a, a + 8) for a in range(448, 512, 8)] + [(511, 512)]),  # the feed's last chunk
    (512, 40, [(488, 496), (496, 504), (504, 512)]),  # 24 of the tail's 64 queries end this chunk
    (512, 64, []),  # the tail lies wholly in later chunks: the chunk's own selection only
    (512, 5000, []),
])
def test_tail_blocks_follow_the_feed(n, after, want):
    rcfg = RetrievalConfig(position_mode="extrapolate", prefill_tail=64, prefill_tail_block=8)
    att = TieredAttention(CFG, rcfg, None, FixedRetriever(IDS), REFERENCE, torch.device("cpu"))
    att.feed_after = after
    assert att.tail_blocks(n) == want


def test_session_marks_the_feed_tail(monkeypatch):
    """Session tells the backend how much of the feed follows each prefill chunk, so only the
    feed's tail selects for itself (not every chunk's)."""
    seen = []
    orig = TieredAttention.tail_blocks

    def spy(self, n):
        seen.append((n, self.feed_after))
        return orig(self, n)

    monkeypatch.setattr(TieredAttention, "tail_blocks", spy)
    model = load_model("tiny", device="cpu", dtype="float32", seed=7)
    rcfg = RetrievalConfig(method="exact", budget=8, n_sink=4, n_window=8, position_mode="extrapolate")
    s = Session(model, rcfg, RuntimeConfig(prefill_chunk=16, progress=False))
    s.feed(list(range(1, 51)))  # chunks of 16, 16, 16, 2
    s.feed(list(range(1, 21)))  # chunks of 16, 4
    calls = sorted(set(seen), key=seen.index)
    assert calls == [(16, 18), (16, 2), (2, 0), (16, 4), (4, 0)]  # the first chunk has no host tier yet

"""ActQKV retriever: dense identity, representatives, block scoring, probe weighting, needles, entropy split."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from kvloft.config import ModelConfig, RetrievalConfig
from kvloft.index.actqkv import activation_bias, block_scores, block_vectors, halo_spans, normalized_entropy
from kvloft.index.base import make_retriever
from kvloft.kernels import reference

MODEL = ModelConfig.from_name("tiny")  # 9 query heads over 3 KV heads, head_dim 16
HQ, HKV, D = MODEL.n_heads, MODEL.n_kv_heads, MODEL.head_dim
FOUR_LAYERS = ModelConfig(name="t4", hidden_size=144, n_layers=4, n_heads=9, n_kv_heads=3, head_dim=16)


def _act(model: ModelConfig = MODEL, **options):
    return make_retriever(RetrievalConfig(method="actqkv", options=options), model, "cpu")


def _assert_close(got: torch.Tensor, want: torch.Tensor, atol: float) -> None:
    # (torch.testing.assert_close imports torch.distributed on first use: seconds on this CPU)
    err = (got.float() - want.float()).abs().max().item()
    assert err <= atol, f"max error {err:.3g} > {atol}"


def _needle(keys: torch.Tensor, start: int, gen: torch.Generator, n_rows: int = 6) -> torch.Tensor:
    """Plant `n_rows` mutually similar keys at start.. in keys [H_kv, N, D]; returns their unit direction [H_kv, D]."""
    direction = torch.nn.functional.normalize(torch.randn(HKV, D, generator=gen), dim=-1)
    keys[:, start : start + n_rows] = 5.0 * direction[:, None] + 0.2 * torch.randn(HKV, n_rows, D, generator=gen)
    return direction


def test_budget_covering_host_tier_equals_dense_attention():
    gen = torch.Generator().manual_seed(1)
    n_sink, n_window, n_total = 4, 32, 333
    k = torch.randn(n_total, HKV, D, generator=gen)
    v = torch.randn(n_total, HKV, D, generator=gen)
    q = torch.randn(HQ, D, generator=gen)
    host = slice(n_sink, n_total - n_window)
    act = _act(dynamic_cutoff=False)
    act.build(0, k[n_sink:250].transpose(0, 1), torch.randn(HQ, 40, D, generator=gen))
    act.add(0, k[250 : host.stop].transpose(0, 1), torch.arange(250, host.stop))  # ends in a partial block
    sel = act.select(0, q, budget=512)
    assert sel.shared and torch.equal(sel.ids, torch.arange(host.stop - n_sink))
    scale = D**-0.5
    o_s, l_s = reference.decode_attend(
        q, torch.cat([k[:n_sink], k[host.stop :]]), torch.cat([v[:n_sink], v[host.stop :]]), scale=scale
    )
    o_r, l_r = reference.gather_attend(q, k[host], v[host], sel.ids, scale=scale)
    out, lse = reference.merge([o_s, o_r], [l_s, l_r])
    want, want_lse = reference.decode_attend(q, k, v, scale=scale)
    _assert_close(out, want, 1e-5)
    _assert_close(lse, want_lse, 1e-5)


def test_block_vectors_match_loop_reference():
    gen = torch.Generator().manual_seed(2)
    keys = torch.randn(3, 8, HKV, D, generator=gen)  # 3 blocks of 8
    got = block_vectors(keys, n_repr=3)
    for b in range(3):
        for h in range(HKV):
            kb = keys[b, :, h]  # [8, D]
            received = [sum(torch.softmax(kb @ kb[i] / math.sqrt(D), 0)[j] for i in range(8)) / 8 for j in range(8)]
            top = sorted(range(8), key=lambda j: -float(received[j]))[:3]
            want = kb[top].mean(0)  # kept as it is: the block vector's norm is part of its logits
            _assert_close(got[b, h], want, 1e-5)


def test_incremental_adds_match_one_build():
    gen = torch.Generator().manual_seed(3)
    keys = torch.randn(HKV, 100, D, generator=gen)
    whole, parts = _act(), _act()
    whole.build(0, keys, None)
    parts.build(0, keys[:, :10], None)
    for start in range(10, 100, 7):  # rows arrive in odd-sized groups, crossing block edges
        parts.add(0, keys[:, start : start + 7], torch.arange(start, min(start + 7, 100)))
    a, b = whole.layers[0], parts.layers[0]
    assert a.n_rows == b.n_rows == 100 and len(a.vecs) == len(b.vecs) == 3  # 3 blocks of 32 + 4 rows
    _assert_close(a.vecs.all(), b.vecs.all(), 1e-6)
    _assert_close(a.tail_vec, b.tail_vec, 1e-6)


def test_block_size_and_halo_defaults():
    qwen_like = ModelConfig(name="q", hidden_size=144, n_layers=2, n_heads=9, n_kv_heads=3, attention_bias=True)
    assert _act(MODEL).block == _act(qwen_like).block == 32  # 64 (InfLLM's Qwen setting) cut needles
    assert (_act(MODEL).halo, _act(block_size=64).halo, _act(halo=0).halo) == (8, 16, 0)
    assert _act(qwen_like, block_size=16).block == 16


def _needle_across_edge(gen: torch.Generator, edge: int, head: int = 5, tail: int = 4):
    """Keys [H_kv, 2048, D] along a shared direction c, 4 heavier keys per 32-block (they win
    every block's representatives, as punctuation does on real keys), and a needle of
    head + tail keys around row `edge`, each along the query's direction u: its head is heavy
    too (the key phrase), its tail is not. Returns keys, query [H_q, D] and needle rows."""
    basis, _ = torch.linalg.qr(torch.randn(HKV, D, 2, generator=gen))
    c, u = basis[..., 0], basis[..., 1]  # [H_kv, D] orthonormal
    keys = 2.0 * c[:, None] + 0.5 * torch.randn(HKV, 2048, D, generator=gen)
    heavy = (torch.arange(0, 2048, 32)[:, None] + torch.tensor([3, 11, 19, 27])).flatten()
    keys[:, heavy] += 3.0 * c[:, None]
    rows = torch.arange(edge - head, edge + tail)
    keys[:, rows] = (2.0 * c + 3.0 * u)[:, None] + 0.1 * torch.randn(HKV, len(rows), D, generator=gen)
    keys[:, edge - head : edge] += 3.0 * c[:, None]
    q = (1.0 * c + 4.0 * u).repeat_interleave(HQ // HKV, 0)
    return keys, q, rows


@pytest.mark.parametrize("seed", [0, 2, 3])
def test_needle_across_a_block_edge_keeps_its_tail(seed):
    # Every needle key is among the query's top keys (exact), but the tail's block is
    # represented by haystack keys: whole-block selection (halo 0) keeps only the head; the
    # halo brings the first rows of the next block, within the same token share.
    gen = torch.Generator().manual_seed(seed)
    keys, q, rows = _needle_across_edge(gen, edge=21 * 32)
    exact = make_retriever(RetrievalConfig(method="exact"), MODEL, "cpu")
    exact.build(0, keys, None)
    assert set(rows.tolist()) <= set(exact.select(0, q, 16).ids.flatten().tolist())
    for halo, want_tail in ((0, False), (8, True)):
        act = _act(dynamic_cutoff=False, halo=halo)
        act.build(0, keys, None)
        for budget in (32, 64):  # one block (a peaked layer's floor), two blocks
            got = act.select(0, q, budget).ids
            assert got.numel() <= max(budget, 32 + 2 * halo)
            assert set(rows[:5].tolist()) <= set(got.tolist())  # the head: its block ranks first
            assert (set(rows[5:].tolist()) <= set(got.tolist())) == want_tail, (halo, budget)


def test_halo_spans_are_merged_and_fill_the_share():
    gen = torch.Generator().manual_seed(11)
    keys = torch.randn(HKV, 640, D, generator=gen)
    act = _act(dynamic_cutoff=False, halo=8)
    act.build(0, keys, None)
    scores = torch.zeros(20)
    scores[[3, 4, 10, 0]] = torch.tensor([4.0, 3.0, 2.0, 1.0])  # blocks 3 and 4 touch; block 0 at the edge
    got = act._expand(scores, 160, 640).tolist()
    # 3 -> [88, 136), 4 -> [120, 168) (merged: 80 rows), 10 -> [312, 360): 128 rows; block 0's
    # span [0, 40) would pass 160
    assert got == list(range(88, 168)) + list(range(312, 360))
    assert act._expand(scores, 8, 640).tolist() == list(range(88, 136))  # the best span even over the share


def _halo_rows_bitmap(ranked: list[int], block: int, halo: int, tokens: int, n_rows: int) -> list[int]:
    """The rule on a row bitmap: each span adds its rows not yet covered, while the total fits."""
    covered = [False] * n_rows
    count = 0
    for b in ranked:
        lo, hi = max(b * block - halo, 0), min((b + 1) * block + halo, n_rows)
        new = sum(not covered[i] for i in range(lo, hi))
        if count and count + new > tokens:
            break
        covered[lo:hi] = [True] * (hi - lo)
        count += new
    return [i for i, c in enumerate(covered) if c]


@pytest.mark.parametrize("block,halo", [(32, 8), (32, 0), (16, 12), (8, 20), (5, 3)])
def test_halo_spans_match_a_row_bitmap(block, halo):
    # halos wider than half a block (16/12, 8/20) make a span meet blocks two and three away
    gen = torch.Generator().manual_seed(block * 100 + halo)
    for trial in range(40):
        n_rows = int(torch.randint(1, 400, (1,), generator=gen))
        n_blocks = -(-n_rows // block)
        m = int(torch.randint(1, n_blocks + 1, (1,), generator=gen))
        ranked = torch.randperm(n_blocks, generator=gen)[:m].tolist()
        tokens = int(torch.randint(1, n_rows + 40, (1,), generator=gen))
        spans = halo_spans(ranked, block, halo, tokens, n_rows)
        rows = [i for lo, hi in spans for i in range(lo, hi)]
        assert rows == _halo_rows_bitmap(ranked, block, halo, tokens, n_rows), (trial, ranked, tokens, n_rows)
        assert all(a[1] < b[0] for a, b in itertools.pairwise(spans))  # disjoint, sorted, not touching


def test_activation_bias_formula_and_probe_weighting():
    gen = torch.Generator().manual_seed(4)
    win = torch.randn(5, HQ, D, generator=gen)
    mean, var = torch.randn(HQ, D, generator=gen), torch.rand(HQ, D, generator=gen)
    phi = activation_bias(win, mean, var, 0.01)
    for t in range(5):
        for h in range(HQ):
            floor = var[h].mean() / 100
            want = sum((win[t, h, c] - mean[h, c]) ** 2 / (var[h, c] + floor) for c in range(D)) / D
            assert abs(float(phi[t, h]) - float(want)) < 1e-4 * float(want)


def test_outlier_query_steers_the_probe_to_its_needle():
    # 15 ordinary window queries from the prompt and one strongly activated decode query: the phi
    # weighting makes the probe follow the outlier, whose needle a plain window mean misses.
    gen = torch.Generator().manual_seed(5)
    keys = torch.randn(HKV, 2048, D, generator=gen)
    direction = _needle(keys, 1000, gen)
    distractor = _needle(keys, 300, gen)
    prompt = distractor.repeat_interleave(3, 0)[:, None] * 2.0 + torch.randn(HQ, 64, D, generator=gen)
    q = 20.0 * direction.repeat_interleave(3, 0)
    act = _act(dynamic_cutoff=False, window=16, halo=0)
    act.build(0, keys, prompt)
    sel = act.select(0, q, budget=32)  # one block
    assert sel.ids.tolist() == list(range(992, 1024))
    assert sel.scanned == 64 * HKV
    plain = torch.cat([prompt[:, -15:].transpose(0, 1), q[None]]).mean(0)  # [H_q, D]
    scores = block_scores(act.layers[0].vecs.all(), plain, "dot")  # [64]
    assert int(scores.argmax()) == 300 // 32  # the unweighted mean prefers the distractor


def test_block_scores_match_definitions():
    gen = torch.Generator().manual_seed(9)
    vecs = torch.randn(5, HKV, D, generator=gen)
    probe = torch.randn(HQ, D, generator=gen)
    dot, cos = block_scores(vecs, probe, "dot"), block_scores(vecs, probe, "cosine")
    group = HQ // HKV
    for b in range(5):
        want = sum(float(probe[h] @ vecs[b, h // group]) for h in range(HQ)) / HQ / math.sqrt(D)
        assert abs(float(dot[b]) - want) < 1e-5
        expanded = vecs[b].repeat_interleave(group, 0).flatten()  # [H_q * D]
        want = float(torch.nn.functional.cosine_similarity(expanded, probe.flatten(), dim=0))
        assert abs(float(cos[b]) - want) < 1e-5


def _common_direction_keys(gen: torch.Generator, target: int):
    """Keys [H_kv, 2048, D] along a large direction c shared by every key, and a query [H_q, D]
    mostly along c. Block `target` holds keys of a larger norm, less aligned with the query
    but with the largest logits (25 vs 16 +- 1.2): exact search picks them."""
    basis, _ = torch.linalg.qr(torch.randn(HKV, D, 2, generator=gen))  # [H_kv, D, 2] orthonormal columns
    c, u = basis[..., 0], basis[..., 1]  # [H_kv, D]
    keys = 4.0 * c[:, None] + 0.3 * torch.randn(HKV, 2048, D, generator=gen)
    rows = slice(target * 32, target * 32 + 32)
    keys[:, rows] = (5.0 * c + 5.0 * u)[:, None] + 0.1 * torch.randn(HKV, 32, D, generator=gen)
    q = (4.0 * c + 1.0 * u).repeat_interleave(HQ // HKV, 0)  # [H_q, D]
    return keys, q


def test_block_with_the_largest_logits_wins_over_a_shared_key_direction():
    # Every block's keys share direction c; the target block's keys have a larger norm and the
    # largest logits. Ranking blocks by direction alone (unit block vectors, as cosine scoring
    # does) prefers the blocks along c; InfLLM's inner product keeps the target.
    gen = torch.Generator().manual_seed(10)
    target = 37
    keys, q = _common_direction_keys(gen, target)
    exact = make_retriever(RetrievalConfig(method="exact"), MODEL, "cpu")
    exact.build(0, keys, None)
    top = exact.select(0, q, 32).ids  # [H_kv, 32]
    assert set(top.flatten().tolist()) == set(range(target * 32, target * 32 + 32))
    act = _act(dynamic_cutoff=False, halo=0)
    act.build(0, keys, None)
    assert act.select(0, q, budget=32).ids.tolist() == list(range(target * 32, target * 32 + 32))
    cosine = _act(dynamic_cutoff=False, scoring="cosine", halo=0)
    cosine.build(0, keys, None)
    assert int(cosine.select(0, q, budget=32).ids[0]) // 32 != target


@pytest.mark.parametrize("start", [0, 517, 2040])
def test_planted_needle_block_is_selected(start):
    gen = torch.Generator().manual_seed(start)
    keys = torch.randn(HKV, 2048, D, generator=gen)
    direction = _needle(keys, start, gen, n_rows=min(6, 2048 - start))
    q = 3.0 * direction.repeat_interleave(3, 0) + 0.3 * torch.randn(HQ, D, generator=gen)
    act = _act()
    act.build(0, keys, None)
    sel = act.select(0, q, budget=64)
    assert set(range(start, min(start + 6, 2048))) <= set(sel.ids.tolist())
    assert sel.ids.numel() <= 64  # within the share: a block with its halos (48 rows, fewer at the ends)


def _peaked_and_flat(act, gen, steps: int, budget: int):
    """Layers 0-1 hold one needle block the queries seek (peaked scores); layers 2-3 only noise (flat)."""
    qs = []
    for layer in range(4):
        keys = 0.3 * torch.randn(HKV, 2048, D, generator=gen)
        if layer < 2:
            direction = _needle(keys, 640, gen, n_rows=32)
        else:
            direction = torch.nn.functional.normalize(torch.randn(HKV, D, generator=gen), dim=-1)
        act.build(layer, keys, None)
        qs.append(3.0 * direction.repeat_interleave(3, 0))
    sels = []
    for _ in range(steps):
        sels.append([act.select(layer, qs[layer], budget) for layer in range(4)])
    return sels


def test_entropy_split_sums_to_total_and_favours_the_flat_layers():
    gen = torch.Generator().manual_seed(6)
    act = _act(FOUR_LAYERS, halo=0)  # whole blocks: token counts are exact multiples of 32
    budget = 256
    sels = _peaked_and_flat(act, gen, steps=3, budget=budget)
    assert all(s.ids.numel() == budget for s in sels[0])  # step 0: no entropies yet, an even split
    entropy = [act.layers[layer].entropy[1] for layer in range(4)]
    assert max(entropy[:2]) < min(entropy[2:])
    shares = act.layer_shares(2, budget)  # what step 2 used: the entropies of step 1
    assert abs(float(shares.sum()) - 4 * budget) < 1e-6
    want = [4 * budget * e / sum(entropy) for e in entropy]
    assert all(abs(float(s) - w) < 1e-6 for s, w in zip(shares, want))
    tokens = [min(max(w, 32), 2 * budget) for w in want]
    for layer in range(4):
        assert sels[2][layer].ids.numel() == int(tokens[layer]) // 32 * 32
    assert min(s.ids.numel() for s in sels[2][2:]) > max(s.ids.numel() for s in sels[2][:2])
    assert all(32 <= s.ids.numel() <= 2 * budget for s in sels[2])


def test_split_uses_previous_step_entropies_while_layers_are_visited():
    gen = torch.Generator().manual_seed(7)
    act = _act(FOUR_LAYERS)
    _peaked_and_flat(act, gen, steps=1, budget=256)
    before = act.layer_shares(1, 256)
    act.select(0, torch.randn(HQ, D, generator=gen), 256)  # layer 0 records a step-1 entropy
    assert torch.equal(act.layer_shares(1, 256), before)  # step 1 still splits by step-0 entropies
    assert 1 in act.layers[0].entropy and 0 in act.layers[0].entropy


def test_query_statistics_are_per_layer():
    gen = torch.Generator().manual_seed(8)
    act = _act(window=16)
    keys = torch.randn(HKV, 256, D, generator=gen)
    act.build(0, keys, torch.randn(HQ, 50, D, generator=gen))
    act.build(1, keys, 10.0 + torch.randn(HQ, 50, D, generator=gen))
    m0, m1 = act.layers[0].stats.mean, act.layers[1].stats.mean
    assert float(m0.abs().mean()) < 1.0 and float(m1.mean()) > 9.0
    q = torch.randn(HQ, D, generator=gen)
    act.select(0, q, 64)
    assert act.layers[0].stats.count == 51 and act.layers[1].stats.count == 50
    all_q = torch.cat([act.layers[0].window[:-1], q[None]])
    assert act.layers[0].window.shape == (16, HQ, D) and torch.equal(act.layers[0].window, all_q)


def test_normalized_entropy_bounds():
    assert abs(normalized_entropy(torch.zeros(10), 0.1) - 1.0) < 1e-9
    assert normalized_entropy(torch.tensor([1.0] + [0.0] * 9), 0.01) < 1e-3


@pytest.mark.parametrize(
    "options,match",
    [
        ({"block_size": -1}, "block_size"),
        ({"n_repr": 0}, "n_repr"),
        ({"n_repr": 40}, "n_repr"),  # more than the 32-token block
        ({"window": 0}, "window"),
        ({"scoring": "cos"}, "scoring"),
        ({"temperature": 0.0}, "temperature"),
        ({"max_factor": 0.5}, "max_factor"),
        ({"var_floor": float("nan")}, "var_floor"),
        ({"dynamic_cutoff": "yes"}, "dynamic_cutoff"),
        ({"min_tokens": 2.5}, "min_tokens"),
        ({"halo": -2}, "halo"),
        ({"blocksize": 32}, "unknown actqkv options"),
    ],
)
def test_bad_options_are_rejected(options, match):
    with pytest.raises(ValueError, match=match):
        _act(**options)


def test_bad_arguments_are_rejected():
    act = _act()
    with pytest.raises(ValueError, match="keys must be"):
        act.build(0, torch.randn(HQ, 10, D), None)
    with pytest.raises(ValueError, match="queries must be"):
        act.build(0, torch.randn(HKV, 10, D), torch.randn(HKV, 10, D))
    act.build(0, torch.randn(HKV, 100, D), None)
    with pytest.raises(ValueError, match="q must be"):
        act.select(0, torch.randn(HQ, D + 1), 32)
    with pytest.raises(ValueError, match="budget"):
        act.select(0, torch.randn(HQ, D), 1.5)

"""The whole step of HiP rows runs only the (layer, stage) searches some row refreshes: one graph
per refresh pattern (runtime/whole_graphs.py, whole_hip.py HipTables._pattern). CPU: the same
pattern logic run eagerly through the Triton interpreter (the GPU test of captured patterns is
in test_whole_step.py, beside the whole step's other GPU tests).

References: each step's pattern is held against the union of the rows' refresh flags from
HipRetriever.refresh_schedule (computed before the step, apart from the step's own plan); tokens
against each session decoded alone; the step with a small LRU (falling back to the graph of
every stage) against the step without, logits equal bit for bit (the same kernels on the same
inputs; the extra stages' masks are thrown away by the per-row refresh select)."""

from __future__ import annotations

import pytest
import torch
from test_whole_step import HIP_DEV, _fed, _greedy_alone

from kvloft import Engine, load_model
from kvloft.runtime import whole_graphs, whole_hip
from kvloft.runtime.whole_graphs import PatternGraphs
from kvloft.runtime.whole_step import WholeStep

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu", dtype="float32", seed=5)


def test_pattern_lru_admits_evicts_stale_graphs_and_falls_back_when_full():
    """The LRU's choices on a fake step (no CUDA): patterns admitted up to the cap, a full LRU of
    recently run patterns sends a new one to the graph of every stage (None), a pattern idle for
    more than `stale` steps gives its place up; the graph of every stage is never counted."""
    ran = []
    g = PatternGraphs(lambda p: ran.append(p) or torch.zeros(1, 1), capture=False, cap=2, stale=3)
    for p in ("a", "b", "a", "c", None, "b"):
        g.run(p)
    assert ran == ["a", "b", "a", None, None, "b"]  # c: the LRU holds a and b, both run within 3 steps
    assert g.counts == {"patterns": 2, "captures": 0, "evictions": 0, "fallbacks": 1}
    for _ in range(4):
        g.run("b")
    g.run("c")  # a last ran 8 steps ago: evicted
    assert ran[-1] == "c" and g.patterns() == ["b", "c"] and g.counts["evictions"] == 1
    with pytest.raises(ValueError, match="cap"):
        PatternGraphs(lambda p: None, capture=False, cap=-1)


def _union(sessions, plan, n_layers, n_stages):
    """Per layer, the bits of the stages any row refreshes this step, from each retriever's
    refresh_schedule (its host rows after the step's evictions: the plan's n_host); None where
    every bit is set."""
    bits = [0] * n_layers
    for row, i in enumerate(plan.order.tolist()):
        be = sessions[i].backend
        for layer in range(n_layers):
            flags = be.retriever.refresh_schedule(layer, be.rcfg.budget, int(plan.n_host[row]))
            bits[layer] |= sum(1 << s for s, f in enumerate(flags) if f)
    return None if all(b == (1 << n_stages) - 1 for b in bits) else tuple(bits)


# row 1 joins at step 5: another refresh phase (its steps count from its own first)
JOINS, STEPS, LENGTHS = (0, 5), 22, (90, 80)


def _run(eng, sessions, n_layers, n_stages, steps=STEPS):
    """`steps` greedy engine steps, rows joining at JOINS -> (each row's tokens, each step's
    logits, each step's expected pattern)."""
    toks, logits, want = [[] for _ in sessions], [], []
    for t in range(steps):
        rows = [i for i in range(len(sessions)) if t >= JOINS[i]]
        pairs = [(sessions[i], int(sessions[i].last_logits.argmax())) for i in rows]
        want.append(_union(sessions, eng.plan(pairs), n_layers, n_stages))
        logits.append(eng.step(pairs).clone())
        for i, (_, tok) in zip(rows, pairs, strict=True):
            toks[i].append(tok)
    return toks, logits, want


def _spy(monkeypatch):
    """Records every whole step's forward: (pattern, masks before, masks after, stage launches)."""
    seen, launches = [], []
    real, real_stage = WholeStep._forward, whole_hip.hip_stage_batched

    def forward(self, pattern=None):
        before, n = self.exact.masks.clone(), len(launches)
        out = real(self, pattern)
        seen.append((pattern, before, self.exact.masks.clone(), len(launches) - n))
        return out

    def stage(*args, **kwargs):
        launches.append(1)
        return real_stage(*args, **kwargs)

    monkeypatch.setattr(WholeStep, "_forward", forward)
    monkeypatch.setattr(whole_hip, "hip_stage_batched", stage)
    return seen


def _launches_match(seen, n_layers, n_stages):
    """Each step launched one stage search per (layer, stage) of its pattern (every one for None)."""
    for pattern, *_, n in seen:
        bits = n_layers * n_stages if pattern is None else sum(b.bit_count() for b in pattern)
        assert n == bits, (pattern, n)


def test_hip_whole_step_launches_only_the_stages_of_its_pattern(tiny, monkeypatch):
    """One HiP row, 5 whole steps (layers staggered: patterns of a stage or two in one layer):
    each step's pattern is the row's refresh flags, its graph launches one stage search per bit,
    and the tokens are the session's alone."""
    nl, ns = tiny.config.n_layers, len(HIP_DEV.options["chunk_sizes"])
    alone, row = _fed(tiny, 90, 0, HIP_DEV), _fed(tiny, 90, 0, HIP_DEV)
    seen = _spy(monkeypatch)
    eng = Engine(tiny, graphs="whole")
    toks, _, want = _run(eng, [row], nl, ns, steps=5)
    assert [p for p, *_ in seen] == want and want[0] is None and None not in want[1:]
    _launches_match(seen, nl, ns)
    assert sum(n for *_, n in seen[1:]) < (len(seen) - 1) * nl * ns // 2  # most stages skipped
    assert _greedy_alone(alone, 5) == toks[0]


@pytest.mark.slow  # ~1 minute: 32 whole steps through the Triton interpreter
def test_hip_whole_step_runs_the_refresh_pattern_of_its_rows(tiny, monkeypatch):
    """22 whole steps of two HiP rows at two refresh phases (the second joins at step 5): every
    step runs the union of the rows' refresh flags (from refresh_schedule), a (layer, stage)
    outside it leaves the mask buffer bit-identical, tokens equal each session alone. With an
    LRU of one pattern, the steps it cannot hold run the graph of every stage: logits equal bit
    for bit over the first 10 steps."""
    nl, ns = tiny.config.n_layers, len(HIP_DEV.options["chunk_sizes"])
    alone = [_fed(tiny, n, seed, HIP_DEV) for seed, n in enumerate(LENGTHS)]
    seen = _spy(monkeypatch)
    eng = Engine(tiny, graphs="whole")
    toks, logits, want = _run(eng, [_fed(tiny, n, seed, HIP_DEV) for seed, n in enumerate(LENGTHS)], nl, ns)
    assert [p for p, *_ in seen] == want and eng.route_counts["whole"] == STEPS
    _launches_match(seen, nl, ns)
    assert len(set(want)) >= 4 and sum(w is not None for w in want) >= STEPS // 2
    for pattern, before, after, _ in seen:
        for layer in range(nl):
            for s in range(ns):
                if pattern is not None and not pattern[layer] >> s & 1:
                    assert torch.equal(before[layer, :, s], after[layer, :, s]), (pattern, layer, s)
    assert any(not torch.equal(b, a) for p, b, a, _ in seen if p is not None)  # refreshed stages did write
    for i, s in enumerate(alone):
        assert _greedy_alone(s, STEPS - JOINS[i]) == toks[i]
    held = [p for w in eng._wholes.values() for p in w.graphs.patterns()]  # per (bucket, shape)
    counts = eng.whole_graphs()
    assert set(held) == {p for p in want if p is not None} and counts["patterns"] == len(held)
    assert counts["fallbacks"] == counts["evictions"] == counts["captures"] == 0

    monkeypatch.setattr(whole_graphs, "MAX_PATTERN_GRAPHS", 1)
    seen.clear()
    small = Engine(tiny, graphs="whole")
    toks1, logits1, want1 = _run(small, [_fed(tiny, n, seed, HIP_DEV) for seed, n in enumerate(LENGTHS)], nl, ns,
                                 steps=10)
    assert want1 == want[:10] and all(t[: len(u)] == u for t, u in zip(toks, toks1, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(logits, logits1, strict=False))
    ran = [p for p, *_ in seen]
    _launches_match(seen, nl, ns)
    assert all(r in (w, None) for r, w in zip(ran, want1, strict=True))
    fell = sum(r is None and w is not None for r, w in zip(ran, want1, strict=True))
    assert fell == small.whole_graphs()["fallbacks"] > 0
    assert all(len(w.graphs.patterns()) <= 1 for w in small._wholes.values())

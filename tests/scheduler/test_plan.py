"""Per-step plans of the row cache: dedup across heads, remapped ids, LRU order, accounting.

The oracle for scripted sequences is a plain-Python LRU over slots with the documented
rules (hits become most recent; the first fetched tokens are admitted into free slots,
then into the least recently used slots, ties broken by the lower slot).
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvloft.scheduler.plan import CacheDirectory, PlanScratch, split_fetch


def check_plan(plan, ids, cached_before, capacity):
    """Invariants of one plan against the selection and the cache before it."""
    ids = np.asarray(ids)
    valid = ids >= 0
    # every valid entry is served by exactly one source, padding by none
    assert np.array_equal((plan.hit_ids >= 0) | (plan.fetch_ids >= 0), valid)
    assert not ((plan.hit_ids >= 0) & (plan.fetch_ids >= 0)).any()
    # a hit reads the slot holding its token; a fetched entry reads the row holding its token
    slot_of = dict(cached_before)
    for e in zip(*np.nonzero(plan.hit_ids >= 0)):
        assert slot_of[int(ids[e])] == plan.hit_ids[e]
    for e in zip(*np.nonzero(plan.fetch_ids >= 0)):
        assert plan.fetch_tokens[plan.fetch_ids[e]] == ids[e]
    # union over heads, each token once, and only tokens not cached are transferred
    union = set(ids[valid].tolist())
    assert len(plan.fetch_tokens) == len(set(plan.fetch_tokens.tolist()))
    assert set(plan.fetch_tokens.tolist()) == union - set(slot_of)
    assert set(plan.hit_tokens.tolist()) == union & set(slot_of)
    assert plan.n_admit <= capacity - plan.n_hits
    assert set(plan.evict_slots.tolist()) <= set(plan.admit_slots.tolist())


def test_dedup_across_heads_and_padding():
    d = CacheDirectory(16)
    ids = np.array([[5, 9, 2, -1], [9, 5, 7, -1], [2, 2, 11, 5]])
    p = d.plan(ids)
    check_plan(p, ids, {}, 16)
    assert p.fetch_tokens.tolist() == [5, 9, 2, 7, 11]  # first-use order, each once
    assert p.n_hits == 0 and p.n_admit == 5
    assert (p.fetch_ids[:2, 3] == -1).all() and (p.hit_ids[:2, 3] == -1).all()  # padding
    # the same selection again: everything hits, nothing is transferred
    p2 = d.plan(ids)
    assert p2.n_fetch == 0 and p2.n_hits == 5
    check_plan(p2, ids, {5: 0, 9: 1, 2: 2, 7: 3, 11: 4}, 16)


def test_shared_selection_and_tensor_input():
    d = CacheDirectory(4)
    p = d.plan(torch.tensor([3, 1, 3, -1], dtype=torch.int32))
    assert p.hit_ids.shape == (4,) and p.fetch_tokens.tolist() == [3, 1]
    assert p.fetch_ids.tolist() == [0, 1, 0, -1]


def test_lru_eviction_order():
    d = CacheDirectory(3)
    d.plan(np.array([10, 11, 12]))  # slots 0, 1, 2
    d.plan(np.array([11]))  # 11 is now the most recent
    assert d.lru_tokens().tolist() == [10, 12, 11]
    p = d.plan(np.array([13, 14]))
    assert p.evict_tokens.tolist() == [10, 12]  # least recent first; 11 stays
    assert p.evict_slots.tolist() == [0, 2] and p.admit_slots.tolist() == [0, 2]
    assert sorted(d.lru_tokens().tolist()) == [11, 13, 14]
    p = d.plan(np.array([11, 15]))  # 11 hits and is protected; 13 (slot 0) goes
    assert p.hit_tokens.tolist() == [11] and p.evict_tokens.tolist() == [13]


def test_over_capacity_admits_what_fits_and_keeps_hits():
    d = CacheDirectory(4)
    d.plan(np.array([1, 2, 3]))
    ids = np.array([[1, 2, 3, 4], [5, 6, 7, 1]])
    p = d.plan(ids)
    check_plan(p, ids, {1: 0, 2: 1, 3: 2}, 4)
    assert p.n_hits == 3 and p.fetch_tokens.tolist() == [4, 5, 6, 7]
    assert p.n_admit == 1 and p.admit_slots.tolist() == [3] and p.evict_tokens.size == 0
    assert sorted(d.lru_tokens().tolist()) == [1, 2, 3, 4]


def test_zero_capacity_fetches_everything():
    d = CacheDirectory(0)
    for _ in range(2):
        p = d.plan(np.array([[4, 2], [2, 9]]))
        assert p.fetch_tokens.tolist() == [4, 2, 9] and p.n_hits == 0 and p.n_admit == 0
    assert d.stats.hits == 0 and d.stats.misses == 6


def test_hit_accounting_counts_tokens_once_per_step():
    d = CacheDirectory(8)
    d.plan(np.array([[1, 2], [2, 3]]))
    d.plan(np.array([[1, 1], [2, 4]]))
    s = d.stats
    assert (s.steps, s.hits, s.misses, s.admitted, s.evicted) == (2, 2, 4, 4, 0)
    assert s.hit_rate == pytest.approx(2 / 6)


def test_directories_share_scratch_without_mixing():
    scratch = PlanScratch()
    a, b = CacheDirectory(4, scratch), CacheDirectory(4, scratch)
    a.plan(np.array([7, 8]))
    p = b.plan(np.array([8, 7, 9]))  # layer b has nothing cached
    assert p.fetch_tokens.tolist() == [8, 7, 9] and p.n_hits == 0
    assert a.plan(np.array([8])).n_hits == 1


def test_split_fetch_pieces_cover_the_fetch():
    d = CacheDirectory(3)
    ids = np.array([[0, 1, 2, 3, 4], [5, 6, 0, 7, -1]])
    p = d.plan(ids)
    pieces = split_fetch(p, 3)
    assert [pc.start for pc in pieces] == [0, 3, 6]
    assert np.concatenate([pc.fetch_tokens for pc in pieces]).tolist() == p.fetch_tokens.tolist()
    covered = np.zeros(ids.shape, int)
    for pc in pieces:
        hit = pc.fetch_ids >= 0
        assert (pc.fetch_tokens[pc.fetch_ids[hit]] == ids[hit]).all()
        covered += hit
    assert np.array_equal(covered, (ids >= 0).astype(int))
    assert np.concatenate([pc.admit_slots for pc in pieces]).tolist() == p.admit_slots.tolist()
    assert split_fetch(p, 100)[0].fetch_ids is p.fetch_ids  # one piece: no copy
    with pytest.raises(ValueError, match="max_rows"):
        split_fetch(p, 0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="capacity"):
        CacheDirectory(-1)
    d = CacheDirectory(2)
    with pytest.raises(TypeError, match="int32 or int64"):
        d.plan(torch.zeros(3))
    with pytest.raises(ValueError, match=r"\[H_kv, k\] or \[k\]"):
        d.plan(np.zeros((1, 2, 3), np.int64))


class OracleLRU:
    """Straightforward slot-level LRU with the documented rules."""

    def __init__(self, capacity):
        self.cap = capacity
        self.token = [-1] * capacity
        self.stamp = [-1] * capacity
        self.clock = 0

    def step(self, ids):
        self.clock += 1
        where = {t: s for s, t in enumerate(self.token) if t >= 0}
        order = []
        for t in np.asarray(ids).reshape(-1).tolist():
            if t >= 0 and t not in order:
                order.append(t)
        hits = [t for t in order if t in where]
        fetch = [t for t in order if t not in where]
        for t in hits:
            self.stamp[where[t]] = self.clock
        n = min(len(fetch), self.cap - len(hits))
        victims = sorted(range(self.cap), key=lambda s: (self.stamp[s], s))[:n]
        evicted = [self.token[s] for s in victims if self.token[s] >= 0]
        for s, t in zip(victims, fetch[:n]):
            self.token[s], self.stamp[s] = t, self.clock
        return hits, fetch, evicted


@settings(max_examples=40, deadline=None)
@given(
    capacity=st.integers(0, 6),
    script=st.lists(st.lists(st.lists(st.integers(-1, 12), min_size=3, max_size=3), min_size=2, max_size=2),
                    min_size=1, max_size=12),
)
def test_scripted_sequences_match_oracle(capacity, script):
    d, oracle = CacheDirectory(capacity), OracleLRU(capacity)
    for step in script:
        ids = np.array(step)
        before = {int(d.slot_token[s]): s for s in range(capacity) if d.slot_token[s] >= 0}
        p = d.plan(ids)
        check_plan(p, ids, before, capacity)
        hits, fetch, evicted = oracle.step(ids)
        assert sorted(p.hit_tokens.tolist()) == sorted(hits)
        assert p.fetch_tokens.tolist() == fetch
        assert p.evict_tokens.tolist() == evicted
        assert len(d) <= capacity
        assert d.slot_token.tolist() == oracle.token

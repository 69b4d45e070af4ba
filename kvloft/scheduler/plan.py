"""Per-step transfer plans of the GPU row cache (DESIGN.md, Scheduler: plan, then run).

One layer's decode step selects host-tier rows (Selection.ids: [H_kv, k] per KV head or
[k] shared, -1 = padding). Rows move as whole tokens (one [H_kv, D] row, DESIGN.md
Tiers), so a plan works on the union of the tokens every head selected:

  hits    tokens whose row already sits in the layer's cache: read in place, not moved;
  fetch   the other tokens, deduplicated, in first-use order (head 0's picks first, so
          for score-ordered selections the best rows first): transferred once into the
          gathered buffer (its row i holds fetch_tokens[i]);
  admit   the first `a` fetched rows are copied into cache slots after the step, as many
          as fit beside this step's hits; slots come free ones first, then from the least
          recently used tokens, which are evicted;
  ids     every selected entry remapped: hit_ids to its cache slot, fetch_ids to its row
          of the gathered buffer; a valid entry is >= 0 in exactly one of the two.

Plans are plain numpy data built on the CPU and tested without a GPU. `CacheDirectory`
holds one layer's token <-> slot map and LRU stamps; the per-entry loop is numba
(nogil), one O(entries) pass with no sort, because it runs for every layer of every
decode step (32 x 16K entries per step for Llama-3-8B at budget 2048; ~0.15 ms a layer).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from numba import njit
from torch import Tensor

__all__ = ["CacheDirectory", "CacheStats", "FetchPiece", "PlanScratch", "StepPlan", "split_fetch"]


@dataclass
class StepPlan:
    """What one layer's decode step reads, moves and evicts. All arrays int64 numpy.

    hit_ids: [H_kv, k] or [k] (the selection's shape): cache slot of each entry that
        hits, -1 for entries that miss and for padding.
    fetch_ids: same shape: row of the gathered buffer of each entry that misses, else -1.
    hit_slots: [h] distinct cache slots this step reads, in first-use order.
    hit_tokens: [h] the host rows they hold.
    fetch_tokens: [m] host rows to transfer, in first-use order = gathered-buffer order.
    admit_slots: [a] cache slots receiving the gathered rows 0..a-1 (a <= m).
    evict_tokens: [e] host rows dropped from the cache for them, least recently used first.
    evict_slots: [e] the slots they held (a subset of admit_slots).
    """

    hit_ids: np.ndarray
    fetch_ids: np.ndarray
    hit_slots: np.ndarray
    hit_tokens: np.ndarray
    fetch_tokens: np.ndarray
    admit_slots: np.ndarray
    evict_tokens: np.ndarray
    evict_slots: np.ndarray

    @property
    def n_hits(self) -> int:
        """Distinct tokens read from the cache."""
        return int(self.hit_slots.shape[0])

    @property
    def n_fetch(self) -> int:
        """Distinct tokens transferred."""
        return int(self.fetch_tokens.shape[0])

    @property
    def n_admit(self) -> int:
        return int(self.admit_slots.shape[0])


@dataclass
class FetchPiece:
    """Gathered rows [start, start + n) of a plan, transferred and attended as one unit
    (a gathered buffer holds at most `max_rows` rows; larger fetches come in pieces).

    start: first gathered row of the piece in the plan.
    fetch_tokens: [n] int64 host rows of the piece (a slice of the plan's).
    fetch_ids: the selection's shape, int64: row inside the piece, -1 elsewhere.
    admit_slots: [a'] int64 cache slots of the piece's rows 0..a'-1.
    """

    start: int
    fetch_tokens: np.ndarray
    fetch_ids: np.ndarray
    admit_slots: np.ndarray


def split_fetch(plan: StepPlan, max_rows: int) -> list[FetchPiece]:
    """The plan's fetch in pieces of at most max_rows rows (no copy when one piece does)."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    m = plan.n_fetch
    if m <= max_rows:
        return [FetchPiece(0, plan.fetch_tokens, plan.fetch_ids, plan.admit_slots)] if m else []
    pieces = []
    for start in range(0, m, max_rows):
        stop = min(start + max_rows, m)
        inside = (plan.fetch_ids >= start) & (plan.fetch_ids < stop)
        ids = np.where(inside, plan.fetch_ids - start, -1)
        admit = plan.admit_slots[start : min(stop, plan.n_admit)]
        pieces.append(FetchPiece(start, plan.fetch_tokens[start:stop], ids, admit))
    return pieces


@dataclass
class CacheStats:
    """Counters of one layer's cache (or their sum). Token counts are distinct per step."""

    steps: int = 0
    hits: int = 0
    misses: int = 0
    admitted: int = 0
    evicted: int = 0

    @property
    def hit_rate(self) -> float:
        seen = self.hits + self.misses
        return self.hits / seen if seen else 0.0

    def add(self, other: CacheStats) -> None:
        for name in ("steps", "hits", "misses", "admitted", "evicted"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict[str, float | int]:
        return {"steps": self.steps, "hits": self.hits, "misses": self.misses,
                "admitted": self.admitted, "evicted": self.evicted, "hit_rate": round(self.hit_rate, 4)}


@dataclass
class PlanScratch:
    """Per-token scratch shared by the directories of one session (one plan runs at a time).

    mark: [N] int64, the clock of the last plan that met the token as a miss.
    row: [N] int64, the token's gathered-buffer row in that plan.
    clock: plans built so far (a stamp unique to each plan, across layers).
    """

    mark: np.ndarray = field(default_factory=lambda: np.full(0, -1, np.int64))
    row: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    clock: int = 0

    def reserve(self, n: int) -> None:
        if n > self.mark.shape[0]:
            size = max(n, 2 * self.mark.shape[0], 1024)
            self.mark = _grown(self.mark, size, -1)
            self.row = _grown(self.row, size, 0)


def _grown(a: np.ndarray, size: int, fill: int) -> np.ndarray:
    out = np.full(size, fill, a.dtype)
    out[: a.shape[0]] = a
    return out


class CacheDirectory:
    """Token <-> slot map and LRU stamps of one layer's cache of `capacity` token rows.

    slot_token: [capacity] int64, the token in each slot (-1 = free).
    slot_stamp: [capacity] int64, clock of the slot's last use (-1 = free); LRU order is
        (stamp, slot): among tokens last used by the same step, the lower slot goes first.
    token_slot: [N] int64, the slot of each host row (-1 = not cached), grown on demand.
    Host rows never change once written (the host tier is append-only), so a cached row
    stays valid until the session is reset.
    """

    def __init__(self, capacity: int, scratch: PlanScratch | None = None) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"capacity must be an int >= 0 (token rows), got {capacity!r}")
        self.capacity = capacity
        self.slot_token = np.full(capacity, -1, np.int64)
        self.slot_stamp = np.full(capacity, -1, np.int64)
        self.token_slot = np.full(0, -1, np.int64)
        self.scratch = scratch or PlanScratch()
        self.stats = CacheStats()

    def __len__(self) -> int:
        return int((self.slot_token >= 0).sum())

    def lru_tokens(self) -> np.ndarray:
        """Cached tokens, least recently used first: [len] int64."""
        used = np.flatnonzero(self.slot_token >= 0)
        order = np.lexsort((used, self.slot_stamp[used]))
        return self.slot_token[used[order]]

    def _reserve(self, n: int) -> None:
        if n > self.token_slot.shape[0]:
            self.token_slot = _grown(self.token_slot, max(n, 2 * self.token_slot.shape[0], 1024), -1)
        self.scratch.reserve(n)

    def plan(self, ids: Tensor | np.ndarray) -> StepPlan:
        """Plan one step for a selection ids [H_kv, k] or [k] (host rows, -1 = padding);
        commits it: hits become most recent, admitted rows are recorded as cached."""
        sel = _as_ids(ids)
        flat = sel.reshape(-1)
        if flat.size:
            self._reserve(int(flat.max()) + 1)
        self.scratch.clock += 1
        clock = self.scratch.clock
        hit_ids, fetch_ids, hit_slots, fetch_tokens = _classify(
            flat, self.token_slot, self.slot_stamp, self.scratch.mark, self.scratch.row, clock
        )
        hit_tokens = self.slot_token[hit_slots]
        admit_slots, evict_tokens, evict_slots = self._admit(fetch_tokens, hit_slots.shape[0], clock)
        st = self.stats
        st.steps += 1
        st.hits += hit_slots.shape[0]
        st.misses += fetch_tokens.shape[0]
        st.admitted += admit_slots.shape[0]
        st.evicted += evict_tokens.shape[0]
        return StepPlan(hit_ids.reshape(sel.shape), fetch_ids.reshape(sel.shape), hit_slots, hit_tokens,
                        fetch_tokens, admit_slots, evict_tokens, evict_slots)

    def _admit(self, fetch_tokens: np.ndarray, n_hits: int, clock: int):
        """Slots for the first fetched tokens: free slots, then LRU victims (hits, stamped
        with this clock, are the most recent, so never victims)."""
        n = min(fetch_tokens.shape[0], self.capacity - n_hits)
        empty = np.zeros(0, np.int64)
        if n <= 0:
            return empty, empty, empty
        key = self.slot_stamp * self.capacity + np.arange(self.capacity)  # unique: (stamp, slot)
        if n < self.capacity:
            slots = np.argpartition(key, n - 1)[:n]
            slots = slots[np.argsort(key[slots])]
        else:
            slots = np.argsort(key)
        old = self.slot_token[slots]
        held = old >= 0
        evict_tokens, evict_slots = old[held], slots[held]
        self.token_slot[evict_tokens] = -1
        admitted = fetch_tokens[:n]
        self.slot_token[slots] = admitted
        self.token_slot[admitted] = slots
        self.slot_stamp[slots] = clock
        return slots.astype(np.int64), evict_tokens, evict_slots.astype(np.int64)


def _as_ids(ids: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(ids, Tensor):
        if ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"selection ids must be int32 or int64, got {ids.dtype}")
        ids = ids.detach().to("cpu").numpy()
    if not isinstance(ids, np.ndarray) or ids.dtype.kind != "i":
        raise TypeError(f"selection ids must be an integer tensor or array, got {type(ids).__name__}")
    if ids.ndim not in (1, 2):
        raise ValueError(f"selection ids must be [H_kv, k] or [k], got shape {ids.shape}")
    return np.ascontiguousarray(ids, np.int64)


@njit(nogil=True, cache=False)
def _classify(ids, token_slot, slot_stamp, mark, row, clock):  # pragma: no cover - compiled
    # One pass over the entries ids [E]: hit_ids [E], fetch_ids [E], hit_slots [h] and
    # fetch_tokens [m], both in first-use order. (A sorted fetch list costs a sort and a
    # second pass, ~4x the time, and buys nothing: rows are gathered by index anyway.)
    e_n = ids.shape[0]
    hit_ids = np.empty(e_n, np.int64)
    fetch_ids = np.empty(e_n, np.int64)
    hit_buf = np.empty(e_n, np.int64)
    miss_buf = np.empty(e_n, np.int64)
    h = 0
    m = 0
    for e in range(e_n):
        t = ids[e]
        hit_ids[e] = -1
        fetch_ids[e] = -1
        if t < 0:
            continue
        s = token_slot[t]
        if s >= 0:
            hit_ids[e] = s
            if slot_stamp[s] != clock:  # first use of the slot in this step
                slot_stamp[s] = clock
                hit_buf[h] = s
                h += 1
        else:
            if mark[t] != clock:  # first miss of the token in this step
                mark[t] = clock
                row[t] = m
                miss_buf[m] = t
                m += 1
            fetch_ids[e] = row[t]
    return hit_ids, fetch_ids, hit_buf[:h].copy(), miss_buf[:m].copy()

"""The plan of one batched decode step (DESIGN.md, One decode step): plain data, made on the CPU.

plan_step(pairs) reads each session's length and tier fill state and says, before anything
runs, what the step will do to every sequence b of the batch: the token it appends and its
position, how many rows each tier holds afterwards, how many rows move from the window down
to the host tier, whether it searches its host tier, per layer which cached retriever
stages recompute (where the retriever declares a refresh schedule, e.g. HiP's stage masks),
and which rows search together (retrievers that declare a batched search: index/base.py).
The engine (runtime/engine.py) runs the step in the plan's row order; tests hold the plan
against what the tiers actually did.

The tier arithmetic mirrors tiers/layer_tiers.py LayerTiers.append for one decode token:

    sink not full                                   the token joins the sink, nothing moves
    evict_batch = E > 0, ring holds n_window + E    the oldest E ring tokens go down, then the token joins
    evict_batch = E > 0, n_window <= ring < n_window + E   the token joins the ring
    E = 0, ring full (n_window)                     the oldest ring token goes down (the ring wraps)
    otherwise                                       the token joins the ring
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from kvloft.index.base import batch_search_key
from kvloft.runtime.host_rows import InPlaceRows

if TYPE_CHECKING:  # the plan reads sessions; it is made for them, never imported by them
    from kvloft.runtime.session import Session

__all__ = ["StepPlan", "decode_append", "plan_step"]


@dataclass(frozen=True)
class StepPlan:
    """One batched decode step of B sequences over a model of L layers. CPU tensors; row b
    of every [B] field is sequence b of the batch in the order the step runs (`order`).

    order:     [B] int64, index into the (session, token) pairs given to plan_step of the
               sequence in row b (the engine answers logits in the pairs' order).
    tokens:    [B] int64, the token sequence b appends.
    positions: [B] int64, its position: the sequence's length before the step.
    n_static:  [B] int64, rows in the sequence's device tier after the step (every layer
               alike): sink + window ring for tiered sessions, every token for dense ones.
    n_host:    [B] int64, rows in its host tier after the step (0 for dense sessions).
    evicts:    [B] int64, rows that move from the window down to the host tier this step
               (0, 1, or CacheConfig.evict_batch), in every layer. For a row at exact
               positions read in place they move before any layer runs (the engine runs
               TieredAttention.make_room first and checks the count against this field).
    searches:  [B] bool, the sequence's retriever selects host rows this step (a tiered
               session with host rows and a budget > 0).
    max_rows:  [B] int64, the most host rows per KV head its attention reads this step:
               min(budget, n_host) where it searches, else 0; n_host where a layer may
               refresh a retriever whose refresh selects every host row (Recycled's full
               steps: `refresh_reads_all`).
    refresh:   [L][B] per layer and row: the retriever stages the step recomputes, one
               bool per stage (a tuple), or None where the retriever declares no refresh
               schedule (`refresh_schedule`) or the sequence does not search.
    search_groups: rows (ascending, two or more) whose searches run together in every layer:
               sequences that search at exact positions through retrievers that declare a
               batched search with equal search keys (index/base.py BatchedSearch); a row in
               no group searches alone. A layer where a row's route attends without a search
               (or the retriever's), runs the group's other rows together.
    """

    order: Tensor
    tokens: Tensor
    positions: Tensor
    n_static: Tensor
    n_host: Tensor
    evicts: Tensor
    searches: Tensor
    max_rows: Tensor
    refresh: list[list[tuple[bool, ...] | None]]
    search_groups: list[list[int]]

    @property
    def batch(self) -> int:
        return int(self.tokens.shape[0])


def decode_append(ring: dict[str, int], n_sink: int, n_window: int, evict_batch: int) -> tuple[int, int]:
    """One decode token appended to a static tier in fill state `ring` (LayerTiers.ring_state)
    -> (rows moving down to the host tier, static-tier rows afterwards)."""
    sink, fill = ring["sink_fill"], ring["ring_fill"]
    if sink < n_sink:
        return 0, sink + 1 + fill
    if evict_batch and fill >= n_window:
        down = evict_batch if fill == n_window + evict_batch else 0
        return down, sink + fill - down + 1
    if fill == n_window:
        return 1, sink + fill
    return 0, sink + fill + 1


def _search_budget(backend, n_host: int) -> int:
    """The budget the backend passes to select() with n_host host rows: RetrievalConfig.budget,
    or in extrapolate mode the keys picked before widening (TieredAttention._neighbor_plan:
    budget // (2r + 1), r = neighbor_radius capped so 2r + 1 keys fit the budget)."""
    r = backend.rcfg
    if r.position_mode != "extrapolate" or r.budget >= n_host:
        return r.budget
    radius = min(r.neighbor_radius, (r.budget - 1) // 2)
    return r.budget // (2 * radius + 1)


def _row(session: Session, n_layers: int) -> tuple[int, int, int, bool, int, list[tuple[bool, ...] | None]]:
    """(n_static, n_host, evicts, searches, max_rows, refresh per layer) of one session's step."""
    backend = session.backend
    cache = getattr(backend, "cache", None)
    if cache is None:  # DenseAttention: every token stays on the device
        return len(session) + 1, 0, 0, False, 0, [None] * n_layers
    t0 = cache[0]
    down, n_static = decode_append(t0.ring_state(), t0.n_sink, t0.n_window, t0.evict_batch)
    n_host = t0.n_host + down
    budget = backend.rcfg.budget
    searches = n_host > 0 and budget > 0
    retriever = backend.retriever
    schedule = getattr(retriever, "refresh_schedule", None)
    refresh: list[tuple[bool, ...] | None] = [None] * n_layers
    if searches and schedule is not None:
        b = _search_budget(backend, n_host)
        refresh = [schedule(layer, b, n_host) for layer in range(n_layers)]
    max_rows = min(budget, n_host) if searches else 0
    if searches and getattr(retriever, "refresh_reads_all", False) and any(r is None or any(r) for r in refresh):
        max_rows = n_host  # a layer may run a full step (or its schedule depends on the query)
    return n_static, n_host, down, searches, max_rows, refresh


def _search_key(session: Session) -> tuple | None:
    """The key of the group the session's searches can join this step, None for none: a
    tiered session at exact positions whose retriever declares a batched search (the fetch
    that selects is the backend's own InPlaceRows; the scheduler's fetch searches its own way)."""
    backend = session.backend
    if getattr(backend, "cache", None) is None or backend.rcfg.position_mode != "exact":
        return None
    if not isinstance(backend.fetch, InPlaceRows):
        return None
    return batch_search_key(backend.retriever)


def search_groups(pairs: Sequence[tuple[Session, int]], searches: Sequence[bool]) -> list[list[int]]:
    """Rows of two or more searching sessions with equal search keys, in row order."""
    by_key: dict[tuple, list[int]] = {}
    for b, ((s, _), looks) in enumerate(zip(pairs, searches, strict=True)):
        key = _search_key(s) if looks else None
        if key is not None:
            by_key.setdefault(key, []).append(b)
    return [rows for rows in by_key.values() if len(rows) > 1]


def plan_step(pairs: Sequence[tuple[Session, int]]) -> StepPlan:
    """The plan of one decode step appending token t_b to session s_b for each pair (s_b, t_b).

    The pairs are taken as checked (runtime/engine.py validates them: fed sessions of one
    model, each once, valid token ids); this reads their state and changes nothing."""
    n_layers = pairs[0][0].model.config.n_layers
    rows = [_row(s, n_layers) for s, _ in pairs]

    def column(i: int, dtype: torch.dtype = torch.int64) -> Tensor:  # [B] field i of every row
        return torch.tensor([r[i] for r in rows], dtype=dtype)

    return StepPlan(
        order=torch.arange(len(pairs), dtype=torch.int64),
        tokens=torch.tensor([int(t) for _, t in pairs], dtype=torch.int64),
        positions=torch.tensor([len(s) for s, _ in pairs], dtype=torch.int64),
        n_static=column(0), n_host=column(1), evicts=column(2), searches=column(3, torch.bool),
        max_rows=column(4), refresh=[[r[5][layer] for r in rows] for layer in range(n_layers)],
        search_groups=search_groups(pairs, [r[3] for r in rows]),
    )

"""One retriever search per layer for the rows of a batched decode step that can share it.

A session's decode route (exact_decode.py) selects host rows, then attends over them. In a
batched step (batch_layer.py's RowAttention) the rows the plan groups (StepPlan.search_groups:
retrievers that declare `batched_select` with equal search keys, index/base.py BatchedSearch)
stop after their append and index add and hand back a `PendingSearch`; `run_searches` then
makes each group's selections in one select_batch call and finishes every row with its own:

    per row   append k, v; the index add; -> PendingSearch(fetch, layer, q [H_q, D], budget, finish)
    per group q = stack(rows' queries) [G, H_q, D]; type(retriever).select_batch(...) -> G selections
    per row   finish(selection) -> the row's TableLaunch (runtime/batch_attention.py) or its output

A row outside every group, or left alone in its group (its route attended without a search
this layer), searches as it would alone (fetch.select). Each row's "search" timer gets its
group's whole search (the latency it saw, as batch_attention.py does for "attention").
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from kvloft.index.base import Selection
from kvloft.runtime.dense import Timers

if TYPE_CHECKING:
    from kvloft.runtime.batch_attention import TableLaunch

__all__ = ["PendingSearch", "run_searches"]


@dataclass(eq=False)
class PendingSearch:
    """One row's decode step of one layer, appended and indexed, waiting for its selection."""

    fetch: Any  # the row's InPlaceRows (runtime/host_rows.py): .retriever, .select(layer, q, budget)
    layer: int
    q: Tensor  # [H_q, D] the row's query
    budget: int
    timers: Timers  # the row's session's
    finish: Callable[[Selection], Tensor | TableLaunch]  # the rest of the row's step

    def run(self) -> Tensor | TableLaunch:
        """The row alone: its own search, then the rest of its step."""
        return self.finish(self.fetch.select(self.layer, self.q, self.budget))


def _search_group(group: Sequence[PendingSearch]) -> list[Selection]:
    """The rows' selections from one select_batch call (G >= 2 rows of one search key)."""
    retrievers = [p.fetch.retriever for p in group]
    sync = any(p.timers.sync for p in group)
    if sync:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    q = torch.stack([p.q for p in group])  # [G, H_q, D]
    sels = type(retrievers[0]).select_batch(retrievers, group[0].layer, q, [p.budget for p in group])
    if sync:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    for p in group:
        p.timers.seconds["search"] += dt
    return sels


def run_searches(pending: dict[int, PendingSearch], groups: Sequence[Sequence[int]]) -> dict[int, Any]:
    """Finish every pending row {row b: search}: the rows of each group (row indices; rows not
    pending are skipped) searched together where two or more are pending, the others alone.
    Returns {row b: its TableLaunch or its output [1, H_q, D]}."""
    out: dict[int, Any] = {}
    for rows in groups:
        rows = [b for b in rows if b in pending]
        if len(rows) < 2:
            continue
        try:
            sels = _search_group([pending[b] for b in rows])
        except Exception as e:
            e.add_note(f"in the shared search of rows {rows} (layer {pending[rows[0]].layer})")
            raise
        for b, sel in zip(rows, sels, strict=True):
            out[b] = pending[b].finish(sel)
    for b, p in pending.items():
        if b not in out:
            out[b] = p.run()
    return dict(sorted(out.items()))

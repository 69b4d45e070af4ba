"""Where a decode step's retrieved rows come from: the pluggable row source of the decode path.

A decode step of one layer (runtime/exact_decode.py) attends to the static tier and to the
host rows its retriever selects, the partials merged exactly by log-sum-exp. Where those
rows are read and when the search runs belongs to a RowFetch:

    runtime/host_rows.py  InPlaceRows   the default: search inline, rows read where they lie
    scheduler/overlap.py  OverlapFetch  search on a worker (or inline, ids copied back
                                        asynchronously), rows planned through the GPU row
                                        cache and moved on copy streams

The step calls start() right after the layer's append, launches its static attention, then
calls attend(): a fetch overlaps its search and transfers with that static attention.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor

from kvloft.tiers.kvcache import Evicted, LayerTiers

__all__ = ["Retrieved", "RowFetch", "StepTimers"]


class StepTimers(Protocol):
    """The backend's timers: `with timers(name):` adds wall-clock seconds to seconds[name]."""

    seconds: dict[str, float]

    def __call__(self, name: str) -> AbstractContextManager[None]: ...


@dataclass
class Retrieved:
    """The retrieved part of one layer's decode step: partials over the selected rows."""

    outs: list[Tensor] = field(default_factory=list)  # each [H_q, D]
    lses: list[Tensor] = field(default_factory=list)  # each [H_q] fp32, natural log
    scanned: int = 0  # keys the retriever scored for this selection


class RowFetch(Protocol):
    def start(self, layer: int, tiers: LayerTiers, q: Tensor, evicted: Evicted | None, budget: int,
              index_add: bool) -> Any:
        """Begin the layer's search. q [H_q, D] the decode query; evicted: the rows its append
        moved to the host tier, added to the index when index_add (False where the retriever
        reads the host tier in place); budget: keys per KV head to select, 0 for none this step
        (the index still takes the evicted rows). Returns what attend() needs to finish."""
        ...

    def attend(self, layer: int, tiers: LayerTiers, q: Tensor, budget: int, pending: Any) -> Retrieved:
        """Finish the search started by start() and attend q [H_q, D] to the selected rows
        (no partials where budget is 0)."""
        ...

    def reset(self) -> None:
        """Forget rows kept across steps (a rollback: host rows past its mark will change)."""
        ...

    def bytes(self) -> dict[str, int]:
        """Memory the fetch holds besides the tiers, by name."""
        ...

    def close(self) -> None:
        """Stop any worker the fetch runs."""
        ...

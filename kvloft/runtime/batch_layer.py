"""One layer's attention in a batched decode step: each row through its session's own route.

    attention = RowAttention(backends, order, shared=True, search_groups=plan.search_groups)
    o = attention.attend(layer, q, k, v, positions)   # q [B', H_q, D] -> o [B', H_q, D]

The engine (runtime/engine.py) hands a RowAttention to the model's forward pass as its attention
backend. Per layer each row is attended, or its work is gathered: a PendingSearch (its retriever
searches with its group: runtime/batch_search.py), a HostLaunch (its host tier searched in place
on the CPU: runtime/batch_host.py) or a TableLaunch (one launch over a slot table:
runtime/batch_attention.py); then the searches run, the host pass, and the shared launch. An error
anywhere carries a note naming the rows, their pairs and the layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from kvloft.runtime.batch_attention import TableLaunch, run_launches
from kvloft.runtime.batch_host import HostLaunch, run_host_launches
from kvloft.runtime.batch_search import PendingSearch, run_searches

__all__ = ["RowAttention"]


@contextmanager
def _noted(what: str, rows: Iterable[int], order: Tensor, layer: int) -> Iterator[None]:
    """An error raised inside gets a note naming `what`, the rows (plan order), their pairs
    (order [B]: the pair each row came from) and the layer; it is raised on."""
    try:
        yield
    except Exception as e:
        pairs = ", ".join(str(int(order[b])) for b in rows)
        e.add_note(f"in {what} of rows {list(rows)} of the batched step (pairs {pairs}, layer {layer})")
        raise


class RowAttention:
    """The attention backend of a batched step: row b of q, k, v goes through backends[b], its
    session's own decode route; rows past len(backends) (padding of a graphed batch) get zeros.
    Rows whose route is one launch over a slot table (a TableLaunch from the backend's
    attend_deferred: Triton kernels, a pinned host tier read in place) run together, one launch
    per layer for all of them (runtime/batch_attention.py), and rows that search their host tier in
    place on the CPU (a HostLaunch) make one compiled call per layer for all of them
    (runtime/batch_host.py); with shared=False each runs its own."""

    def __init__(self, backends: list[Any], order: Tensor, shared: bool = True,
                 search_groups: Sequence[Sequence[int]] = ()) -> None:
        self.backends = backends
        self.order = order  # [B] the pair each row came from, for error notes
        self.shared = shared
        # rows whose searches run together (StepPlan.search_groups), only where launches are shared
        self.search_groups = [list(g) for g in search_groups] if shared else []
        self._grouped = {b for g in self.search_groups for b in g}

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """q [B', H_q, D], k/v [B', H_kv, D] (rotated keys), positions [B'] -> out [B', H_q, D]
        (B' >= B rows; each backend gets its row as a one-token decode step)."""
        n = len(self.backends)
        o = torch.empty_like(q) if q.shape[0] == n else torch.zeros_like(q)
        launches: dict[int, TableLaunch] = {}
        host: dict[int, HostLaunch] = {}
        pending: dict[int, PendingSearch] = {}
        for b, be in enumerate(self.backends):
            try:
                got = self._row(be, b, layer, q, k, v, positions)
            except Exception as e:
                e.add_note(f"in row {b} of the batched step (pair {int(self.order[b])}, layer {layer}, "
                           f"position {int(positions[b])})")
                raise
            if isinstance(got, PendingSearch):
                pending[b] = got
            elif isinstance(got, HostLaunch):
                host[b] = got
            elif isinstance(got, TableLaunch):
                launches[b] = got
            else:
                o[b : b + 1] = got
        if pending:
            with _noted("the searches", pending, self.order, layer):
                searched = run_searches(pending, self.search_groups)
            for b, got in searched.items():
                if isinstance(got, TableLaunch):
                    launches[b] = got
                else:
                    o[b : b + 1] = got
            launches = dict(sorted(launches.items()))
        if host:
            with _noted("the shared host-tier pass", host, self.order, layer):
                run_host_launches(host, o)
        if launches:
            with _noted("the shared attention launch", launches, self.order, layer):
                run_launches(launches, o)
        return o

    def _row(self, be: Any, b: int, layer: int, q: Tensor, k: Tensor, v: Tensor,
             positions: Tensor) -> Tensor | TableLaunch | HostLaunch | PendingSearch:
        """Row b through its backend: attended, its launch (shared), or its pending search (grouped)."""
        args = (layer, q[b : b + 1], k[b : b + 1], v[b : b + 1], positions[b : b + 1])
        if not hasattr(be, "attend_deferred"):
            return be.attend(*args)
        if not self.shared:  # each row's own launch; a host-tier pass is one row's call either way
            got = be.attend_deferred(*args)
            return got.run() if isinstance(got, (TableLaunch, HostLaunch)) else got
        if b in self._grouped:
            return be.attend_deferred(*args, defer_search=True)
        return be.attend_deferred(*args)

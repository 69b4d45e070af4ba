"""Marks and rollback of one layer's tiers (LayerTiers.mark / rollback / set_ring_state,
tiers/layer_tiers.py): a session returns to an earlier moment (a failed call, a rejected draft)
without a copy of its tiers, and restores a saved static tier's fill state.

A mark is a few ints (the ring's fill state and the host row count) and the block summary's
open sum. Evictions move tokens to the host tier in age order, so whatever left the ring since
the mark is the host tier's newest rows: rollback copies them back into the slots they held.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["check_ring_state", "mark", "rollback"]


def mark(tiers: Any) -> dict[str, Any]:
    """What rollback() needs to return `tiers` (a LayerTiers; layer_tiers.py imports this module,
    not the reverse) to this moment."""
    summary = None if tiers.summary is None else (tiers.summary.block, tiers.summary.mark())
    return {**tiers.ring_state(), "n_host": tiers.n_host, "summary": summary}


def rollback(tiers: Any, mark: dict[str, Any]) -> None:
    """Forget every token appended to `tiers` since mark(). The ring's tokens at the mark are,
    oldest first, the host rows appended since (at most ring_fill of them) and then the oldest
    tokens of the ring now; they go back to the slots they held. Values are copied, not
    recomputed: bit for bit (with an 8-bit host tier, rows that had gone down come back
    dequantized)."""
    t = tiers
    t.wait_host()
    n_host, ring_fill, head = mark["n_host"], mark["ring_fill"], mark["ring_head"]
    if ring_fill:
        a, dev = t.n_sink, t.k.device
        back = min(ring_fill, t.n_host - n_host)  # the mark's ring tokens now in the host tier
        rows = torch.arange(n_host, n_host + back)
        now = a + (t.ring_head + torch.arange(ring_fill - back)) % t.ring_cap  # the rest, oldest first
        slots = (a + (head + torch.arange(ring_fill)) % t.ring_cap).to(dev)
        for buf, store in ((t.k, t._host_k), (t.v, t._host_v), (t.pos, t._host_pos)):
            vals = torch.cat([store.rows(rows).to(dev), buf[now.to(dev)]])
            buf[slots] = vals
    for store in (t._host_k, t._host_v, t._host_pos):
        store.truncate(n_host)
    t.sink_fill, t.ring_fill, t.ring_head = mark["sink_fill"], ring_fill, head
    if mark["summary"] is None or t.summary is None or t.summary.block != mark["summary"][0]:
        t.summary = None  # made again from the host tier on first use
    else:
        t.summary.rollback(mark["summary"][1])


def check_ring_state(tiers: Any, sink_fill: int, ring_fill: int, ring_head: int) -> None:
    """ValueError unless (sink_fill, ring_fill, ring_head) describes `tiers`' static tier
    (sizes, order: the ring rotates only when full)."""
    t = tiers
    ok = (all(isinstance(x, int) and not isinstance(x, bool) for x in (sink_fill, ring_fill, ring_head))
          and 0 <= sink_fill <= t.n_sink and 0 <= ring_fill <= t.ring_cap
          and 0 <= ring_head < max(1, t.ring_cap) and (ring_fill == 0 or sink_fill == t.n_sink)
          and (ring_head == 0 or ring_fill == t.n_window))  # the ring rotates only when full
    if not ok:
        raise ValueError(f"ring state sink_fill={sink_fill!r}, ring_fill={ring_fill!r}, ring_head={ring_head!r} "
                         f"does not fit a static tier of n_sink={t.n_sink}, n_window={t.n_window}, "
                         f"evict_batch={t.evict_batch}")

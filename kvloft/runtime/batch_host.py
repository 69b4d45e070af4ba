"""One compiled call per layer for the CPU rows of a decode step that search their host tier in place.

On the CPU an exact retriever searches each session's host tier in place and hands its logits
to the attention (runtime/exact_decode.py, the CPU route). For the rows whose retriever says it
can (ExactRetriever.scans_in_place: logits ranked by the group max, fp32 rows in memory),
ExactDecode.prepare returns a `HostLaunch` (k, v appended, evicted rows indexed) instead of
attending; `run_host_launches` then makes every such row's search and attention of the layer
in one call (kernels/cpu_rows.py exact_attend_rows, rows shared with the helper thread):

    per row    meta: static tier and host chunk addresses, host rows, k = min(budget, host rows)
    per layer  q = stack(rows' queries) [G, H_q, D]; exact_attend_rows -> out [G, H_q, D]
    per row    the retriever's counters, ctx.scanned; "search" timer += the call's seconds

A session stepped alone runs the same call with one row (HostLaunch.run), so a batched step
equals each session alone bit for bit on this route. A row whose scores hold a NaN takes its
route alone (index/exact.py ranks it through torch).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kvloft.index.base import Selection

__all__ = ["HostLaunch", "run_host_launches"]


@dataclass(eq=False)
class HostLaunch:
    """One row's exact search and attention over its host tier in place, prepared and not yet run."""

    q: Tensor  # [H_q, D] fp32 the row's query
    tiers: Any  # the layer's LayerTiers (tiers/layer_tiers.py): static tier k, v; host_k, host_v chunks
    retriever: Any  # the row's ExactRetriever: counters
    k: int  # rows to select: min(budget, host rows)
    scale: float
    ctx: Any  # the row's AttentionContext: timers, scanned
    alone: Callable[[], Tensor]  # the row's own route -> [1, H_q, D] (a NaN score)

    def run(self) -> Tensor:
        """The row alone: out [1, H_q, D]."""
        out = torch.empty((1, *self.q.shape), dtype=self.q.dtype)
        run_host_launches({0: self}, out)
        return out

    def group_key(self) -> tuple[Any, ...]:
        return (self.q.shape, self.scale, self.tiers.host_k.row_shape)


def _tables(rows: list[HostLaunch]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """meta [G, META], kaddr, vaddr [n_chunks] int64 of the rows (kernels/cpu_rows.py)."""
    from kvloft.kernels.cpu_rows import row_meta

    meta, kaddr, vaddr = [], [], []
    for ln in rows:
        t = ln.tiers
        sk, sv, _ = t.static_kv()
        hk, hv = t.host_k, t.host_v
        meta.append(row_meta(sk, sv, t.n_host, hk.chunk_rows, len(kaddr), ln.k))
        kaddr += [c.data_ptr() for c in hk.chunks]
        vaddr += [c.data_ptr() for c in hv.chunks]
    return np.array(meta, np.int64), np.array(kaddr, np.int64), np.array(vaddr, np.int64)


def _run_group(rows: list[HostLaunch]) -> tuple[Tensor, Tensor, np.ndarray]:
    """The rows of one group_key in one call -> out [G, H_q, D], ids [G, H_kv, k_max], ok [G]."""
    from kvloft.kernels import cpu_attend
    from kvloft.kernels.cpu_rows import exact_attend_rows

    t0 = time.perf_counter()
    meta, kaddr, vaddr = _tables(rows)
    q = torch.stack([ln.q for ln in rows])
    hkv = rows[0].tiers.host_k.row_shape[0]
    out, _, ids, ok = exact_attend_rows(q, meta, kaddr, vaddr, scale=rows[0].scale, n_kv_heads=hkv,
                                        split=cpu_attend.SPLIT)
    dt = time.perf_counter() - t0
    for ln in rows:
        ln.ctx.timers.seconds["search"] += dt
    return out, ids, ok


def run_host_launches(launches: dict[int, HostLaunch], out: Tensor) -> None:
    """Run prepared rows {row b: launch}, writing row b's result into out[b] (out [B', H_q, D]):
    one call per group of rows of equal group_key."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for b, ln in launches.items():
        groups.setdefault(ln.group_key(), []).append(b)
    for bs in groups.values():
        rows = [launches[b] for b in bs]
        got, ids, ok = _run_group(rows)
        for i, (b, ln) in enumerate(zip(bs, rows, strict=True)):
            if not ok[i]:
                out[b : b + 1] = ln.alone()
                continue
            out[b] = got[i]
            hkv = ids.shape[1]
            sel = Selection(ids=ids[i, :, : ln.k], scanned=ln.tiers.n_host * hkv, padded=False)
            ln.retriever.record_selection(sel)
            ln.ctx.scanned += sel.scanned

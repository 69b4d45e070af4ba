"""The numbers of one HiP row's search of one layer this step, computed on the host before the
step runs (the arithmetic of HipRetriever.select, index/hip.py, without the keys): which stages
refresh, each stage's candidate, chunk and kept counts, the new masks' lengths, the rows
selected, the probe rows read, and whether the row searches with z-scored logits. The whole
decode step (runtime/whole_hip.py) passes them to its graph as data."""

from __future__ import annotations

from dataclasses import dataclass

from kvloft.index.hip import HipRetriever
from kvloft.index.hip_batch import n_keep
from kvloft.kernels.hip_stage import probes_per_chunk

__all__ = ["HipPlan", "plan_select"]


@dataclass
class HipPlan:
    """One row's search of one layer this step, as select() would run it (host numbers only)."""

    n: int  # host rows
    budget: int
    every: bool  # select() prunes nothing: the first min(n, budget) rows, masks dropped
    flags: tuple[bool, ...]
    stages: list[tuple[int, ...]]  # per stage: n_full, n_keep, n_cand, new mask length, refresh, previous
    #                                mask length, rows it had seen (whole_hip.py _STAGE but two)
    fresh: int  # rows that arrived since the last stage ran (they come first)
    seen: int  # the first of them
    n_sel: int  # rows selected
    reads: int  # probe rows read
    z: bool = False  # searches with z-scored logits (rank="z" and a stage due: select() makes q', bias)


def plan_select(hip: HipRetriever, layer: int, n: int, budget: int) -> HipPlan:
    """select(layer, q, budget)'s numbers (index/hip.py), computed without the keys."""
    p = hip.params
    st = hip.state[layer]
    if n == 0 or budget == 0 or budget >= n:
        return HipPlan(n, budget, True, (False,) * p.n_stages, [(0,) * 7] * p.n_stages, n, 0, min(n, budget), 0)
    flags = hip._refresh_flags(st, budget)
    lens = [None if m is None else m.shape[-1] for m in st.masks]  # [M] or [H_kv, M] (heads="kv")
    seen, stages, reads = list(st.seen), [], 0
    for i, length in enumerate(p.chunk_sizes):
        m_prev, seen_prev = (lens[i - 1], seen[i - 1]) if i else (0, 0)
        if not flags[i]:
            stages.append((0, 0, 0, 0, 0, m_prev, seen_prev))
            continue
        n_cand = n if i == 0 else m_prev + n - seen_prev
        kept = hip._kept(i, budget)
        n_full = keep = 0
        if n_cand > kept:
            n_full = n_cand // length
            keep = n_keep(kept, length, n_full)
            reads += n_full * probes_per_chunk(length)
        lens[i], seen[i] = keep * length + n_cand - n_full * length, n
        stages.append((n_full, keep, n_cand, lens[i], 1, m_prev, seen_prev))
    fresh = max(n - seen[-1], 0)
    z = p.rank == "z" and any(flags)
    return HipPlan(n, budget, False, flags, stages, fresh, seen[-1], min(budget, fresh + lens[-1]), reads, z)

"""HiP with a mask per KV head (hip option heads="kv", index/hip.py).

By default a chunk is scored by its representative's max over all query heads: one mask
shared by all heads, Selection.ids [k]. With heads="kv" each KV head g keeps its own mask,
scored by the max over its own query-head group only: every stage that refreshes runs once
per KV head (one search per KV head and stage), the other groups' heads getting a +inf bias so
their logits are -inf (kernels/hip_stage.py probe_scores). A layer's masks are then
[H_kv, M_i] (every head keeps as many rows: the counts depend on n and the budget only) and
Selection.ids [H_kv, k]. The batched search (index/hip_batch.py) keeps one mask per row, so
such rows select() alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kvloft.index.base import Selection
from kvloft.index.hip_state import LayerState, with_fresh
from kvloft.tiers.chunked import ChunkedRows

__all__ = ["group_biases", "select_per_head"]


def select_per_head(hip: Any, st: LayerState, store: ChunkedRows, n: int, budget: int, flags: tuple[bool, ...],
                    q: Tensor, bias: Tensor | None) -> Selection:
    """HipRetriever.select with heads="kv" (hip: the retriever; index/hip.py imports this module,
    not the reverse), for n host rows in store and the stages flags says refresh: every such
    stage runs once per KV head g and keeps g's own mask in st.masks[i] [H_kv, M_i]. q [H_q, D]
    (z-scaled with bias [H_q] for rank="z").
    Returns ids [H_kv, k]: each head's fresh rows, then its own last-stage mask."""
    hkv = hip.model_cfg.n_kv_heads
    biases = group_biases(q.shape[0], hkv, bias, q.device)  # [H_kv, H_q] fp32
    reads = 0
    for i, refresh in enumerate(flags):
        if not refresh:
            continue
        masks, r = [], 0
        for g in range(hkv):
            cand = None if i == 0 else _with_fresh_head(hip, st, i - 1, n, g)
            mask, r_g = hip._run_stage(i, store, q, cand, hip._kept(i, budget), biases[g])
            masks.append(mask)
            r += r_g
        reads += hip._stage_ran(st, i, torch.stack(masks), n, r)
    last = hip.params.n_stages - 1
    cand = torch.stack([_with_fresh_head(hip, st, last, n, g) for g in range(hkv)])  # [H_kv, M]
    st.step, st.budget, st.refreshed = st.step + 1, budget, flags
    # reads already sum the H_kv searches' probe rows (each reads a row of every KV head,
    # counted as one here as in shared mode: scanned = reads * H_kv)
    sel = Selection(ids=cand[:, :budget], scanned=reads * hkv, padded=False)
    hip._stats.record(sel)
    return sel


def _with_fresh_head(hip: Any, st: LayerState, stage: int, n: int, head: int) -> Tensor:
    """KV head `head`'s cached rows of stage `stage` plus the fresh rows: [M]."""
    return with_fresh(st.masks[stage][head], st.seen[stage], n, last=stage == hip.params.n_stages - 1,
                      count=hip._count(n))


def group_biases(hq: int, hkv: int, bias: Tensor | None, device: torch.device) -> Tensor:
    """Per KV head g, the bias [H_q] fp32 that leaves only g's query-head group in a probe's max
    (+inf on every other head; rank="z"'s bias [H_q] or 0 on g's own) -> [H_kv, H_q]."""
    group = hq // hkv
    own = torch.arange(hq, device=device) // group == torch.arange(hkv, device=device)[:, None]  # [H_kv, H_q]
    base = torch.zeros(hq, dtype=torch.float32, device=device) if bias is None else bias.float()
    return torch.where(own, base, torch.full_like(base, float("inf")))

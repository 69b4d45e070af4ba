"""One decode token at exact positions: the static tier and the selected host rows.

    o = merge((o_s, lse_s), (o_r, lse_r))      exact log-sum-exp merge

The retrieved part comes from a RowFetch (scheduler/fetch.py): InPlaceRows by default,
scheduler/overlap.py's OverlapFetch with RuntimeConfig(scheduler="overlap"). Where rows are
read in place from a pinned host tier by the Triton kernels, the static tier, the selection
and a device copy of its stable part go in one launch instead (runtime/rowspace.py); a
batched step runs several sessions' such launches as one (prepare; runtime/batch_attention.py),
their searches too where the retrievers search together (runtime/batch_search.py).
On the CPU (torch kernels, rows read in place from a host tier of model-dtype rows) the static
tier and the selection share one softmax, the selected rows' logits taken from the search where
it hands them over (kernels/cpu_decode.py select_attend); `fused_cpu = False` forces the merge.
Where the exact retriever searches the host tier in place (ExactRetriever.scans_in_place) the
search and that softmax are one compiled call, prepared as a HostLaunch and run with the other
rows of a batched step (runtime/batch_host.py; alone: a call of one row).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvloft.index.base import Selection
from kvloft.kernels.cpu_decode import select_attend
from kvloft.runtime.batch_attention import TableLaunch
from kvloft.runtime.batch_host import HostLaunch
from kvloft.runtime.batch_search import PendingSearch
from kvloft.runtime.context import AttentionContext
from kvloft.runtime.host_rows import InPlaceRows
from kvloft.runtime.rowspace import LayerRowSpace
from kvloft.scheduler.fetch import RowFetch
from kvloft.tiers.kvcache import Evicted, LayerTiers, TieredKVCache


class ExactDecode:
    def __init__(self, ctx: AttentionContext, cache: TieredKVCache, fetch: RowFetch) -> None:
        self.ctx, self.cache, self.fetch = ctx, cache, fetch
        # static tier + selection in one kernel launch over pinned host chunks, with a device
        # copy of a selection's stable part (rows fetched in place only)
        self.one_launch = True
        self.cache_selections = True
        self.spaces: dict[int, LayerRowSpace] = {}
        self.fused_cpu = True  # the CPU route below; False: static + retrieved partials merged

    def step(self, layer: int, q: Tensor, evicted: Evicted | None, index_add: bool) -> Tensor:
        """q [1, H_q, D] of a token whose k, v are appended already (evicted: the rows that
        append moved to the host tier). Returns [1, H_q, D]."""
        got = self.prepare(layer, q, evicted, index_add)
        return got.run() if isinstance(got, (TableLaunch, HostLaunch)) else got

    def prepare(self, layer: int, q: Tensor, evicted: Evicted | None, index_add: bool,
                defer_search: bool = False) -> Tensor | TableLaunch | PendingSearch:
        """step(), except that the one-launch route comes back as its TableLaunch, selected
        and counted but not run (a batched step runs several rows' in one launch:
        runtime/batch_attention.py); the other routes come back attended. defer_search: the
        one-launch and CPU routes come back before their search, as a PendingSearch (a batched
        step searches several rows' at once: runtime/batch_search.py)."""
        ctx = self.ctx
        tiers: LayerTiers = self.cache[layer]
        q1 = q[0]  # [H_q, D]
        budget = ctx.rcfg.budget if tiers.n_host else 0
        pending = self.fetch.start(layer, tiers, q1, evicted, budget, index_add)
        if budget and self._fused_cpu(tiers):
            host = self._host_launch(layer, tiers, q1, budget)
            if host is not None:
                return host
            if defer_search:
                return PendingSearch(self.fetch, layer, q1, budget, ctx.timers,
                                     lambda sel: self._cpu_attend(tiers, q1, sel))
            return self._cpu_step(layer, tiers, q1, budget)
        space = self._row_space(layer, tiers)
        if space is not None:
            if defer_search:
                return PendingSearch(self.fetch, layer, q1, ctx.rcfg.budget, ctx.timers,
                                     lambda sel: self._launch(tiers, q1, space, sel))
            return self._prepare_launch(layer, tiers, q1, space)
        with ctx.timers("static_attention"):
            sk, sv, _ = tiers.static_kv()
            o_s, l_s = ctx.ops.decode_attend(q1, sk, sv, scale=ctx.scale)
        got = self.fetch.attend(layer, tiers, q1, budget, pending)
        ctx.scanned += got.scanned
        if not got.outs:
            return o_s[None]
        with ctx.timers("retrieved_attention"):
            out, _ = ctx.ops.merge([o_s, *got.outs], [l_s, *got.lses])
        return out[None]

    def _prepare_launch(self, layer: int, tiers: LayerTiers, q1: Tensor, space: LayerRowSpace) -> TableLaunch:
        """The static tier, the selection for q1 [H_q, D] and its cached stable part, as one launch to run."""
        return self._launch(tiers, q1, space, self.fetch.select(layer, q1, self.ctx.rcfg.budget))

    def _launch(self, tiers: LayerTiers, q1: Tensor, space: LayerRowSpace, sel: Selection) -> TableLaunch:
        """The launch of q1 [H_q, D] over the static tier and selection `sel` (counted here)."""
        ctx = self.ctx
        ctx.scanned += sel.scanned
        with ctx.timers("attention"):
            parts = space.id_parts(sel.ids.to(q1.device), sel.stable, sel.n_fresh, tiers.n_static)
        return TableLaunch(q1, tiers.k, tiers.v, parts, space.tables, space.slot_rows, ctx.scale, ctx.timers)

    def _fused_cpu(self, tiers: LayerTiers) -> bool:
        """The CPU route applies: torch kernels on the CPU, rows read in place (InPlaceRows)
        from a host tier of model-dtype rows (an 8-bit one dequantizes through gather_rows)."""
        ctx = self.ctx
        return (self.fused_cpu and ctx.device.type == "cpu" and ctx.ops.name == "reference"
                and tiers.host_dtype is None and isinstance(self.fetch, InPlaceRows))

    def _host_launch(self, layer: int, tiers: LayerTiers, q1: Tensor, budget: int) -> HostLaunch | None:
        """The CPU route as one compiled pass over the host tier (runtime/batch_host.py), where the
        retriever searches it in place (ExactRetriever.scans_in_place) and every row is fp32 in
        memory; None elsewhere (then select() and select_attend, below)."""
        r = self.fetch.retriever
        # looked up on the class: a wrapper that forwards attributes (eval's counting retriever)
        # sees every select(), so its rows take the row's own route; so does a retriever whose
        # select() is replaced on the instance (a hook that records each selection)
        scans = getattr(type(r), "scans_in_place", None)
        if scans is None or "select" in vars(r) or not scans(r, layer) or q1.dtype != torch.float32 or tiers.k.dtype != torch.float32 \
                or not (tiers.k.is_contiguous() and tiers.v.is_contiguous()):
            return None
        k = min(budget, tiers.n_host)
        return HostLaunch(q1, tiers, r, k, self.ctx.scale, self.ctx,
                          lambda: self._cpu_step(layer, tiers, q1, budget))

    def _cpu_step(self, layer: int, tiers: LayerTiers, q1: Tensor, budget: int) -> Tensor:
        """q1 [H_q, D] over the static tier and its selection in one softmax -> [1, H_q, D]."""
        return self._cpu_attend(tiers, q1, self.fetch.select(layer, q1, budget))

    def _cpu_attend(self, tiers: LayerTiers, q1: Tensor, sel: Selection) -> Tensor:
        """The CPU route's attention of q1 [H_q, D] given its selection (counted here) -> [1, H_q, D]."""
        ctx = self.ctx
        ctx.scanned += sel.scanned
        hk, hv = tiers.host_k, tiers.host_v
        logits = sel.logits
        if logits is not None and logits.shape[1] != len(hk):
            logits = None  # not this tier's rows: read the keys
        with ctx.timers("attention"):
            sk, sv, _ = tiers.static_kv()
            out, _ = select_attend(q1, sk, sv, hk.chunks, hv.chunks, hk.chunk_rows, sel.ids, scale=ctx.scale,
                                   logits=logits, padded=sel.padded)
        return out[None]

    def _row_space(self, layer: int, tiers: LayerTiers) -> LayerRowSpace | None:
        """The layer's one-launch decode rows (runtime/rowspace.py), or None where they do
        not apply: rows not fetched in place, torch kernels, a host tier not pinned (the CPU)
        or spilled to disk, an empty host tier or budget, or a retriever that attends on the host."""
        ctx = self.ctx
        if (not isinstance(self.fetch, InPlaceRows) or not self.one_launch or ctx.ops.name != "triton"
                or tiers.n_host == 0 or ctx.rcfg.budget == 0
                or getattr(self.fetch.retriever, "attend_on_host", False)):
            return None
        hk, hv = tiers.host_k, tiers.host_v
        if not (hk.pin and hv.pin) or hk.n_spilled or hv.n_spilled:
            return None
        space = self.spaces.get(layer)
        if space is None or space.tiers is not tiers:
            rows = ctx.rcfg.budget if self.cache_selections else 0
            space = self.spaces[layer] = LayerRowSpace(tiers, ctx.device, rows)
        return space

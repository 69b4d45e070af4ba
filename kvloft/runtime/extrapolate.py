"""Attention in extrapolation mode: sink and retrieved keys read at remapped positions.

The mapping, the neighbour runs and the position-free search are described in
runtime/positions.py. A decode token attends to the window at true positions and to the
remapped sink and retrieved keys. A prefill chunk attends to itself causally, to the window,
to the remapped sink and to the host keys per KV head (at most `budget`) that score highest
for the chunk's mean query (the retriever once built, else exact scores over the position-free
host keys), widened into runs and remapped the same way; the feed's tail selects for itself
(TieredAttention.tail_blocks), so a question at the end of a prompt is not read through the
chunk's haystack.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from kvloft.index.base import Retriever
from kvloft.index.diversity import capped_topk
from kvloft.runtime.chunk_attention import attend_chunk
from kvloft.runtime.context import AttentionContext
from kvloft.runtime.host_rows import InPlaceRows
from kvloft.runtime.indexes import IndexBook
from kvloft.runtime.positions import neighbor_plan, remap_sink, search_queries, widen_selection, window_start
from kvloft.runtime.rotation_table import RotationTable
from kvloft.tiers.kvcache import LayerTiers, TieredKVCache


class ExtrapolateRoute:
    def __init__(self, ctx: AttentionContext, cache: TieredKVCache, retriever: Retriever, indexes: IndexBook,
                 rows: InPlaceRows) -> None:
        self.ctx, self.cache, self.retriever = ctx, cache, retriever
        self.indexes, self.rows = indexes, rows
        self.table = RotationTable(ctx.inv_freq)  # prefill's re-rotations (decode keeps rotate_keys: no sync)
        self._pos_max = 0  # the largest position of the chunk being prefilled

    def decode(self, layer: int, q: Tensor, positions: Tensor) -> Tensor:
        """One decode token q [1, H_q, D] at positions [1], already appended: window at true
        positions; sink and retrieved keys remapped. Returns [1, H_q, D]."""
        ctx = self.ctx
        tiers: LayerTiers = self.cache[layer]
        q1 = q[0]  # [H_q, D]
        ids = torch.empty((ctx.cfg.n_kv_heads, 0), dtype=torch.int64, device=ctx.device)
        if tiers.n_host and ctx.rcfg.budget:
            with ctx.timers("search"):
                q_search = self._search_queries(q, positions)[0]
                n_pick, radius = neighbor_plan(ctx.rcfg.budget, ctx.rcfg.neighbor_radius, tiers.n_host)
                sel = self.retriever.select(layer, q_search, n_pick)
                ids = widen_selection(sel.ids, radius, tiers.n_host) if radius else sel.ids
            ctx.scanned += sel.scanned
        with ctx.timers("static_attention"):
            sk, sv, _ = tiers.static_kv()
            w0 = window_start(tiers, positions[-1] + 1)
            sink_k, sink_v, ret_delta = remap_sink(tiers, ids, w0, ctx.inv_freq, ctx.device)
            o_w, l_w = ctx.ops.decode_attend(q1, sk[tiers.sink_fill :], sv[tiers.sink_fill :], scale=ctx.scale)
            o_s, l_s = ctx.ops.decode_attend(q1, sink_k, sink_v, scale=ctx.scale)
        outs, lses = [o_w, o_s], [l_w, l_s]
        if ids.numel():
            with ctx.timers("retrieved_attention"):
                o_r, l_r = self.rows.retrieved(tiers, q1, ids, rot_delta=ret_delta)
            outs.append(o_r)
            lses.append(l_r)
        out, _ = ctx.ops.merge(outs, lses)
        return out[None]

    def prefill(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor,
                tail_blocks: Callable[[int], list[tuple[int, int]]]) -> Tensor:
        """A prefill chunk q [T, H_q, D], k, v [T, H_kv, D] at positions [T], before it is
        appended: itself causally, the window, the remapped sink and top host keys.

        tail_blocks(T): the query ranges that select for themselves (a later range overwrites
        an earlier one's rows). All selections of a chunk are made in one pass over the host keys.
        """
        ctx = self.ctx
        tiers: LayerTiers = self.cache[layer]
        with ctx.timers("prefill_attention"):
            self._pos_max = int(positions.max())  # bounds every re-rotation of this chunk (_rot_bound)
            w0 = window_start(tiers, positions[0])
            ids = torch.empty((ctx.cfg.n_kv_heads, 0), dtype=torch.int64)
            tails: list[tuple[int, int]] = []
            tail_ids: list[Tensor] = []
            if tiers.n_host and ctx.rcfg.budget:
                tails = tail_blocks(q.shape[0])
                ids, *tail_ids = self.selections(layer, tiers, q, positions, [(0, q.shape[0]), *tails])
            out = self._attend_remapped(tiers, q, k, v, ids, w0)
            for (a, b), ids_ab in zip(tails, tail_ids, strict=True):  # queries a..b-1, causal over k[:b]
                out[a:b] = self._attend_remapped(tiers, q[a:b], k[:b], v[:b], ids_ab, w0)
        return out

    def selections(self, layer: int, tiers: LayerTiers, q: Tensor, positions: Tensor,
                   ranges: list[tuple[int, int]]) -> list[Tensor]:
        """Host rows [H_kv, k] (or [k]; -1 = pad) for the prefill queries of each range [a, b)
        of q [T, H_q, D] at positions [T], in one pass: the top keys per KV head for the
        range's mean search query (summed logits, up to a factor b - a), widened by their
        neighbours (neighbor_plan, widen_selection)."""
        rcfg = self.ctx.rcfg
        n_pick, radius = neighbor_plan(rcfg.budget, rcfg.neighbor_radius, tiers.n_host)
        self._pos_max = int(positions.max())
        rot = self._rotate(self._rot_bound(tiers, 0))
        sq = search_queries(q, positions, rcfg.n_window, self.ctx.inv_freq, rot).float()  # [T, H_q, D]
        q_means = torch.stack([sq[a:b].mean(0) for a, b in ranges])  # [R, H_q, D]
        if self.indexes.built[layer]:
            tops = [self.retriever.select(layer, qm.to(q.dtype), n_pick).ids for qm in q_means]
        else:
            tops = list(self._exact_top(layer, q_means, n_pick).unbind(0))
        return [widen_selection(ids, radius, tiers.n_host) if radius else ids for ids in tops]

    def _rot_bound(self, tiers: LayerTiers, k: int) -> int:
        """A bound on |delta| of this chunk's re-rotations with k retrieved keys per head (host
        ints, no sync): new positions lie in [w0 - k - n_s, w0), search queries move by
        n_window - position, true positions in [0, max position of the chunk]."""
        return self._pos_max + k + tiers.sink_fill + self.ctx.rcfg.n_window + 1

    def _rotate(self, bound: int) -> Callable[[Tensor, Tensor], Tensor]:
        return lambda x, delta: self.table.rotate(x, delta, bound)

    def _search_queries(self, q: Tensor, positions: Tensor) -> Tensor:
        return search_queries(q, positions, self.ctx.rcfg.n_window, self.ctx.inv_freq)

    def _exact_top(self, layer: int, q_means: Tensor, k: int) -> Tensor:
        """The top k host rows [R, H_kv, k] (CPU; -1 = pad) per KV head for each of R mean
        search queries q_means [R, H_q, D] (fp32), by exact scores over the position-free host
        keys, reduced over each GQA group, with near-identical keys capped (max_similar).

        One pass over the keys for all R queries, on the compute device: on CUDA the pinned
        host chunks stream down asynchronously (a chunk's copy overlaps the previous chunk's
        scores); the buckets of the cap were computed once, as the rows arrived."""
        ctx, rcfg = self.ctx, self.ctx.rcfg
        hkv = ctx.cfg.n_kv_heads
        n_host = self.cache[layer].n_host
        r = q_means.shape[0]
        if k >= n_host:  # a budget covering the host tier takes all of it (no cap), as the retriever does
            return torch.arange(n_host)[None, None].expand(r, hkv, -1).contiguous()
        free = self.indexes.free_host(layer)
        dev = ctx.device
        qg = q_means.to(dev).view(r, hkv, -1, q_means.shape[-1])  # [R, H_kv, g, D]
        parts = []
        for _, chunk in free.iter_chunks():
            keys = chunk.to(dev, non_blocking=True).float()  # [n, H_kv, D]
            s = torch.einsum("rhgd,nhd->rhgn", qg, keys)
            parts.append(s.amax(2) if rcfg.gqa_reduce == "max" else s.sum(2))
        scores = torch.cat(parts, dim=-1).view(r * hkv, n_host)  # [R * H_kv, N]
        if rcfg.max_similar:  # repeated text: cap near-identical keys (index/diversity.py)
            chunks = self.indexes.free_buckets[layer].iter_chunks()
            buckets = torch.cat([c.to(dev, non_blocking=True) for _, c in chunks])
            buckets = buckets.t().long()[None].expand(r, -1, -1).reshape(r * hkv, n_host)
            ids = capped_topk(scores, buckets, k, rcfg.max_similar)
        else:
            ids = torch.topk(scores, min(k, n_host), dim=-1).indices
        return ids.view(r, hkv, -1).to("cpu")

    def _attend_remapped(self, tiers: LayerTiers, q: Tensor, k: Tensor, v: Tensor, ids: Tensor,
                         w0: Tensor) -> Tensor:
        """The last Tq queries q [Tq, H_q, D] of the chunk k, v [T, H_kv, D] (causal) over the
        window, the sink and host rows ids ([H_kv, k] / [k]), remapped before w0 (0-dim)."""
        ctx = self.ctx
        sk, sv, _ = tiers.static_kv()
        ns = tiers.sink_fill
        rot = self._rotate(self._rot_bound(tiers, ids.shape[-1]))
        sink_k, sink_v, ret_delta = remap_sink(tiers, ids, w0, ctx.inv_freq, ctx.device, rot)
        gathered = None
        if ids.numel():
            gk, gv, valid = self.rows.gather(tiers, ids)
            delta = (ret_delta if ret_delta.dim() == 2 else ret_delta[None].expand(valid.shape[0], -1))
            gathered = (rot(gk, delta.to(ctx.device)), gv, valid)
        return attend_chunk(ctx.ops, ctx.scale, q, k, v, [sink_k, sk[ns:]], [sink_v, sv[ns:]], gathered)

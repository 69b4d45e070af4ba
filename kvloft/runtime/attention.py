"""Per-layer attention behind the model's one call per layer (DESIGN.md, data path).

DenseAttention   the baseline: every token on the compute device, causal softmax (dense.py).
TieredAttention  static tier (sink + window) + host tier. A decode token attends to the
                 static tier and to the host rows its retriever selects, the two partials
                 merged exactly by log-sum-exp:
                     o = merge((o_s, lse_s), (o_r, lse_r))

TieredAttention is the facade; each concern is a room of its own, composed here and sharing
one AttentionContext (context.py: configs, kernels, timers, counters):

    indexes.py        IndexBook      index lifecycle: build (or feed chunk by chunk), add, rebuild,
                                     position-free keys
    queries.py        QuerySampler   the prefill queries an index learns from
    exact_prefill.py  ExactPrefill   offloaded prefill at true positions: dense or sparse
    exact_decode.py   ExactDecode    a decode token: static tier + a RowFetch's partials
    host_rows.py      InPlaceRows    the default RowFetch: selected rows read where they lie
    extrapolate.py    ExtrapolateRoute  prefill and decode with remapped positions
    positions.py      remap_deltas, widen_selection, the position-free search (the mapping)
    scheduled.py      ScheduledAttention: this facade with the scheduler's OverlapFetch

Position modes (RetrievalConfig.position_mode): "exact" reads keys at their true positions
(with a covering budget the result equals dense attention); "extrapolate" moves sink and
retrieved keys so that no query sees a relative distance beyond what the model was trained
on (positions.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kvloft.config import ModelConfig, RetrievalConfig
from kvloft.index.base import Retriever
from kvloft.kernels import KernelSet
from kvloft.runtime.batch_attention import TableLaunch
from kvloft.runtime.batch_host import HostLaunch
from kvloft.runtime.batch_search import PendingSearch
from kvloft.runtime.context import AttentionContext
from kvloft.runtime.dense import DenseAttention, Timers
from kvloft.runtime.exact_decode import ExactDecode
from kvloft.runtime.exact_prefill import ExactPrefill
from kvloft.runtime.extrapolate import ExtrapolateRoute
from kvloft.runtime.host_rows import InPlaceRows
from kvloft.runtime.indexes import IndexBook
from kvloft.runtime.positions import remap_deltas, widen_selection
from kvloft.runtime.queries import QuerySampler
from kvloft.scheduler.fetch import RowFetch
from kvloft.tiers.kvcache import LayerTiers, TieredKVCache

__all__ = ["DenseAttention", "QuerySampler", "TieredAttention", "Timers", "remap_deltas", "widen_selection"]


def _held(room: str, name: str, doc: str) -> property:
    """An attribute a room holds (self.<room>.<name>), read and set through the facade."""
    return property(lambda self: getattr(getattr(self, room), name),
                    lambda self, value: setattr(getattr(self, room), name, value), doc=doc)


class TieredAttention:
    select_last_query = True  # a prefill chunk's last query selects for itself

    def __init__(self, cfg: ModelConfig, rcfg: RetrievalConfig, cache: TieredKVCache,
                 retriever: Retriever, ops: KernelSet, device: torch.device, profile: bool = False, *,
                 fetch: RowFetch | None = None) -> None:
        self.ctx = ctx = AttentionContext.make(cfg, rcfg, ops, device, profile)
        self.cache, self.retriever = cache, retriever
        cap = rcfg.query_sample if getattr(retriever, "needs_queries", True) else 0
        self.sampler = QuerySampler(cfg.n_layers, cap)
        # prefill: tokens of the current feed after the chunk being attended to (Session sets it)
        self.feed_after = 0
        self.indexes = IndexBook(ctx, cache, retriever)
        self.host_rows = InPlaceRows(ctx, retriever)
        self.prefill = ExactPrefill(ctx, self.host_rows)
        self.decoder = ExactDecode(ctx, cache, fetch if fetch is not None else self.host_rows)
        self.extrapolate = ExtrapolateRoute(ctx, cache, retriever, self.indexes, self.host_rows)
        self.room_made: set[int] = set()  # layers whose room for the coming decode token is made

    @property
    def retriever(self) -> Retriever:
        return self._retriever

    @retriever.setter
    def retriever(self, retriever: Retriever) -> None:
        """Swapping the retriever (a wrapper that counts, a rebuilt one) reaches every room that calls it."""
        self._retriever = retriever
        rooms = [getattr(self, n, None) for n in ("indexes", "host_rows", "extrapolate")]
        rooms.append(getattr(getattr(self, "decoder", None), "fetch", None))
        for room in rooms:
            if room is not None and hasattr(room, "retriever"):
                room.retriever = retriever

    # ---- the one call per layer ----------------------------------------------------------------

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """q [T, H_q, D], k, v [T, H_kv, D] (keys rotated) at positions [T] -> out [T, H_q, D]."""
        out = self.attend_deferred(layer, q, k, v, positions)
        return out.run() if isinstance(out, (TableLaunch, HostLaunch)) else out

    def attend_deferred(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor,
                        defer_search: bool = False) -> Tensor | TableLaunch | HostLaunch | PendingSearch:
        """attend(), except that a decode token on the one-launch route comes back as its
        TableLaunch (k, v appended, the selection made), to be run with other sessions' rows
        (a batched step: runtime/batch_attention.py). defer_search: a decode token at exact
        positions on the one-launch or CPU route comes back before its search, as a
        PendingSearch, to be searched with other sessions' rows (runtime/batch_search.py)."""
        extrapolate = self.rcfg.position_mode == "extrapolate"
        if self.decoding and q.shape[0] == 1 and self.indexes.built[layer]:
            if extrapolate:
                self._append(layer, k, v, positions)
                return self.extrapolate.decode(layer, q, positions)
            self.finite.see(k, v)
            if layer in self.room_made:  # its rows moved down before the step (make_room): write the token
                self.room_made.discard(layer)
                self.cache[layer].put(k[0], v[0], positions[0])
                evicted = None
            else:
                evicted = self.cache[layer].append(k, v, positions)  # the fetch feeds the index
            return self.decoder.prepare(layer, q, evicted, index_add=layer not in self.indexes.attached,
                                        defer_search=defer_search)
        if extrapolate:
            out = self.extrapolate.prefill(layer, q, k, v, positions, self.tail_blocks)
        else:
            out = self.prefill.attend(layer, self.cache[layer], q, k, v, self.select_last_query)
        sample = self.sampler.observe(layer, q, positions)
        if sample is not None and not self.indexes.built[layer]:  # the queries the end of the feed keeps
            tiers = self.cache[layer]
            sample = self.sampler.final_part(sample, tiers.n_static + tiers.n_host + q.shape[0] + self.feed_after)
        self.finite.see(k, v)
        self.indexes.feed(layer, self.cache[layer].append(k, v, positions), sample)  # incremental build
        return out

    def plans_room(self) -> bool:
        """A batched step's plan phase makes this backend's room (make_room): decode at exact
        positions with rows read in place (InPlaceRows, whose index add needs no query)."""
        return self.rcfg.position_mode == "exact" and isinstance(self.fetch, InPlaceRows)

    @torch.inference_mode()  # the tiers' tensors are made and written in inference mode
    def make_room(self) -> list[int]:
        """The plan phase of a decode step (plans_room): every built layer's static tier makes
        room for the coming token now (LayerTiers.make_room: the rows it displaces move to the
        host tier), and those rows go into the index, before any layer runs; each layer's
        attend then only writes its token into the freed slot. Results equal the append inside
        the layer, token for token. Returns the rows moved down per built layer."""
        moved = []
        for layer, tiers in enumerate(self.cache.layers):
            if not self.indexes.built[layer]:
                continue
            ev = tiers.make_room()
            self.fetch.add(layer, ev, index_add=layer not in self.indexes.attached)
            self.room_made.add(layer)
            moved.append(0 if ev is None else int(ev.positions.shape[0]))
        return moved

    def append_rows(self, layer: int, k: Tensor, v: Tensor, positions: Tensor) -> None:
        """k/v [T, H_kv, D] (rotated keys) at positions [T] into the tiers and, once built, the
        index, as attend() appends them: for a replica replaying recorded rows."""
        self._append(layer, k, v, positions)

    def _append(self, layer: int, k: Tensor, v: Tensor, positions: Tensor) -> None:
        self.finite.see(k, v)
        self.indexes.add(layer, self.cache[layer].append(k, v, positions))

    def tail_blocks(self, n: int) -> list[tuple[int, int]]:
        """Query ranges [a, b) of an n-query prefill chunk that select their own host keys in
        extrapolate mode, in order (a later range overwrites an earlier one's rows): the
        feed's last prefill_tail queries that lie in this chunk (feed_after = the feed's
        tokens after it), in blocks of prefill_tail_block, then, in the feed's last chunk,
        the last query alone (select_last_query). A range holding the whole chunk is left out
        (it is the chunk's own selection). Each costs one more attention pass per layer; the
        chunks before the feed's tail take none (their queries are the text, not a question)."""
        block = self.rcfg.prefill_tail_block
        tail = min(max(self.rcfg.prefill_tail - self.feed_after, 0), n)
        ranges = [(a, min(a + block, n)) for a in range(n - tail, n, block)]
        if self.select_last_query and self.feed_after == 0:
            ranges.append((n - 1, n))
        return [r for i, r in enumerate(ranges) if r != (0, n) and r not in ranges[:i]]

    def _prefill_select(self, layer: int, tiers: LayerTiers, q: Tensor, positions: Tensor) -> Tensor:
        """Extrapolate mode: host rows [H_kv, k] (or [k]; -1 = pad) for prefill queries
        q [T, H_q, D] at positions [T] (ExtrapolateRoute.selections, one range)."""
        return self.extrapolate.selections(layer, tiers, q, positions, [(0, q.shape[0])])[0]

    def _prefill_selections(self, layer: int, tiers: LayerTiers, q: Tensor, positions: Tensor,
                            ranges: list[tuple[int, int]]) -> list[Tensor]:
        """_prefill_select for the queries of each range [a, b) of q, in one pass."""
        return self.extrapolate.selections(layer, tiers, q, positions, ranges)

    # ---- indexes -------------------------------------------------------------------------------

    def build_indexes(self) -> None:
        """Index every layer's host tier (once, after the first prefill)."""
        self.indexes.build(self.sampler)

    def rebuild_indexes(self, layers: list[int] | None = None) -> None:
        """Build the retriever again from the host tier's keys for the built `layers` (default
        all built): what a restored or rolled-back session does before the retriever's own
        load_state_dict. Queries are not kept, so an index that learned from prefill queries
        is rebuilt from keys alone."""
        self.indexes.rebuild(layers)

    def index_keys(self, layer: int) -> Tensor:
        """The keys [H_kv, N, D] a retriever indexes for this layer's host tier (IndexBook.index_keys)."""
        return self.indexes.index_keys(layer)

    # ---- state, marks, reports -----------------------------------------------------------------

    @property
    def scale(self) -> float:
        return self.ctx.scale

    @property
    def n_tokens(self) -> int:
        return self.cache.n_tokens

    def state_dict(self) -> dict[str, Any]:
        """Scalars of the attention state besides the tiers and the retriever (JSON)."""
        return {"built": list(self.built), "decoding": self.decoding, "scanned": self.scanned,
                "timers": self.timers.as_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state_dict() over tiers already filled."""
        built = state["built"]
        if not isinstance(built, list) or len(built) != self.cfg.n_layers:
            raise ValueError(f"built must list {self.cfg.n_layers} layers, got {built!r}")
        self.built = [bool(b) for b in built]
        self.decoding = bool(state["decoding"])
        self.scanned = int(state["scanned"])
        self.timers.seconds.update(state["timers"])

    def mark(self) -> dict[str, Any]:
        """What rollback() needs to return to this moment: each layer's tier marks (ints), the
        scalars, the query sample, and the retriever's state_dict() where it is small
        (`small_state`: O(budget) per layer, e.g. selection caches), so a failed call costs
        nothing to guard."""
        r = self.retriever
        small = getattr(r, "small_state", False) and hasattr(r, "state_dict") and any(self.built)
        return {"layers": [t.mark() for t in self.cache.layers], "state": self.state_dict(),
                "prefill_stats": dict(self.prefill_stats), "sampler": self.sampler.mark(),
                "free": self.indexes.mark_free(), "fed": self.indexes.mark_fed(),
                "retriever": r.state_dict(host=False) if small else None}

    def rollback(self, mark: dict[str, Any]) -> None:
        """Forget every token appended since mark(). Layers whose host tier grew since have
        their index rebuilt from the host tier (rebuild_indexes); the retriever's small state is
        then restored, so exact, tokenselect, recycled, hip and actqkv continue as if the failed
        call never ran. attention_graph and faiss, whose state grows with the context, are not
        snapshotted: where the failed call added rows, their index is rebuilt from the host
        tier's keys alone (attention_graph then loses what it learned from prefill queries).
        Rows the fetch keeps across steps are dropped (host rows past the mark will change)."""
        grew = [t.n_host > m["n_host"] for t, m in zip(self.cache.layers, mark["layers"], strict=True)]
        for t, m in zip(self.cache.layers, mark["layers"], strict=True):
            t.rollback(m)
        self.indexes.rollback_free(mark["free"])
        self.indexes.rollback_fed(mark["fed"])
        self.load_state_dict(mark["state"])
        self.prefill_stats = dict(mark["prefill_stats"])
        self.sampler.rollback(mark["sampler"])
        self._spaces.clear()  # device copies of selections made during the failed call
        self.room_made.clear()  # a step that failed between make_room and a layer's write
        self.rebuild_indexes([layer for layer, g in enumerate(grew) if g and layer not in self.attached])
        if mark["retriever"] is not None:
            self.retriever.load_state_dict(mark["retriever"])
        self.fetch.reset()

    def bytes(self) -> dict[str, int]:
        return {**self.cache.bytes(), **self.fetch.bytes()}

    def close(self) -> None:
        """Stops the fetch's workers, if any (the tiers stay: cache.close() removes spilled files)."""
        self.fetch.close()

    # ---- state held by the rooms, read and set here --------------------------------------------

    cfg = _held("ctx", "cfg", "ModelConfig")
    ops = _held("ctx", "ops", "KernelSet; replaceable (tests swap torch references for Triton)")
    device = _held("ctx", "device", "the compute device")
    timers = _held("ctx", "timers", "wall-clock seconds per category")
    finite = _held("ctx", "finite", "FiniteWatch over keys and values appended while on")
    fetch = _held("decoder", "fetch", "the RowFetch the decode path reads retrieved rows through")
    rcfg = _held("ctx", "rcfg", "RetrievalConfig; replaceable (a cluster stage sets the budget per call)")
    decoding = _held("ctx", "decoding", "Session sets it: a one-token attend of a built layer decodes")
    scanned = _held("ctx", "scanned", "keys the retriever scored, over all decode steps")
    prefill_stats = _held("ctx", "prefill_stats", "dense/sparse prefill chunks and host rows they read")
    built = _held("indexes", "built", "per layer: is its index built")
    attached = _held("indexes", "attached", "layers whose retriever reads the host tier in place")
    _free_keys = _held("indexes", "free_keys", "position-free host keys per layer, until built")
    _free_buckets = _held("indexes", "free_buckets", "their SimHash buckets (max_similar)")
    one_launch = _held("decoder", "one_launch", "decode: static tier + selection in one launch")
    fused_cpu = _held("decoder", "fused_cpu", "CPU decode: static tier + selection in one softmax")
    cache_selections = _held("decoder", "cache_selections", "one launch: keep a selection's stable part")
    _spaces = _held("decoder", "spaces", "one launch: each layer's LayerRowSpace")

"""The retriever's index over each layer's host tier: built, fed, rebuilt, rolled back.

Indexes are built once at the end of the first feed (a retriever's build sees the whole host
tier and a sample of the prompt's queries); rows leaving the window later (decode, or a later
feed) are added as they go. A retriever that builds incrementally (`incremental` true, an
`extend` method: attention_graph) is fed instead as the first feed's chunks arrive (each
chunk's new host rows and its sampled queries), so its index is built when prefill ends; a
layer whose feed missed rows (a rollback, host rows from elsewhere) is built whole at the end. A retriever with `attach_host_tier` may read a layer's host tier
in place instead (no copy, no add). In extrapolate mode the index holds position-free keys
(RoPE undone; runtime/positions.py), and until a layer's index is built a position-free copy
of its host keys (with their SimHash buckets where max_similar caps near-duplicates) serves
the prefill's exact selection.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvloft.index.base import Retriever
from kvloft.index.diversity import similarity_buckets
from kvloft.runtime.context import AttentionContext
from kvloft.runtime.positions import position_free, search_queries
from kvloft.runtime.queries import QuerySampler
from kvloft.tiers.chunked import ChunkedRows
from kvloft.tiers.kvcache import Evicted, LayerTiers, TieredKVCache


class IndexBook:
    def __init__(self, ctx: AttentionContext, cache: TieredKVCache, retriever: Retriever) -> None:
        self.ctx, self.cache, self.retriever = ctx, cache, retriever
        self.built = [False] * ctx.cfg.n_layers
        self.attached: set[int] = set()  # layers whose retriever reads the host tier's keys in place
        self.position_free = ctx.rcfg.position_mode == "extrapolate"
        self.free_keys: dict[int, ChunkedRows] = {}  # per layer, until the index is built
        self.free_buckets: dict[int, ChunkedRows] = {}  # their SimHash buckets [N, H_kv] (max_similar)
        self.fed: dict[int, int] = {}  # per layer, host rows fed to an incremental index before it is built
        self.stale: set[int] = set()  # layers whose incremental feed missed rows: built whole at the end

    @property
    def incremental(self) -> bool:
        """Whether the retriever is fed prefill chunks (extend) rather than built once after prefill."""
        return bool(getattr(self.retriever, "incremental", False)) and hasattr(self.retriever, "extend")

    def build(self, sampler: QuerySampler) -> None:
        """Index every layer's host tier not built yet, with the sampler's queries; then clear it."""
        attach = getattr(self.retriever, "attach_host_tier", None)
        for layer in range(self.ctx.cfg.n_layers):
            if self.built[layer]:
                continue
            with self.ctx.timers("index_build"):
                if self._fed_whole(layer):
                    pass  # extend() has every host row: the index is built (its last chunks may still link)
                elif attach is not None and not self.position_free and attach(layer, self.cache[layer]):
                    self.attached.add(layer)  # it reads the tier's keys in place; no copy, no add()
                else:
                    self.retriever.build(layer, self.index_keys(layer), self._queries(layer, sampler))
            self.built[layer] = True
            self._drop_free(layer)
        self.fed.clear()
        self.stale.clear()
        sampler.clear()

    def _fed_whole(self, layer: int) -> bool:
        return self.incremental and layer not in self.stale and self.fed.get(layer, -1) == self.cache[layer].n_host

    def feed(self, layer: int, evicted: Evicted | None, sample: tuple[Tensor, Tensor] | None) -> None:
        """A prefill chunk's rows that moved to the host tier (evicted) and its sampled queries
        (sample: queries [m, H_q, D], positions [m]; None: none kept): into a built index as
        add() does; into an incremental one not built yet through extend() (the retriever
        queues the work and returns); otherwise nothing (build() indexes the layer at the end)."""
        if self.built[layer]:
            return self.add(layer, evicted)
        if not self.incremental or layer in self.stale:
            return
        first = self.fed.get(layer, 0)
        n = 0 if evicted is None else evicted.k.shape[0]
        if n and evicted.first_row != first:  # rows the index never saw: build it whole at the end
            self.stale.add(layer)
            return
        if first + n == 0:
            return  # nothing in the host tier yet: no key for the queries to link
        with self.ctx.timers("index_build"):
            keys = self._evicted_keys(evicted) if n else self._no_keys()
            self.retriever.extend(layer, keys, None if sample is None else self._chunk_queries(*sample))
        self.fed[layer] = first + n

    def _evicted_keys(self, evicted: Evicted) -> Tensor:
        """Keys [H_kv, n, D] on the CPU of rows leaving the window, as the index holds them."""
        keys = evicted.k
        if self.position_free:
            keys = position_free(keys, evicted.positions, self.ctx.inv_freq)
        return keys.transpose(0, 1).to("cpu")

    def _no_keys(self) -> Tensor:
        cfg = self.ctx.cfg
        return torch.empty(cfg.n_kv_heads, 0, cfg.head_dim)

    def _chunk_queries(self, q: Tensor, positions: Tensor) -> Tensor:
        """Sampled queries q [m, H_q, D] at positions [m] -> [H_q, m, D] as the index learns
        from them (extrapolate: as searched), as _queries does for the whole sample."""
        if self.position_free:
            q = search_queries(q, positions.to(q.device), self.ctx.rcfg.n_window, self.ctx.inv_freq)
        return q.transpose(0, 1).contiguous()

    def rebuild(self, layers: list[int] | None = None) -> None:
        """Build the retriever again from the host tier's keys for the built `layers` (default
        all built); queries are not kept, so an index that learned from them is rebuilt from keys alone."""
        attach = getattr(self.retriever, "attach_host_tier", None)
        for layer in range(self.ctx.cfg.n_layers) if layers is None else layers:
            if not self.built[layer]:
                continue
            if attach is not None and not self.position_free and attach(layer, self.cache[layer]):
                self.attached.add(layer)  # reads the tier's keys in place, as build() did
                continue
            self.attached.discard(layer)
            self.retriever.build(layer, self.index_keys(layer), None)  # position-free in extrapolate mode
            self._drop_free(layer)  # that copy is only needed until the build

    def add(self, layer: int, evicted: Evicted | None) -> None:
        """Rows an append moved to the host tier, into a built index that does not read the tier in place."""
        if evicted is None or not self.built[layer] or layer in self.attached:
            return
        with self.ctx.timers("index_add"):
            self.retriever.add(layer, self._evicted_keys(evicted), evicted.positions.to("cpu"))

    def index_keys(self, layer: int) -> Tensor:
        """The keys [H_kv, N, D] a retriever indexes for this layer's host tier: as stored
        (after RoPE at true positions), or in extrapolate mode position-free (RoPE undone),
        so a search ranks keys by the logit they will have where they are read."""
        if not self.position_free:
            return self.cache[layer].host_keys_head_major()
        return self.free_host(layer).all().transpose(0, 1)

    def _queries(self, layer: int, sampler: QuerySampler) -> Tensor | None:
        """The sampled queries [H_q, M, D] the index learns from (extrapolate: as searched)."""
        qs = sampler.sample(layer)  # [H_q, M, D]
        if qs is None or not self.position_free:
            return qs
        pos = sampler.sample_positions(layer).to(qs.device)
        sq = search_queries(qs.transpose(0, 1), pos, self.ctx.rcfg.n_window, self.ctx.inv_freq)
        return sq.transpose(0, 1).contiguous()

    def free_host(self, layer: int) -> ChunkedRows:
        """Position-free copy [N, H_kv, D] of the host keys until the index is built, synced
        lazily (host memory, pinned on CUDA so prefill selection streams it down
        asynchronously). With max_similar set, each new row's SimHash buckets are kept
        alongside (computed once)."""
        tiers: LayerTiers = self.cache[layer]
        if layer not in self.free_keys:
            self._new_free(layer, tiers)
        free = self.free_keys[layer]
        if len(free) < tiers.n_host:
            rows = torch.arange(len(free), tiers.n_host)
            with torch.inference_mode():  # the copy may be made inside the model's forward or not
                keys = position_free(tiers.host_k.rows(rows), tiers.host_pos.rows(rows), self.ctx.inv_freq)
                free.append(keys)
                if layer in self.free_buckets:
                    buckets = similarity_buckets(keys, self.ctx.rcfg.similar_bits)  # [H_kv, n]
                    self.free_buckets[layer].append(buckets.transpose(0, 1).to(torch.int32))
        return free

    def _new_free(self, layer: int, tiers: LayerTiers) -> None:
        pin = self.ctx.device.type == "cuda"
        hk = tiers.host_k
        self.free_keys[layer] = ChunkedRows(hk.row_shape, hk.dtype, hk.chunk_rows, "cpu", pin=pin)
        if self.ctx.rcfg.max_similar:
            self.free_buckets[layer] = ChunkedRows((self.ctx.cfg.n_kv_heads,), torch.int32, hk.chunk_rows,
                                                   "cpu", pin=pin)

    def _drop_free(self, layer: int) -> None:
        self.free_keys.pop(layer, None)
        self.free_buckets.pop(layer, None)

    # ---- marks ---------------------------------------------------------------------------------

    def mark_free(self) -> dict[int, int]:
        """Rows of each layer's position-free copy now (what rollback_free needs)."""
        return {layer: len(rows) for layer, rows in self.free_keys.items()}

    def mark_fed(self) -> dict[int, int]:
        """Rows fed to each incremental index not built yet (what rollback_fed needs)."""
        return dict(self.fed)

    def rollback_fed(self, mark: dict[int, int]) -> None:
        """An incremental index cannot drop rows: a layer fed past the mark is built whole at the end."""
        for layer, n in self.fed.items():
            if n > mark.get(layer, 0):
                self.stale.add(layer)

    def rollback_free(self, mark: dict[int, int]) -> None:
        """Position-free copies cut back to mark_free(); copies made since are dropped."""
        for store in (self.free_keys, self.free_buckets):
            for layer in list(store):
                if layer in mark:
                    store[layer].truncate(min(mark[layer], len(store[layer])))
                else:
                    del store[layer]

    def adopt(self, other: IndexBook) -> None:
        """Take `other`'s record of built and attached layers (a backend over the same retriever)."""
        self.built, self.attached = list(other.built), set(other.attached)
        self.fed, self.stale = dict(other.fed), set(other.stale)

"""Per-layer attention behind the model's one call per layer (DESIGN.md, data path).

DenseAttention   the baseline: every token on the compute device, causal softmax.
TieredAttention  static tier (sink + window) + host tier. A decode token attends to the
                 static tier and to the host rows its retriever selects, the two partials
                 merged exactly by log-sum-exp:
                     o = merge((o_s, lse_s), (o_r, lse_r))

Offloaded prefill. A prompt goes through in chunks (RuntimeConfig.prefill_chunk); tokens
leaving the window go to the host tier as the chunk is appended (on CUDA an asynchronous
copy on the cache's copy stream, tiers/kvcache.py), so the device never holds more than
the static tier, the chunk and what the chunk's attention reads:
- dense (exact positions, up to `prefill_dense_tokens` earlier tokens): the chunk attends
  causally to itself, to the static tier and to the host tier one host chunk at a time
  (stream_host_chunks: on CUDA the next chunk's H2D runs on a side stream while the current
  one is attended to; two staging buffers, events, no device-wide sync), each partial merged
  into a running (out, lse) in fp32. The result is dense attention's.
- sparse (exact positions, more than `prefill_dense_tokens` earlier tokens): the chunk
  attends causally to itself, to the static tier (sink + window) and to the host blocks
  selected for its mean query, all at their true positions (TokenSelect-style): each layer
  keeps on the device a block summary, the mean key of every `prefill_block` host rows per
  KV head (updated as rows leave the window); blocks are scored by the chunk's mean query,
  reduced over each GQA group (gqa_reduce), and taken best first while their rows fit in
  the prefill budget (`prefill_budget`, else `budget`; top_block_rows). Those rows are
  gathered and attended to once; the chunk's last query selects its own blocks (its output
  predicts the next token). A prefill of N tokens then costs O(N * (budget + window +
  chunk)) attention plus O(N^2 / (chunk * prefill_block)) scoring, not O(N^2). With a
  budget covering the host tier it equals dense prefill. Both selections' rows are
  gathered once, as whole tokens (their union), and split per KV head on the device.
`prefill_stats` counts dense and sparse chunks and the KV-head rows of the host tier that
prefill attention read; sparse chunks are timed as "prefill_sparse_attention".
Indexes are built once at the end of the first feed (a retriever's build sees the whole host
tier and a sample of the prompt's queries); rows leaving the window later (decode, or a later
feed) are added as they go.

Positions (RetrievalConfig.position_mode; DESIGN.md, Positions). Keys are stored after
RoPE at their true positions. "exact" reads them there: with a covering budget the
result equals dense attention. "extrapolate" moves keys so that no query sees a relative
distance beyond n_sink + budget + n_window (+ the prefill chunk), which lets a model
answer from contexts longer than it was trained on. RoPE is a rotation, so a key stored at
p is read at p' by rotating it once more by p' - p (kernels: rotate_keys, gather_attend's
rot_delta). With w0 the true position of the oldest window key (decode: the ring, which
holds the query's own token; prefill: the ring before the chunk, or the chunk's first
position if the ring is empty):
    window keys (and, in prefill, the chunk's own tokens)   true positions
    the k retrieved keys of a KV head, rank r = 0..k-1 by
    true position, oldest first (padding ignored)           new_pos = w0 - k + r
    the n_s sink keys i = 0..n_s-1                          new_pos = w0 - k - n_s + i
So a decode query at P sees the window at distances 0..n_window-1, the retrieved keys right
before it (n_window .. n_window+k-1, in their order) and the sink before those. When the
retrieved keys are the whole host tier, every key lands on its true position: extrapolate
mode with a covering budget equals dense too. In prefill (extrapolate) a chunk attends to
itself causally, to the window and the remapped sink, and to the host keys per KV head
(at most `budget`) that score highest for the chunk's mean query (the retriever once built,
else exact scores over the host tier), widened into runs (below) and remapped the same way.
The feed's tail selects for itself: its last `prefill_tail` queries in blocks of
`prefill_tail_block` (so a question at the end of a prompt is not read through the chunk's
haystack), then its last query alone, as a decode step would, since its output predicts the
next token; the chunks before take the chunk's selection only (with the chunk's mean
alone, SmolLM2 missed a pass key at 3K tokens that it found this way).

Retrieved keys come as short runs (RetrievalConfig.neighbor_radius = r, widen_selection):
a search picks budget // (2r + 1) keys per KV head and each brings the host keys up to r
positions either side, so the budget is read as runs of consecutive text rather than
scattered single tokens. In a repetitive haystack the single-token top-k is thousands of
copies of one token, remapped into one consecutive stretch ("." after "." ...); as runs,
the same budget reads as coherent text. The picks are also capped (max_similar, by default
4 keys of a SimHash bucket of 8 bits in this mode; index/diversity.py) so that the runs are
not copies of one sentence. With runs, the cap and the tail blocks SmolLM2 read the pass key
in 5 of 5 prompts at 16K and 32K where it read none before (docs/extrapolation.md).

Search in extrapolate mode is position-free: the index gets keys with RoPE undone
(`index_keys`), and the query is rotated to sit `n_window` positions after them, so keys
are ranked by the logit they will have where they are read, not at their true distance
(scored at true distances, SmolLM2 at 12K tokens picked almost none of the pass key's
tokens: RoPE's decay favours near haystack; position-free, most of them in upper layers).
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from kvloft.config import ModelConfig, RetrievalConfig
from kvloft.index.base import Retriever
from kvloft.index.diversity import capped_topk, similarity_buckets
from kvloft.kernels import KernelSet, reference
from kvloft.runtime.dense import DenseAttention, Timers
from kvloft.runtime.model import rope_inv_freq
from kvloft.runtime.numerics import FiniteWatch
from kvloft.runtime.positions import remap_deltas, widen_selection
from kvloft.runtime.prefill import gather_token_rows, stream_host_chunks, top_block_rows
from kvloft.runtime.queries import QuerySampler
from kvloft.runtime.rowspace import LayerRowSpace
from kvloft.tiers.chunked import ChunkedRows
from kvloft.tiers.kvcache import BlockSummary, LayerTiers, TieredKVCache

__all__ = ["DenseAttention", "QuerySampler", "TieredAttention", "Timers", "remap_deltas", "widen_selection"]




class TieredAttention:
    select_last_query = True  # extrapolate prefill: the chunk's last query selects for itself

    def __init__(self, cfg: ModelConfig, rcfg: RetrievalConfig, cache: TieredKVCache,
                 retriever: Retriever, ops: KernelSet, device: torch.device, profile: bool = False) -> None:
        self.cfg, self.rcfg, self.cache = cfg, rcfg, cache
        self.retriever, self.ops, self.device = retriever, ops, device
        self.scale = cfg.head_dim**-0.5
        self.built = [False] * cfg.n_layers
        # layers whose retriever reads the host tier's keys in place (attach_host_tier)
        self.attached: set[int] = set()
        cap = rcfg.query_sample if getattr(retriever, "needs_queries", True) else 0
        self.sampler = QuerySampler(cfg.n_layers, cap)
        self.decoding = False
        # prefill: tokens of the current feed after the chunk being attended to (Session sets it)
        self.feed_after = 0
        self.timers = Timers(sync=profile and device.type == "cuda")
        self.scanned = 0
        self.inv_freq = rope_inv_freq(cfg).to(device)  # [D/2] fp32, for position remapping
        # extrapolate mode: the index holds position-free keys (see index_keys)
        self.position_free = rcfg.position_mode == "extrapolate"
        self._free_keys: dict[int, ChunkedRows] = {}  # per layer, until the index is built
        self._free_buckets: dict[int, ChunkedRows] = {}  # their SimHash buckets [N, H_kv] (max_similar)
        self._h2d_stream = None  # CUDA: the side stream host chunks stream down on (made on first use)
        # decode: static tier + selection in one kernel launch over pinned host chunks
        # (runtime/rowspace.py), with a device copy of a selection's stable part
        self.one_launch = True
        self.cache_selections = True
        self._spaces: dict[int, LayerRowSpace] = {}
        # prefill chunks attended densely / sparsely (exact positions; counted once per chunk,
        # at layer 0) and KV-head rows of the host tier read by prefill attention (all layers)
        self.prefill_stats = {"dense_chunks": 0, "sparse_chunks": 0, "host_keys": 0}
        self.finite = FiniteWatch()  # keys and values appended while on (Session: prefill)

    @property
    def n_tokens(self) -> int:
        return self.cache.n_tokens

    def mark(self) -> dict[str, Any]:
        """What rollback() needs to return to this moment: each layer's tier marks (ints), the
        scalars, the query sample, and the retriever's state_dict() where it is small
        (`small_state`: O(budget) per layer, e.g. selection caches), so a failed call costs
        nothing to guard."""
        r = self.retriever
        small = getattr(r, "small_state", False) and hasattr(r, "state_dict") and any(self.built)
        return {"layers": [t.mark() for t in self.cache.layers], "state": self.state_dict(),
                "prefill_stats": dict(self.prefill_stats), "sampler": self.sampler.mark(),
                "free": {layer: len(rows) for layer, rows in self._free_keys.items()},
                "retriever": r.state_dict() if small else None}

    def rollback(self, mark: dict[str, Any]) -> None:
        """Forget every token appended since mark(). Layers whose host tier grew since have
        their index rebuilt from the host tier (rebuild_indexes); the retriever's small state is
        then restored, so exact, tokenselect, recycled, hip and actqkv continue as if the failed
        call never ran. attention_graph and faiss, whose state grows with the context, are not
        snapshotted: where the failed call added rows, their index is rebuilt from the host
        tier's keys alone (attention_graph then loses what it learned from prefill queries)."""
        grew = [t.n_host > m["n_host"] for t, m in zip(self.cache.layers, mark["layers"], strict=True)]
        for t, m in zip(self.cache.layers, mark["layers"], strict=True):
            t.rollback(m)
        for store in (self._free_keys, self._free_buckets):
            for layer in list(store):
                if layer in mark["free"]:
                    store[layer].truncate(min(mark["free"][layer], len(store[layer])))
                else:
                    del store[layer]
        self.load_state_dict(mark["state"])
        self.prefill_stats = dict(mark["prefill_stats"])
        self.sampler.rollback(mark["sampler"])
        self._spaces.clear()  # device copies of selections made during the failed call
        self.rebuild_indexes([layer for layer, g in enumerate(grew) if g and layer not in self.attached])
        if mark["retriever"] is not None:
            self.retriever.load_state_dict(mark["retriever"])

    def bytes(self) -> dict[str, int]:
        return self.cache.bytes()

    def build_indexes(self) -> None:
        """Index every layer's host tier (once, after the first prefill)."""
        attach = getattr(self.retriever, "attach_host_tier", None)
        for layer in range(self.cfg.n_layers):
            if self.built[layer]:
                continue
            with self.timers("index_build"):
                if attach is not None and not self.position_free and attach(layer, self.cache[layer]):
                    self.attached.add(layer)  # it reads the tier's keys in place; no copy, no add()
                else:
                    self.retriever.build(layer, self.index_keys(layer), self._index_queries(layer))
            self.built[layer] = True
            self._free_keys.pop(layer, None)
            self._free_buckets.pop(layer, None)
        self.sampler.clear()

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

    def rebuild_indexes(self, layers: list[int] | None = None) -> None:
        """Build the retriever again from the host tier's keys for the built `layers` (default
        all built): what a restored or rolled-back session does before the retriever's own
        load_state_dict. Queries are not kept, so an index that learned from prefill queries
        is rebuilt from keys alone."""
        attach = getattr(self.retriever, "attach_host_tier", None)
        for layer in range(self.cfg.n_layers) if layers is None else layers:
            if not self.built[layer]:
                continue
            if attach is not None and not self.position_free and attach(layer, self.cache[layer]):
                self.attached.add(layer)  # reads the tier's keys in place, as build_indexes did
                continue
            self.attached.discard(layer)
            self.retriever.build(layer, self.index_keys(layer), None)  # position-free in extrapolate mode
            self._free_keys.pop(layer, None)  # that copy is only needed until the build
            self._free_buckets.pop(layer, None)

    def index_keys(self, layer: int) -> Tensor:
        """The keys [H_kv, N, D] a retriever indexes for this layer's host tier: as stored
        (after RoPE at true positions), or in extrapolate mode position-free (RoPE undone),
        so a search ranks keys by the logit they will have where they are read."""
        if not self.position_free:
            return self.cache[layer].host_keys_head_major()
        return self._position_free_host(layer).all().transpose(0, 1)

    def _index_queries(self, layer: int) -> Tensor | None:
        qs = self.sampler.sample(layer)  # [H_q, M, D]
        if qs is None or not self.position_free:
            return qs
        pos = self.sampler.sample_positions(layer)
        return self._search_queries(qs.transpose(0, 1), pos.to(qs.device)).transpose(0, 1).contiguous()

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        extrapolate = self.rcfg.position_mode == "extrapolate"
        if self.decoding and q.shape[0] == 1 and self.built[layer]:
            if extrapolate:
                return self._decode_extrapolate(layer, q, k, v, positions)
            return self._decode(layer, q, k, v, positions)
        if extrapolate:
            return self._prefill_extrapolate(layer, q, k, v, positions)
        return self._prefill(layer, q, k, v, positions)

    def append_rows(self, layer: int, k: Tensor, v: Tensor, positions: Tensor) -> None:
        """k/v [T, H_kv, D] (rotated keys) at positions [T] into the tiers and, once built, the
        index, as attend() appends them: for a replica replaying recorded rows."""
        self._append(layer, k, v, positions)

    def _append(self, layer: int, k: Tensor, v: Tensor, positions: Tensor) -> None:
        self.finite.see(k, v)
        ev = self.cache[layer].append(k, v, positions)
        if ev is not None and self.built[layer] and layer not in self.attached:
            with self.timers("index_add"):
                keys = self._position_free(ev.k, ev.positions) if self.position_free else ev.k
                self.retriever.add(layer, keys.transpose(0, 1).to("cpu"), ev.positions.to("cpu"))

    def _prefill(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """Exact positions: dense up to `prefill_dense_tokens` earlier tokens, sparse beyond."""
        tiers: LayerTiers = self.cache[layer]
        sparse = tiers.n_host > 0 and tiers.n_static + tiers.n_host > self.rcfg.prefill_dense_tokens
        if layer == 0:
            self.prefill_stats["sparse_chunks" if sparse else "dense_chunks"] += 1
        if sparse:
            with self.timers("prefill_sparse_attention"):
                out = self._prefill_sparse(tiers, q, k, v)
        else:
            with self.timers("prefill_attention"):
                out = self._prefill_dense(tiers, q, k, v)
        self.sampler.observe(layer, q, positions)
        self._append(layer, k, v, positions)
        return out

    def _prefill_dense(self, tiers: LayerTiers, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The chunk q, k, v [T, H, D] attends causally to itself, to the static tier and to the
        host tier streamed one chunk at a time (host_chunks), the partials merged as they come
        (running (out, lse) in fp32)."""
        out, lse = self.ops.attend(q, k, v, scale=self.scale, causal=True)
        out = out.float()  # [T, H_q, D] fp32: one rounding at the end, however many host chunks
        sk, sv, _ = tiers.static_kv()
        parts = chain([(sk, sv)] if sk.shape[0] else [], self._host_chunks(tiers))
        for pk, pv in parts:
            o, l = self.ops.attend(q, pk, pv, scale=self.scale)
            out, lse = self.ops.merge([out, o], [lse, l])
        self.prefill_stats["host_keys"] += tiers.n_host * self.cfg.n_kv_heads
        return out.to(q.dtype)

    def _host_chunks(self, tiers: LayerTiers) -> Iterator[tuple[Tensor, Tensor]]:
        if self.device.type == "cuda" and self._h2d_stream is None:
            self._h2d_stream = torch.cuda.Stream(self.device)
        return stream_host_chunks(tiers, self.device, self._h2d_stream)

    # ---- sparse prefill (exact positions, beyond prefill_dense_tokens) -----------------------

    def _prefill_sparse(self, tiers: LayerTiers, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The chunk attends causally to itself, to the static tier and to the host blocks
        selected for its mean query (true positions); its last query selects its own blocks,
        as a decode step would, since its output predicts the next token."""
        summary = tiers.block_summary(self.rcfg.prefill_block)
        sk, sv, _ = tiers.static_kv()
        ids = self._select_blocks(summary, q)  # [H_kv, k1]
        k1 = ids.shape[1]
        last = q.shape[0] > 1 and self.select_last_query
        if last:  # both selections in one gather (their union moves once)
            ids = torch.cat([ids, self._select_blocks(summary, q[-1:])], dim=1)
        gk, gv, valid = self._gather_rows(tiers, ids)
        out = self._attend_chunk(q, k, v, [sk], [sv], (gk[:k1], gv[:k1], valid[:, :k1]))
        if last:
            out[-1:] = self._attend_chunk(q[-1:], k, v, [sk], [sv], (gk[k1:], gv[k1:], valid[:, k1:]))
        return out

    def _select_blocks(self, summary: BlockSummary, q: Tensor) -> Tensor:
        """Host rows [H_kv, k] (CPU, -1 = pad) of the blocks whose mean key scores highest for
        the mean of queries q [T, H_q, D] (logits reduced over each GQA group by gqa_reduce),
        up to the prefill budget in tokens per KV head."""
        q_mean = q.float().mean(0)  # [H_q, D]
        scores = reference.score(q_mean, summary.means())  # [H_q, n_blocks]
        scores = reference.reduce_group(scores, self.cfg.n_kv_heads, self.rcfg.gqa_reduce)
        return top_block_rows(scores.to("cpu"), summary.n, summary.block, self.rcfg.sparse_prefill_budget)

    def _decode(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        tiers: LayerTiers = self.cache[layer]
        self._append(layer, k, v, positions)
        q1 = q[0]  # [H_q, D]
        space = self._row_space(layer, tiers)
        if space is None:
            with self.timers("static_attention"):
                sk, sv, _ = tiers.static_kv()
                o_s, l_s = self.ops.decode_attend(q1, sk, sv, scale=self.scale)
            if tiers.n_host == 0 or self.rcfg.budget == 0:
                return o_s[None]
        with self.timers("search"):
            sel = self.retriever.select(layer, q1, self.rcfg.budget)
        self.scanned += sel.scanned
        if space is not None:
            # the static tier, the selection and its cached stable part in one launch
            from kvloft.kernels.sparse_decode import gather_attend_table

            with self.timers("attention"):
                ids = space.ids(sel.ids.to(q1.device), sel.stable, sel.n_fresh, tiers.n_static)
                out, _ = gather_attend_table(q1, tiers.k, tiers.v, ids, space.tables, space.slot_rows,
                                             scale=self.scale)
            return out[None]
        with self.timers("retrieved_attention"):
            o_r, l_r = self._retrieved(tiers, q1, sel.ids)
            out, _ = self.ops.merge([o_s, o_r], [l_s, l_r])
        return out[None]

    def _row_space(self, layer: int, tiers: LayerTiers) -> LayerRowSpace | None:
        """The layer's one-launch decode rows (runtime/rowspace.py), or None where they do
        not apply: torch kernels, a host tier not pinned (the CPU) or spilled to disk, an
        empty host tier or budget, or a retriever that attends on the host."""
        if (not self.one_launch or self.ops.name != "triton" or tiers.n_host == 0 or self.rcfg.budget == 0
                or getattr(self.retriever, "attend_on_host", False)):
            return None
        hk, hv = tiers.host_k, tiers.host_v
        if not (hk.pin and hv.pin) or hk.n_spilled or hv.n_spilled:
            return None
        space = self._spaces.get(layer)
        if space is None or space.tiers is not tiers:
            rows = self.rcfg.budget if self.cache_selections else 0
            space = self._spaces[layer] = LayerRowSpace(tiers, self.device, rows)
        return space

    def _retrieved(self, tiers: LayerTiers, q: Tensor, ids: Tensor,
                   rot_delta: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Attention of q [H_q, D] over selected host rows (ids [H_kv, k] or [k], -1 = pad).

        rot_delta: optional [H_kv, k] or [k] int64, aligned with ids: rotate each selected
        key by that many positions first (extrapolation mode).
        """
        rot = {}
        if rot_delta is not None:
            rot = {"rot_delta": rot_delta.to(q.device), "inv_freq": self.inv_freq}
        if getattr(self.retriever, "attend_on_host", False) and rot_delta is None and self.device.type != "cpu":
            # RetrievalAttention: attention over the selected rows runs on the CPU next to the
            # data; only q goes down and (out, lse) comes back (2 * H_q * (D + 1) numbers)
            from kvloft.index.attention_graph import cpu_partial_attention

            out, lse = cpu_partial_attention(q.to("cpu"), tiers.host_k, tiers.host_v, ids.to("cpu"),
                                             scale=self.scale)
            return out.to(q.device, non_blocking=True), lse.to(q.device, non_blocking=True)
        host_k, host_v = tiers.host_k, tiers.host_v
        one_chunk = len(host_k.chunks) == 1
        zero_copy = self.ops.name == "triton" and host_k.pin
        if one_chunk and (self.device.type == "cpu" or zero_copy):
            # one host chunk: the kernel gathers straight from it (on CUDA: reading pinned
            # host memory through unified addressing, only the selected rows cross PCIe)
            kc, vc = host_k.chunks[0], host_v.chunks[0]
            return self.ops.gather_attend(q, kc, vc, ids.to(q.device), scale=self.scale, **rot)
        if zero_copy and host_k.n_spilled == 0 and host_v.n_spilled == 0:
            # several pinned chunks: the kernel finds each row's chunk through a table of
            # their addresses and reads it in place, as above
            from kvloft.kernels.sparse_decode import gather_attend_chunks

            tables = host_k.pointer_table(self.device), host_v.pointer_table(self.device)
            return gather_attend_chunks(q, host_k.chunks, host_v.chunks, ids.to(q.device), scale=self.scale,
                                        tables=tables, **rot)
        gk, gv, valid = self._gather_rows(tiers, ids)
        local = torch.arange(valid.shape[1])[None].expand_as(valid)
        local = torch.where(valid, local, -1).to(self.device)
        return self.ops.gather_attend(q, gk, gv, local, scale=self.scale, **rot)

    # ---- extrapolation mode (positions remapped; see the module docstring) -----------------

    def _position_free(self, k: Tensor, positions: Tensor) -> Tensor:
        """Keys k [n, H_kv, D] stored at positions [n] with their RoPE undone."""
        return reference.rotate_keys(k, -positions.to(k.device), self.inv_freq)

    def _search_queries(self, q: Tensor, positions: Tensor) -> Tensor:
        """Queries q [T, H_q, D] at positions [T] as seen from `n_window` positions after a
        position-free key: q'.k0 is the logit of the key read at distance n_window, where the
        retrieved keys start. Rank keys by it, not by their true distance: beyond the trained
        length the true-distance logit is noise, and RoPE's decay already favours near keys."""
        return reference.rotate_keys(q, self.rcfg.n_window - positions.to(q.device), self.inv_freq)

    def _position_free_host(self, layer: int) -> ChunkedRows:
        """Position-free copy of the host keys until the index is built, synced lazily (host
        memory, pinned on CUDA so prefill selection streams it down asynchronously). With
        max_similar set, each new row's SimHash buckets are kept alongside (computed once)."""
        tiers: LayerTiers = self.cache[layer]
        if layer not in self._free_keys:
            pin = self.device.type == "cuda"
            self._free_keys[layer] = ChunkedRows(tiers.host_k.row_shape, tiers.host_k.dtype,
                                                 tiers.host_k.chunk_rows, "cpu", pin=pin)
            if self.rcfg.max_similar:
                self._free_buckets[layer] = ChunkedRows((self.cfg.n_kv_heads,), torch.int32,
                                                        tiers.host_k.chunk_rows, "cpu", pin=pin)
        free = self._free_keys[layer]
        if len(free) < tiers.n_host:
            rows = torch.arange(len(free), tiers.n_host)
            with torch.inference_mode():  # the copy may be made inside the model's forward or not
                keys = self._position_free(tiers.host_k.rows(rows), tiers.host_pos.rows(rows))
                free.append(keys)
                if layer in self._free_buckets:
                    buckets = similarity_buckets(keys, self.rcfg.similar_bits)  # [H_kv, n]
                    self._free_buckets[layer].append(buckets.transpose(0, 1).to(torch.int32))
        return free

    def _window_start(self, tiers: LayerTiers, after: Tensor) -> Tensor:
        """w0: true position of the oldest ring key, or `after` (0-dim) if the ring is empty."""
        ring_pos = tiers.static_kv()[2][tiers.sink_fill :]
        return ring_pos.min() if ring_pos.numel() else after

    def _host_positions(self, tiers: LayerTiers, ids: Tensor) -> Tensor:
        """True positions of host rows ids ([H_kv, k] or [k], -1 = pad -> -1), on ids' device."""
        n = tiers.n_host
        chunk = tiers.host_pos.chunk_rows
        first = int(tiers.host_pos.chunks[0][0])
        last = int(tiers.host_pos.chunks[(n - 1) // chunk][(n - 1) % chunk])
        if last - first == n - 1:  # consecutive positions (a session's case): no gather, no sync
            pos = ids + first
        else:
            pos = tiers.host_pos.rows(ids.clamp_min(0).to("cpu")).to(ids.device)
        return torch.where(ids >= 0, pos, -1)

    def _remap(self, tiers: LayerTiers, ids: Tensor, w0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Sink keys rotated to their new positions, their values, and the retrieved keys' deltas.

        ids: [H_kv, k] / [k] host rows (may be empty). Returns (sink_k [n_s, H_kv, D],
        sink_v [n_s, H_kv, D], ret_delta shaped like ids).
        """
        sk, sv, spos = tiers.static_kv()
        ns = tiers.sink_fill
        ret_pos = self._host_positions(tiers, ids) if ids.numel() else ids.to(self.device)
        sink_delta, ret_delta = remap_deltas(w0, spos[:ns], ret_pos.to(self.device))
        return reference.rotate_keys(sk[:ns], sink_delta, self.inv_freq), sv[:ns], ret_delta

    def _decode_extrapolate(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """One decode token: window at true positions; sink and retrieved keys remapped."""
        tiers: LayerTiers = self.cache[layer]
        self._append(layer, k, v, positions)
        q1 = q[0]  # [H_q, D]
        ids = torch.empty((self.cfg.n_kv_heads, 0), dtype=torch.int64, device=self.device)
        if tiers.n_host and self.rcfg.budget:
            with self.timers("search"):
                q_search = self._search_queries(q, positions)[0]
                n_pick, radius = self._neighbor_plan(tiers.n_host)
                sel = self.retriever.select(layer, q_search, n_pick)
                ids = widen_selection(sel.ids, radius, tiers.n_host) if radius else sel.ids
            self.scanned += sel.scanned
        with self.timers("static_attention"):
            sk, sv, _ = tiers.static_kv()
            w0 = self._window_start(tiers, positions[-1] + 1)
            sink_k, sink_v, ret_delta = self._remap(tiers, ids, w0)
            o_w, l_w = self.ops.decode_attend(q1, sk[tiers.sink_fill :], sv[tiers.sink_fill :], scale=self.scale)
            o_s, l_s = self.ops.decode_attend(q1, sink_k, sink_v, scale=self.scale)
        outs, lses = [o_w, o_s], [l_w, l_s]
        if ids.numel():
            with self.timers("retrieved_attention"):
                o_r, l_r = self._retrieved(tiers, q1, ids, rot_delta=ret_delta)
            outs.append(o_r)
            lses.append(l_r)
        out, _ = self.ops.merge(outs, lses)
        return out[None]

    def _neighbor_plan(self, n_host: int) -> tuple[int, int]:
        """(host keys to pick per KV head, radius to widen each by): budget // (2r + 1) keys
        with r = RetrievalConfig.neighbor_radius (smaller if the budget holds fewer than
        2r + 1 keys), so the widened selection reads at most `budget` keys; a budget
        covering the host tier picks all of it, unwidened."""
        budget = self.rcfg.budget
        if budget >= n_host:
            return budget, 0
        radius = min(self.rcfg.neighbor_radius, (budget - 1) // 2)
        return budget // (2 * radius + 1), radius

    def _prefill_select(self, layer: int, tiers: LayerTiers, q: Tensor, positions: Tensor) -> Tensor:
        """Host rows [H_kv, k] (or [k]; -1 = pad) for prefill queries q [T, H_q, D] at positions
        [T]: the top keys per KV head for their mean search query (summed logits, up to a
        factor T), widened by their neighbours (_neighbor_plan, widen_selection)."""
        return self._prefill_selections(layer, tiers, q, positions, [(0, q.shape[0])])[0]

    def _prefill_selections(self, layer: int, tiers: LayerTiers, q: Tensor, positions: Tensor,
                            ranges: list[tuple[int, int]]) -> list[Tensor]:
        """_prefill_select for the queries of each range [a, b) of q, in one pass."""
        n_pick, radius = self._neighbor_plan(tiers.n_host)
        sq = self._search_queries(q, positions).float()  # [T, H_q, D]
        q_means = torch.stack([sq[a:b].mean(0) for a, b in ranges])  # [R, H_q, D]
        if self.built[layer]:
            tops = [self.retriever.select(layer, qm.to(q.dtype), n_pick).ids for qm in q_means]
        else:
            tops = list(self._prefill_top(layer, q_means, n_pick).unbind(0))
        return [widen_selection(ids, radius, tiers.n_host) if radius else ids for ids in tops]

    def _prefill_top(self, layer: int, q_means: Tensor, k: int) -> Tensor:
        """The top k host rows [R, H_kv, k] (CPU; -1 = pad) per KV head for each of R mean
        search queries q_means [R, H_q, D] (fp32), by exact scores over the position-free host
        keys, reduced over each GQA group, with near-identical keys capped (max_similar).

        One pass over the keys for all R queries, on the compute device: on CUDA the pinned
        host chunks stream down asynchronously (a chunk's copy overlaps the previous chunk's
        scores); the buckets of the cap were computed once, as the rows arrived."""
        hkv = self.cfg.n_kv_heads
        n_host = self.cache[layer].n_host
        r = q_means.shape[0]
        if k >= n_host:  # a budget covering the host tier takes all of it (no cap), as the retriever does
            return torch.arange(n_host)[None, None].expand(r, hkv, -1).contiguous()
        free = self._position_free_host(layer)
        dev = self.device
        qg = q_means.to(dev).view(r, hkv, -1, q_means.shape[-1])  # [R, H_kv, g, D]
        parts = []
        for _, chunk in free.iter_chunks():
            keys = chunk.to(dev, non_blocking=True).float()  # [n, H_kv, D]
            s = torch.einsum("rhgd,nhd->rhgn", qg, keys)
            parts.append(s.amax(2) if self.rcfg.gqa_reduce == "max" else s.sum(2))
        scores = torch.cat(parts, dim=-1).view(r * hkv, n_host)  # [R * H_kv, N]
        if self.rcfg.max_similar:  # repeated text: cap near-identical keys (index/diversity.py)
            buckets = torch.cat([c.to(dev, non_blocking=True) for _, c in self._free_buckets[layer].iter_chunks()])
            buckets = buckets.t().long()[None].expand(r, -1, -1).reshape(r * hkv, n_host)
            ids = capped_topk(scores, buckets, k, self.rcfg.max_similar)
        else:
            ids = torch.topk(scores, min(k, n_host), dim=-1).indices
        return ids.view(r, hkv, -1).to("cpu")

    def _prefill_extrapolate(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """A prefill chunk: itself causally, the window, the remapped sink and top host keys.

        The feed's tail selects for itself (tail_blocks): a chunk-mean selection dilutes a
        question at the end of a prompt among the hundreds of tokens before it. The feed's
        last query selects alone, as a decode step would: its output predicts the next token.
        All selections of a chunk are made in one pass over the host keys.
        """
        tiers: LayerTiers = self.cache[layer]
        with self.timers("prefill_attention"):
            w0 = self._window_start(tiers, positions[0])
            ids = torch.empty((self.cfg.n_kv_heads, 0), dtype=torch.int64)
            tails: list[tuple[int, int]] = []
            tail_ids: list[Tensor] = []
            if tiers.n_host and self.rcfg.budget:
                tails = self.tail_blocks(q.shape[0])
                ids, *tail_ids = self._prefill_selections(layer, tiers, q, positions, [(0, q.shape[0]), *tails])
            out = self._attend_remapped(tiers, q, k, v, ids, w0)
            for (a, b), ids_ab in zip(tails, tail_ids, strict=True):  # queries a..b-1, causal over k[:b]
                out[a:b] = self._attend_remapped(tiers, q[a:b], k[:b], v[:b], ids_ab, w0)
        self.sampler.observe(layer, q, positions)
        self._append(layer, k, v, positions)
        return out

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

    def _attend_remapped(self, tiers: LayerTiers, q: Tensor, k: Tensor, v: Tensor, ids: Tensor,
                         w0: Tensor) -> Tensor:
        """The last Tq queries q [Tq, H_q, D] of the chunk k, v [T, H_kv, D] (causal) over the
        window, the sink and host rows ids ([H_kv, k] / [k]), remapped before w0."""
        sk, sv, _ = tiers.static_kv()
        ns = tiers.sink_fill
        sink_k, sink_v, ret_delta = self._remap(tiers, ids, w0)
        gathered = None
        if ids.numel():
            gk, gv, valid = self._gather_rows(tiers, ids)
            delta = (ret_delta if ret_delta.dim() == 2 else ret_delta[None].expand(valid.shape[0], -1))
            gathered = (reference.rotate_keys(gk, delta.to(self.device), self.inv_freq), gv, valid)
        return self._attend_chunk(q, k, v, [sink_k, sk[ns:]], [sink_v, sv[ns:]], gathered)

    def _attend_chunk(self, q: Tensor, k: Tensor, v: Tensor, keys: list[Tensor], vals: list[Tensor],
                      gathered: tuple[Tensor, Tensor, Tensor] | None) -> Tensor:
        """The last Tq queries q [Tq, H_q, D] of the chunk k, v [T, H_kv, D] (causal) over
        `keys`/`vals` (each [n, H_kv, D], seen by every query) and gathered host rows
        (gk, gv [n, H_kv, D], valid [H_kv, n]; see _gather_rows) or None.

        One attention over [*keys, gathered, chunk] (causal: the queries are the last Tq
        keys); gathered rows with per-head padding go through a per-head pass, merged by lse.
        """
        padded = None
        if gathered is not None and gathered[2].shape[1]:
            gk, gv, valid = gathered
            if bool(valid.all()):
                keys, vals = [*keys, gk], [*vals, gv]
            else:
                padded = self._attend_padded(q, gk, gv, valid)
        out, lse = self.ops.attend(q, torch.cat([*keys, k]), torch.cat([*vals, v]), scale=self.scale, causal=True)
        if padded is not None:
            out, _ = self.ops.merge([out, padded[0]], [lse, padded[1]])
        return out

    def _gather_rows(self, tiers: LayerTiers, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Host rows ids [H_kv, k] / [k] (-1 = pad): k, v [k, H_kv, D] on the compute device
        (pads hold some host row) and valid [H_kv, k] (CPU). The union of the heads' rows is
        gathered as whole tokens (DESIGN.md, Tiers), then split per head on the device.
        Counted in prefill_stats["host_keys"] when prefilling."""
        hkv = self.cfg.n_kv_heads
        per_head = (ids if ids.dim() == 2 else ids[None].expand(hkv, -1)).to("cpu")
        valid = per_head >= 0
        union = torch.unique(per_head[valid])  # [n] ascending: each token moves once, all its heads
        if not union.numel():
            union = torch.zeros(1, dtype=torch.int64)  # nothing valid: pads read row 0
        elif int(union[-1]) >= tiers.n_host:
            raise IndexError(f"host row ids must lie in [0, {tiers.n_host}), got {int(union[-1])}")
        uk = gather_token_rows(tiers.host_k, union).to(self.device)  # [n, H_kv, D]
        uv = gather_token_rows(tiers.host_v, union).to(self.device)
        local = torch.searchsorted(union, per_head.clamp_min(0)).clamp_max(union.numel() - 1)
        local, heads = local.to(self.device), torch.arange(hkv, device=self.device)[:, None]
        gk, gv = uk[local, heads].transpose(0, 1), uv[local, heads].transpose(0, 1)  # [k, H_kv, D]
        if not self.decoding:
            self.prefill_stats["host_keys"] += int(valid.sum())
        return gk, gv, valid

    def _attend_padded(self, q: Tensor, gk: Tensor, gv: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """q [T, H_q, D] over gk, gv [k, H_kv, D], KV head h over its valid [H_kv, k] keys only."""
        g = self.cfg.group_size
        outs, lses = [], []
        for h in range(self.cfg.n_kv_heads):
            m = valid[h].to(self.device)
            o, lse = self.ops.attend(q[:, h * g : (h + 1) * g], gk[m, h : h + 1], gv[m, h : h + 1], scale=self.scale)
            outs.append(o)
            lses.append(lse)
        return torch.cat(outs, dim=1), torch.cat(lses, dim=1)

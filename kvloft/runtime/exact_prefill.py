"""Offloaded prefill at exact positions: a chunk attends densely or to selected host blocks.

A prompt goes through in chunks (RuntimeConfig.prefill_chunk); tokens
leaving the window go to the host tier as the chunk is appended (on CUDA an asynchronous
copy on the cache's copy stream, tiers/layer_tiers.py), so the device never holds more than
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
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from kvloft.kernels import reference
from kvloft.runtime.chunk_attention import attend_chunk
from kvloft.runtime.context import AttentionContext
from kvloft.runtime.host_rows import InPlaceRows
from kvloft.runtime.prefill import stream_host_chunks, top_block_rows
from kvloft.tiers.block_summary import BlockSummary
from kvloft.tiers.kvcache import LayerTiers


class ExactPrefill:
    def __init__(self, ctx: AttentionContext, rows: InPlaceRows) -> None:
        self.ctx, self.rows = ctx, rows
        self._h2d_stream = None  # CUDA: the side stream host chunks stream down on (made on first use)

    def attend(self, layer: int, tiers: LayerTiers, q: Tensor, k: Tensor, v: Tensor, select_last: bool) -> Tensor:
        """The chunk q [T, H_q, D], k, v [T, H_kv, D] before it is appended: dense up to
        `prefill_dense_tokens` earlier tokens, sparse beyond (select_last: the chunk's last
        query selects its own blocks)."""
        ctx = self.ctx
        sparse = tiers.n_host > 0 and tiers.n_static + tiers.n_host > ctx.rcfg.prefill_dense_tokens
        if layer == 0:
            ctx.prefill_stats["sparse_chunks" if sparse else "dense_chunks"] += 1
        if sparse:
            with ctx.timers("prefill_sparse_attention"):
                return self.sparse(tiers, q, k, v, select_last)
        with ctx.timers("prefill_attention"):
            return self.dense(tiers, q, k, v)

    def dense(self, tiers: LayerTiers, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The chunk q, k, v [T, H, D] attends causally to itself and the static tier (one call),
        then to the host tier streamed one chunk at a time (host_chunks), the partials merged
        as they come (running (out, lse) in fp32)."""
        ops, scale = self.ctx.ops, self.ctx.scale
        sk, sv, _ = tiers.static_kv()
        if sk.shape[0]:  # the static tier precedes the chunk: one causal call (lower-right) over both
            k, v = torch.cat([sk, k]), torch.cat([sv, v])
        out, lse = ops.attend(q, k, v, scale=scale, causal=True)
        out = out.float()  # [T, H_q, D] fp32: one rounding at the end, however many host chunks
        for pk, pv in self._host_chunks(tiers):
            o, l = ops.attend(q, pk, pv, scale=scale)
            out, lse = ops.merge([out, o], [lse, l])
        self.ctx.prefill_stats["host_keys"] += tiers.n_host * self.ctx.cfg.n_kv_heads
        return out.to(q.dtype)

    def _host_chunks(self, tiers: LayerTiers) -> Iterator[tuple[Tensor, Tensor]]:
        device = self.ctx.device
        if device.type == "cuda" and self._h2d_stream is None:
            self._h2d_stream = torch.cuda.Stream(device)
        return stream_host_chunks(tiers, device, self._h2d_stream)

    def sparse(self, tiers: LayerTiers, q: Tensor, k: Tensor, v: Tensor, select_last: bool) -> Tensor:
        """The chunk attends causally to itself, to the static tier and to the host blocks
        selected for its mean query (true positions); with select_last its last query selects
        its own blocks, as a decode step would, since its output predicts the next token."""
        ops, scale = self.ctx.ops, self.ctx.scale
        summary = tiers.block_summary(self.ctx.rcfg.prefill_block)
        sk, sv, _ = tiers.static_kv()
        ids = self._select_blocks(summary, q)  # [H_kv, k1]
        k1 = ids.shape[1]
        last = q.shape[0] > 1 and select_last
        if last:  # both selections in one gather (their union moves once)
            ids = torch.cat([ids, self._select_blocks(summary, q[-1:])], dim=1)
        gk, gv, valid = self.rows.gather(tiers, ids)
        out = attend_chunk(ops, scale, q, k, v, [sk], [sv], (gk[:k1], gv[:k1], valid[:, :k1]))
        if last:
            out[-1:] = attend_chunk(ops, scale, q[-1:], k, v, [sk], [sv], (gk[k1:], gv[k1:], valid[:, k1:]))
        return out

    def _select_blocks(self, summary: BlockSummary, q: Tensor) -> Tensor:
        """Host rows [H_kv, k] (CPU, -1 = pad) of the blocks whose mean key scores highest for
        the mean of queries q [T, H_q, D] (logits reduced over each GQA group by gqa_reduce),
        up to the prefill budget in tokens per KV head."""
        rcfg = self.ctx.rcfg
        q_mean = q.mean(0, dtype=torch.float32)  # [H_q, D], without an fp32 copy of the chunk
        scores = reference.score(q_mean, summary.means())  # [H_q, n_blocks]
        scores = reference.reduce_group(scores, self.ctx.cfg.n_kv_heads, rcfg.gqa_reduce)
        return top_block_rows(scores.to("cpu"), summary.n, summary.block, rcfg.sparse_prefill_budget)

"""The tiers of one layer (LayerTiers; every layer's: TieredKVCache, tiers/kvcache.py).

Keys are stored after RoPE and values as is, token-major `[T, H_kv, D]`:

- static tier, on the compute device: the first `n_sink` tokens and a ring of the last
  `n_window`, in one buffer `[n_sink + n_window + evict_batch, H_kv, D]` (slots
  0..n_sink-1 sink, the rest the ring). The filled slots are always one contiguous
  prefix, so static attention is one pass over `[:n_static]` (keys are rotated, so slot
  order is free). With `evict_batch` = B > 0, decode moves tokens to the host tier B at a
  time: the ring grows to n_window + B tokens, then its oldest B go down in one copy and
  the rest move to the front of the ring (a device copy of n_window rows). Between those
  steps nothing is copied down, so nothing waits for a copy: one token per step meant a
  copy, an event and a host wait on it in every layer of every step. The ring then holds
  n_window + 1 .. n_window + B tokens, all attended exactly. B = 0: one token per step,
  the ring wraps.
- host tier: every token older than the window, appended in order to chunked rows
  (pinned when CUDA is present), with its position; grown by chunks, never copied whole;
  model-dtype or 8-bit rows (tiers/host_store.py). On CUDA the copy down is asynchronous:
  issued on the cache's copy stream (after the compute stream's work so far) into pinned
  memory, with an event recorded behind it. Every read of the host rows waits for that event:
  `host_k` / `host_v` / `host_pos` synchronize the host on it (a no-op once it passed, and it
  has by the time the next prefill chunk reaches this layer), `host_chunk_pairs(stream)` makes
  a CUDA stream wait on it instead (no host sync). The evicted device rows are kept alive for
  the copy (record_stream). With a disk tier the copy stays synchronous: a spill reads the
  chunk on the host right away.
- block summary (sparse prefill, `block_summary`): the mean key of every `block` host
  rows per KV head, on the compute device, made on first use and then updated from the
  evicted rows as they leave the window (no host read).
- marks and rollback: tiers/ring_marks.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kvloft.config import ModelConfig
from kvloft.tiers import ring_marks
from kvloft.tiers.block_summary import BlockSummary
from kvloft.tiers.chunked import ChunkedRows, SpillPolicy
from kvloft.tiers.host_store import host_rows, packed_chunk_parts
from kvloft.tiers.packed import PackedRows

__all__ = ["Evicted", "LayerTiers"]


@dataclass
class Evicted:
    """Tokens that just left the window for the host tier (for retriever.add)."""

    k: Tensor  # [n, H_kv, D]
    v: Tensor  # [n, H_kv, D]
    positions: Tensor  # [n] int64
    first_row: int  # host-tier row of k[0]


class LayerTiers:
    """Static tier (sink + window ring) and host tier of one layer.

    copy_stream: a CUDA stream for the asynchronous copy of evicted rows to the (pinned)
    host tier; None = synchronous copies (CPU, or a disk tier).
    """

    def __init__(self, cfg: ModelConfig, n_sink: int, n_window: int, host_chunk: int,
                 device: torch.device, dtype: torch.dtype, pin: bool,
                 spill: dict[str, SpillPolicy] | None = None, copy_stream=None, evict_batch: int = 0,
                 host_dtype: str | None = None) -> None:
        hkv, d = cfg.n_kv_heads, cfg.head_dim
        size = n_sink + n_window + evict_batch
        self.n_sink, self.n_window, self.evict_batch = n_sink, n_window, evict_batch
        self.ring_cap = n_window + evict_batch
        self.k = torch.zeros(size, hkv, d, dtype=dtype, device=device)
        self.v = torch.zeros(size, hkv, d, dtype=dtype, device=device)
        self.pos = torch.full((size,), -1, dtype=torch.int64, device=device)
        self.sink_fill = 0
        self.ring_fill = 0
        self.ring_head = 0  # ring slot (relative) of the oldest token
        spill = spill or {}
        self.host_dtype = host_dtype
        self._host_k = host_rows((hkv, d), dtype, host_dtype, host_chunk, pin, spill, "k", device)
        self._host_v = host_rows((hkv, d), dtype, host_dtype, host_chunk, pin, spill, "v", device)
        self._host_pos = ChunkedRows((), torch.int64, host_chunk, "cpu", pin, spill.get("pos"))
        async_ok = copy_stream is not None and pin and not spill and torch.device(device).type == "cuda"
        self._copy_stream = copy_stream if async_ok else None
        self._d2h_done = None  # torch.cuda.Event behind the last copy down, until waited on
        self.summary: BlockSummary | None = None

    # ---- host tier reads: each waits for the copy down in flight -------------------------

    @property
    def host_k(self) -> ChunkedRows | PackedRows:
        """Host keys, rows [H_kv, D] (the copy down in flight waited for on the host); a
        PackedRows with an 8-bit host_dtype (its reads dequantize)."""
        self.wait_host()
        return self._host_k

    @property
    def host_v(self) -> ChunkedRows | PackedRows:
        self.wait_host()
        return self._host_v

    @property
    def host_pos(self) -> ChunkedRows:
        self.wait_host()
        return self._host_pos

    def wait_host(self, stream=None) -> None:
        """Wait for the copy of evicted rows to the host tier: on the host (stream None), or
        make the CUDA `stream` wait for it (its later work may read the rows; no host sync)."""
        ev = self._d2h_done
        if ev is None:
            return
        if stream is None:
            ev.synchronize()
            self._d2h_done = None
        else:
            stream.wait_event(ev)

    def host_chunk_pairs(self, stream=None) -> Iterator[tuple[int, Tensor, Tensor]]:
        """(first row, keys, values) of each host chunk, the filled part [m, H_kv, D], in order.

        stream: the CUDA stream that will read them (it waits for the copy down in flight);
        None = wait on the host."""
        self.wait_host(stream)
        for (start, kc), (_, vc) in zip(self._host_k.iter_chunks(), self._host_v.iter_chunks()):
            yield start, kc, vc

    def host_chunk_parts(self, stream=None) -> Iterator[tuple[int, tuple[Tensor, ...]]]:
        """(first row, the stored tensors of each host chunk's filled part), in order: (keys,
        values) [m, H_kv, D], or with an 8-bit host tier (key codes, key scales [m, H_kv], value
        codes, value scales) as stored, for a copy of half the bytes (kernels/rowquant.py
        dequantize_rows makes rows of them). stream: as host_chunk_pairs."""
        if self.host_dtype is None:
            for start, kc, vc in self.host_chunk_pairs(stream):
                yield start, (kc, vc)
            return
        self.wait_host(stream)
        yield from packed_chunk_parts(self._host_k, self._host_v)

    @property
    def n_static(self) -> int:
        return self.sink_fill + self.ring_fill

    def ring_state(self) -> dict[str, int]:
        """The static tier's fill state (with the buffers k, v, pos it is the whole static tier)."""
        return {"sink_fill": self.sink_fill, "ring_fill": self.ring_fill, "ring_head": self.ring_head}

    def mark(self) -> dict[str, Any]:
        """What rollback() needs to return to this moment (a few ints and the block summary's
        open sum; no copy of the tiers: tiers/ring_marks.py)."""
        return ring_marks.mark(self)

    def rollback(self, mark: dict[str, Any]) -> None:
        """Forget every token appended since mark(), bit for bit (tiers/ring_marks.py; with an
        8-bit host tier, rows that had gone down come back dequantized)."""
        ring_marks.rollback(self, mark)

    def set_ring_state(self, sink_fill: int, ring_fill: int, ring_head: int) -> None:
        """Restore ring_state(); ValueError if it does not describe this tier (sizes, order)."""
        ring_marks.check_ring_state(self, sink_fill, ring_fill, ring_head)
        self.sink_fill, self.ring_fill, self.ring_head = sink_fill, ring_fill, ring_head

    @property
    def n_host(self) -> int:
        return len(self._host_k)

    def static_kv(self) -> tuple[Tensor, Tensor, Tensor]:
        """Filled static slots: k, v [n_static, H_kv, D], positions [n_static] (a view)."""
        n = self.n_sink + self.ring_fill if self.sink_fill == self.n_sink else self.sink_fill
        return self.k[:n], self.v[:n], self.pos[:n]

    def append(self, k: Tensor, v: Tensor, pos: Tensor) -> Evicted | None:
        """Add T tokens (k, v [T, H_kv, D], pos [T]); returns what moved to the host tier."""
        take = min(k.shape[0], self.n_sink - self.sink_fill)
        if take:
            s = slice(self.sink_fill, self.sink_fill + take)
            self.k[s], self.v[s], self.pos[s] = k[:take], v[:take], pos[:take]
            self.sink_fill += take
        if take == k.shape[0]:
            return None
        k, v, pos = k[take:], v[take:], pos[take:]
        if k.shape[0] == 1:  # a decode token: room first (what moves down), then the token
            ev = self.make_room()
            self.put(k[0], v[0], pos[0])
            return ev
        return self._push_many(k, v, pos)

    # ---- one decode token in two halves: make_room (before the step), put (in the layer) -----

    def make_room(self) -> Evicted | None:
        """Room for the next decode token, made before the token exists: the rows its append
        would move to the host tier (the oldest ring token where the ring is full; the oldest
        evict_batch ones where the batched ring is) move now, and the slot the token will take
        is free (next_slot). The rows are known before the step, so a step's plan phase can move
        them down (and into the index) before any layer runs; the layer then only writes its
        token (put). Returns the rows moved down, or None.

        Between make_room and put the ring holds one token fewer (with evict_batch = 0 its head
        has moved on: the free slot is the old head); mark()/rollback() read that state as any
        other (the moved rows are the host tier's newest)."""
        if self.sink_fill < self.n_sink:
            return None
        a = self.n_sink
        if self.evict_batch:
            if self.ring_fill < self.ring_cap:
                return None
            # the ring (ring_head 0, a prefix) is full: its oldest B go down, the rest move to the front
            b = self.evict_batch
            ev = Evicted(self.k[a : a + b].clone(), self.v[a : a + b].clone(), self.pos[a : a + b].clone(),
                         self.n_host)
            self._to_host(ev)
            rest = self.ring_fill - b
            for buf in (self.k, self.v, self.pos):
                buf[a : a + rest] = buf[a + b : a + b + rest].clone()  # overlapping ranges: copy first
            self.ring_fill = rest
            return ev
        if self.ring_fill < self.n_window:
            return None
        slot = a + self.ring_head  # the oldest ring token goes to the host; its slot is the next one
        ev = Evicted(self.k[slot : slot + 1].clone(), self.v[slot : slot + 1].clone(),
                     self.pos[slot : slot + 1].clone(), self.n_host)
        self._to_host(ev)
        self.ring_head = (self.ring_head + 1) % self.n_window
        self.ring_fill -= 1
        return ev

    def next_slot(self) -> int:
        """The static slot the next decode token goes to (after make_room)."""
        if self.sink_fill < self.n_sink:
            return self.sink_fill
        if self.ring_fill >= self.ring_cap:
            raise RuntimeError("the ring is full: make_room() first (it moves the oldest rows down)")
        return self.n_sink + (self.ring_head + self.ring_fill) % self.ring_cap

    def put(self, k: Tensor, v: Tensor, pos: Tensor) -> None:
        """One decode token (k, v [H_kv, D], pos a 0-dim int64) into next_slot(), after make_room."""
        slot = self.next_slot()
        self.k[slot], self.v[slot], self.pos[slot] = k, v, pos
        self.count_put()

    def count_put(self) -> None:
        """Count a token written into next_slot() (by put, or by a kernel that wrote it there)."""
        if self.sink_fill < self.n_sink:
            self.sink_fill += 1
        else:
            self.ring_fill += 1

    def _push_many(self, k: Tensor, v: Tensor, pos: Tensor) -> Evicted | None:
        # ring contents in age order, then the new tokens; the last n_window stay
        order = (self.ring_head + torch.arange(self.ring_fill)) % self.ring_cap + self.n_sink
        order = order.to(self.k.device)
        all_k = torch.cat([self.k[order], k])
        all_v = torch.cat([self.v[order], v])
        all_p = torch.cat([self.pos[order], pos.to(self.pos.device)])
        n_out = max(0, all_k.shape[0] - self.n_window)
        ev = None
        if n_out:
            ev = Evicted(all_k[:n_out], all_v[:n_out], all_p[:n_out], self.n_host)
            self._to_host(ev)
        keep = slice(self.n_sink, self.n_sink + all_k.shape[0] - n_out)
        self.k[keep], self.v[keep], self.pos[keep] = all_k[n_out:], all_v[n_out:], all_p[n_out:]
        self.ring_fill, self.ring_head = all_k.shape[0] - n_out, 0
        return ev

    def _to_host(self, ev: Evicted) -> None:
        if self.summary is not None and self.summary.n == ev.first_row:
            self.summary.add(ev.k)
        stores = ((self._host_k, ev.k), (self._host_v, ev.v), (self._host_pos, ev.positions))
        if self._copy_stream is None:
            for store, rows in stores:
                store.append(rows.to("cpu"))
            return
        copy, compute = self._copy_stream, torch.cuda.current_stream(ev.k.device)
        copy.wait_stream(compute)  # the evicted rows are computed before they are read
        with torch.cuda.stream(copy):
            for store, rows in stores:
                store.append(rows)  # device -> pinned chunk, non_blocking (ChunkedRows.append)
                rows.record_stream(copy)  # their memory is not reused before the copy ran
        self._d2h_done = torch.cuda.Event()
        self._d2h_done.record(copy)

    def host_keys_head_major(self) -> Tensor:
        """All host keys as [H_kv, N, D] (a copy; used once to build an index)."""
        return self.host_k.all().transpose(0, 1)

    def block_summary(self, block: int) -> BlockSummary:
        """The host tier's mean key per `block` rows (BlockSummary), made on first use and kept
        up to date by appends; rows that reached the host tier another way (a restored
        session) are caught up chunk by chunk."""
        s = self.summary
        if s is None or s.block != block:
            s = self.summary = BlockSummary(block, tuple(self.k.shape[1:]), self.k.dtype, self.k.device)
        if s.n < self.n_host:
            for start, kc, _ in self.host_chunk_pairs():
                if start + kc.shape[0] > s.n:
                    s.add(kc[s.n - start :].to(self.k.device))
        return s

    def static_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.pos))

    def summary_bytes(self) -> int:
        return 0 if self.summary is None else self.summary.nbytes

    def host_bytes(self) -> int:
        """Host-tier bytes in memory (spilled chunks excluded)."""
        return self._host_k.nbytes + self._host_v.nbytes + self._host_pos.nbytes

    def disk_bytes(self) -> int:
        return self._host_k.disk_nbytes + self._host_v.disk_nbytes + self._host_pos.disk_nbytes

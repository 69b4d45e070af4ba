"""Moving a step's indices and fetched rows to the compute device (DESIGN.md, Scheduler).

A `TransferEngine` owns a few gathered buffers ("regions"), used in turn. For one piece
of a plan it:
  1. opens the next region (the CPU waits on the region's `consumed` event, recorded when
     the compute stream last finished reading it: normally long done);
  2. sends the piece's packed int64 indices (remapped ids, tokens, admit slots, chunk
     table) in one H2D copy on the copy stream (`idx_ready`);
  3. sends the rows (`rows_ready`), by one of
       zero_copy  a Triton kernel on the copy stream reads the rows from pinned host
                  memory straight into the region (scheduler/rowcopy.py);
       staged     the CPU gathers rows into a ring of pinned staging buffers, each
                  copied H2D on the copy stream as soon as it is full, so the gather of
                  one buffer overlaps the copy of the previous; a buffer is refilled only
                  after its `free` event (its copy done);
       host       a CPU gather (CPU sessions: the region is host memory);
  4. the compute stream waits on the events (stream waits, never a device-wide
     synchronize) and records `consumed` when its kernels have read the region.
On the CPU, events are no-ops and everything runs in program order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from kvloft.kernels.rowquant import PackedChunks
from kvloft.scheduler.rowcopy import chunk_table, gather_rows, gather_rows_reference
from kvloft.tiers.kvcache import LayerTiers
from kvloft.tiers.packed import PackedRows

__all__ = ["Region", "TransferEngine"]


class _Event:
    """A CUDA event, or nothing on the CPU."""

    def __init__(self, cuda: bool) -> None:
        self.ev = torch.cuda.Event() if cuda else None

    def record(self, stream=None) -> None:
        if self.ev is not None:
            self.ev.record(stream)

    def wait_on(self, stream) -> None:
        """Make `stream` wait for the event (GPU-side; the CPU does not block)."""
        if self.ev is not None:
            stream.wait_event(self.ev)

    def synchronize(self) -> None:
        """Block the CPU until the event's work is done (unrecorded: returns at once)."""
        if self.ev is not None:
            self.ev.synchronize()


def _grow(t: Tensor, rows: int, pin: bool = False) -> Tensor:
    if t.shape[0] >= rows:
        return t
    size = max(rows, t.shape[0] + t.shape[0] // 4)
    return torch.empty((size, *t.shape[1:]), dtype=t.dtype, device=t.device, pin_memory=pin)


@dataclass
class Region:
    """One gathered buffer and its index buffers.

    k, v: [rows, H_kv, D] on the device: row i holds the piece's i-th fetched token.
    idx: [n] int64 on the device: the piece's packed indices.
    idx_host: [n] int64 (pinned with CUDA): their staging copy.
    """

    k: Tensor
    v: Tensor
    idx: Tensor
    idx_host: Tensor
    idx_ready: _Event
    rows_ready: _Event
    consumed: _Event


@dataclass
class _Stage:
    k: Tensor  # [stage_rows, H_kv, D] pinned
    v: Tensor
    free: _Event


class TransferEngine:
    """Regions, staging ring, copy stream; see the module doc. `mode`: zero_copy, staged, host."""

    def __init__(self, mode: str, row_shape: tuple[int, int], dtype: torch.dtype, device: torch.device,
                 *, max_rows: int, regions: int = 2, stage_rows: int = 2048, stage_buffers: int = 3) -> None:
        if mode not in ("zero_copy", "staged", "host"):
            raise ValueError(f"mode must be 'zero_copy', 'staged' or 'host', got {mode!r}")
        self.mode, self.device, self.max_rows = mode, torch.device(device), max_rows
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        empty_rows = torch.empty((0, *row_shape), dtype=dtype, device=self.device)
        self.regions = [Region(empty_rows, empty_rows, torch.empty(0, dtype=torch.int64, device=self.device),
                               torch.empty(0, dtype=torch.int64), _Event(self.cuda), _Event(self.cuda),
                               _Event(self.cuda)) for _ in range(regions)]
        self.stages = []
        if mode == "staged":
            shape = (stage_rows, *row_shape)
            self.stages = [_Stage(torch.empty(shape, dtype=dtype, pin_memory=self.cuda),
                                  torch.empty(shape, dtype=dtype, pin_memory=self.cuda), _Event(self.cuda))
                           for _ in range(stage_buffers)]
        self.stage_rows = stage_rows
        self._turn = 0
        self._stage_turn = 0
        self.rows_moved = 0

    @property
    def nbytes(self) -> int:
        """Device bytes of the gathered buffers and index buffers."""
        return sum(r.k.numel() * r.k.element_size() * 2 + r.idx.numel() * 8 for r in self.regions)

    def open(self, n_idx: int, n_rows: int) -> Region:
        """The next region, sized for n_idx indices and n_rows rows."""
        r = self.regions[self._turn % len(self.regions)]
        self._turn += 1
        r.consumed.synchronize()  # its host index buffer and rows are free again
        grown = r.idx.shape[0] < n_idx or r.k.shape[0] < n_rows
        if r.idx.shape[0] < n_idx:
            r.idx_host = _grow(r.idx_host, n_idx, pin=self.cuda)
            r.idx = _grow(r.idx, n_idx)
        r.k, r.v = _grow(r.k, n_rows), _grow(r.v, n_rows)
        if grown and self.cuda:
            # New buffers come from the allocator's pool of the compute stream, which may
            # still have kernels queued on the memory's previous owner; the copy stream
            # writes them next, so it waits for that work first.
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        return r

    def send_indices(self, r: Region, packed: np.ndarray) -> Tensor:
        """Packed int64 indices [n] -> their device copy (a view of r.idx)."""
        n = packed.shape[0]
        r.idx_host[:n].copy_(torch.from_numpy(packed))
        if not self.cuda:
            return r.idx_host[:n]
        with torch.cuda.stream(self.copy_stream):
            r.idx[:n].copy_(r.idx_host[:n], non_blocking=True)
            r.idx_ready.record(self.copy_stream)
        return r.idx[:n]

    def send_rows(self, r: Region, tiers: LayerTiers, tokens: np.ndarray, tokens_dev: Tensor,
                  tables_dev: Tensor | None) -> None:
        """Rows `tokens` [m] of the layer's host tier into r.k[:m], r.v[:m].

        tokens_dev: the same ids in r.idx (zero_copy); tables_dev: [2, C] chunk base
        addresses of host K and V in r.idx (zero_copy)."""
        m = tokens.shape[0]
        self.rows_moved += m
        kc, vc = tiers.host_k.chunks, tiers.host_v.chunks
        if isinstance(kc, PackedChunks):  # 8-bit host rows: gathered and dequantized on the host
            assert self.mode != "zero_copy", "8-bit host rows are fetched staged (ScheduledAttention._fetch_mode)"
            kc, vc = tiers.host_k, tiers.host_v
        if self.mode == "host":
            _gather_host(kc, vc, torch.from_numpy(tokens), r.k, r.v)
        elif self.mode == "zero_copy":
            self._on_copy_stream(lambda: gather_rows(kc, vc, tokens_dev, r.k, r.v, tables=tables_dev))
        else:
            for a in range(0, m, self.stage_rows):
                self._stage_piece(r, kc, vc, tokens[a : a + self.stage_rows], a)
        r.rows_ready.record(self.copy_stream)

    def _on_copy_stream(self, fn) -> None:
        if not self.cuda:
            fn()
            return
        with torch.cuda.stream(self.copy_stream):
            fn()

    def _stage_piece(self, r: Region, kc, vc, tokens: np.ndarray, at: int) -> None:
        s = self.stages[self._stage_turn % len(self.stages)]
        self._stage_turn += 1
        s.free.synchronize()  # its previous H2D copy has read it
        n = tokens.shape[0]
        _gather_host(kc, vc, torch.from_numpy(tokens), s.k, s.v)

        def copy() -> None:
            r.k[at : at + n].copy_(s.k[:n], non_blocking=True)
            r.v[at : at + n].copy_(s.v[:n], non_blocking=True)
            s.free.record(self.copy_stream)

        self._on_copy_stream(copy)

    def wait_indices(self, r: Region) -> None:
        """The compute stream waits for the region's indices."""
        if self.cuda:
            r.idx_ready.wait_on(torch.cuda.current_stream(self.device))

    def wait_rows(self, r: Region) -> None:
        """The compute stream waits for the region's rows."""
        if self.cuda:
            r.rows_ready.wait_on(torch.cuda.current_stream(self.device))

    def release(self, r: Region) -> None:
        """The compute stream's reads of the region are queued: mark where they end."""
        if self.cuda:
            r.consumed.record(torch.cuda.current_stream(self.device))


def _gather_host(kc, vc, tokens: Tensor, out_k: Tensor, out_v: Tensor) -> None:
    """Host rows `tokens` [m] into out_k, out_v [>= m, H_kv, D]: from chunk lists (gather_rows_reference)
    or from 8-bit stores (PackedRows: their rows dequantized)."""
    if isinstance(kc, PackedRows):
        m = tokens.shape[0]
        out_k[:m].copy_(kc.rows(tokens))
        out_v[:m].copy_(vc.rows(tokens))
        return
    gather_rows_reference(kc, vc, tokens, out_k, out_v)


def chunk_tables(tiers: LayerTiers) -> np.ndarray:
    """[2 * C] int64: base addresses of the host K chunks, then of the V chunks."""
    return np.asarray(chunk_table(tiers.host_k.chunks) + chunk_table(tiers.host_v.chunks), np.int64)

"""A token-major row store that grows by fixed-size chunks and is never copied whole.

Rows are `[*row_shape]` (for KV: `[H_kv, D]`, one token's keys for all KV heads, one
contiguous row). Chunks are allocated on demand on one device, pinned on the host when
`pin` is set (CUDA present), so a zero-copy GPU gather or an async H2D can read them.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor


class ChunkedRows:
    """Rows appended in order; row i lives in chunk i // chunk_rows at offset i % chunk_rows."""

    def __init__(
        self,
        row_shape: tuple[int, ...],
        dtype: torch.dtype,
        chunk_rows: int,
        device: torch.device | str = "cpu",
        pin: bool = False,
    ) -> None:
        assert chunk_rows > 0
        self.row_shape = tuple(row_shape)
        self.dtype = dtype
        self.chunk_rows = chunk_rows
        self.device = torch.device(device)
        self.pin = pin and self.device.type == "cpu"
        self.chunks: list[Tensor] = []
        self.n = 0

    def __len__(self) -> int:
        return self.n

    @property
    def nbytes(self) -> int:
        """Bytes allocated (whole chunks), not only bytes used."""
        return sum(c.numel() * c.element_size() for c in self.chunks)

    def _new_chunk(self) -> Tensor:
        shape = (self.chunk_rows, *self.row_shape)
        return torch.empty(shape, dtype=self.dtype, device=self.device, pin_memory=self.pin)

    def append(self, rows: Tensor) -> None:
        """rows: [n, *row_shape]; copied in, split across chunk boundaries."""
        assert rows.shape[1:] == self.row_shape, (rows.shape, self.row_shape)
        done = 0
        while done < rows.shape[0]:
            off = self.n % self.chunk_rows
            if off == 0 and self.n // self.chunk_rows == len(self.chunks):
                self.chunks.append(self._new_chunk())
            take = min(self.chunk_rows - off, rows.shape[0] - done)
            self.chunks[self.n // self.chunk_rows][off : off + take].copy_(
                rows[done : done + take], non_blocking=self.pin
            )
            done += take
            self.n += take

    def iter_chunks(self) -> Iterator[tuple[int, Tensor]]:
        """Yields (first row index, filled part of the chunk [m, *row_shape])."""
        for ci, chunk in enumerate(self.chunks):
            start = ci * self.chunk_rows
            m = min(self.chunk_rows, self.n - start)
            if m <= 0:
                break
            yield start, chunk[:m]

    def rows(self, ids: Tensor, head: Tensor | None = None) -> Tensor:
        """Gather rows by index.

        ids: [...] int64 in [0, n); head: optional [...] int64 of the same shape picking
        index [head] inside each row (for per-KV-head selections).
        Returns [..., *row_shape] (or [..., *row_shape[1:]] with head).
        """
        ids = ids.to(self.device)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.n):
            raise IndexError(f"row ids must lie in [0, {self.n}), got [{int(ids.min())}, {int(ids.max())}]")
        tail = self.row_shape if head is None else self.row_shape[1:]
        out = torch.empty((*ids.shape, *tail), dtype=self.dtype, device=self.device)
        cid = ids // self.chunk_rows
        off = ids % self.chunk_rows
        for c in torch.unique(cid).tolist():
            m = cid == c
            if head is None:
                out[m] = self.chunks[c][off[m]]
            else:
                out[m] = self.chunks[c][off[m], head.to(self.device)[m]]
        return out

    def all(self) -> Tensor:
        """Every row, concatenated: [n, *row_shape] (a copy; for tests and index builds)."""
        if self.n == 0:
            return torch.empty((0, *self.row_shape), dtype=self.dtype, device=self.device)
        return torch.cat([c for _, c in self.iter_chunks()])

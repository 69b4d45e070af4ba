"""A token-major row store that grows by fixed-size chunks and is never copied whole.

Rows are `[*row_shape]` (for KV: `[H_kv, D]`, one token's keys for all KV heads, one
contiguous row). Chunks are allocated on demand on one device, pinned on the host when
`pin` is set (CUDA present), so a zero-copy GPU gather or an async H2D can read them.

With a `SpillPolicy` (the disk tier, docs/disk_tier.md) at most `max_resident` chunks stay
in memory: before a new chunk is allocated, the oldest full chunk is written to its file
and replaced in `chunks` by a tensor memory-mapped from that file (`torch.from_file`, a
private read-only mapping). Readers see one list of tensors either way; a read of a spilled
row pages it in from disk (or the page cache). Spilled chunks are always the oldest ones,
`chunks[:n_spilled]`, and are full, so they are never written again. They are not pinned:
a zero-copy GPU gather cannot read them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor


@dataclass(frozen=True)
class SpillPolicy:
    """When and where a ChunkedRows moves its oldest full chunks to disk.

    max_resident: chunks kept in memory (>= 1; the chunk being filled is always one of them).
    path: the file of chunk i (its directory must exist when a chunk spills).
    """

    max_resident: int
    path: Callable[[int], Path]

    def __post_init__(self) -> None:
        if self.max_resident < 1:
            raise ValueError(f"max_resident must be >= 1 chunk, got {self.max_resident}")


class SpillDir:
    """A session's directory of spilled chunks under `root`, made on first use.

    Holds no reference to the cache, so a weakref.finalize on the cache can remove it.
    """

    def __init__(self, root: str) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"CacheConfig.disk_dir={root!r} cannot be created ({e}); "
                             "name a writable directory") from e
        if not self.root.is_dir() or not os.access(self.root, os.W_OK | os.X_OK):
            raise ValueError(f"CacheConfig.disk_dir={root!r} is not a writable directory; name one that is")
        self.path: Path | None = None

    def file(self, name: str) -> Path:
        if self.path is None:
            self.path = Path(tempfile.mkdtemp(prefix="kvloft-kv-", dir=self.root))
        return self.path / name

    def remove(self) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)  # mapped chunks stay readable until unmapped
            self.path = None


class ChunkedRows:
    """Rows appended in order; row i lives in chunk i // chunk_rows at offset i % chunk_rows."""

    def __init__(
        self,
        row_shape: tuple[int, ...],
        dtype: torch.dtype,
        chunk_rows: int,
        device: torch.device | str = "cpu",
        pin: bool = False,
        spill: SpillPolicy | None = None,
    ) -> None:
        assert chunk_rows > 0
        assert spill is None or torch.device(device).type == "cpu", "only host rows spill to disk"
        self.row_shape = tuple(row_shape)
        self.dtype = dtype
        self.chunk_rows = chunk_rows
        self.device = torch.device(device)
        self.pin = pin and self.device.type == "cpu"
        self.chunks: list[Tensor] = []  # in memory, or memory-mapped for chunks[:n_spilled]
        self.n = 0
        self.spill = spill
        self.n_spilled = 0
        self._table: tuple[tuple, Tensor] | None = None  # pointer_table's cache

    def __len__(self) -> int:
        return self.n

    def pointer_table(self, device: torch.device) -> Tensor:
        """[n_chunks] int64 base addresses of the chunks on `device`, for kernels that read
        rows in place through them (kernels/sparse_decode.py gather_attend_chunks). Made
        again only when a chunk is added or spilled (chunks never move otherwise)."""
        from kvloft.kernels.checks import address_table

        key = (str(device), len(self.chunks), self.n_spilled)
        if self._table is None or self._table[0] != key:
            self._table = (key, address_table(self.chunks, device))
        return self._table[1]

    @property
    def nbytes(self) -> int:
        """Bytes allocated in memory (whole chunks, not only rows used); spilled chunks excluded."""
        return sum(c.numel() * c.element_size() for c in self.chunks[self.n_spilled :])

    @property
    def disk_nbytes(self) -> int:
        """Bytes of the chunks spilled to disk."""
        return sum(c.numel() * c.element_size() for c in self.chunks[: self.n_spilled])

    def _new_chunk(self) -> Tensor:
        if self.spill is not None:
            while len(self.chunks) - self.n_spilled >= self.spill.max_resident:
                self.spill_chunk(self.n_spilled)  # every existing chunk is full here
        shape = (self.chunk_rows, *self.row_shape)
        return torch.empty(shape, dtype=self.dtype, device=self.device, pin_memory=self.pin)

    def spill_chunk(self, ci: int) -> None:
        """Write chunk ci (the oldest in memory, full) to its file and map it back from there.

        Costs one sequential write of the chunk; the memory is freed (pinned blocks go back
        to torch's host allocator, which hands them to the next chunk).
        """
        assert self.spill is not None and ci == self.n_spilled and (ci + 1) * self.chunk_rows <= self.n
        chunk = self.chunks[ci]
        path = self.spill.path(ci)
        with open(path, "wb") as fh:
            fh.write(memoryview(chunk.reshape(-1).view(torch.uint8).numpy()))
        mapped = torch.from_file(str(path), shared=False, size=chunk.numel(), dtype=self.dtype)
        self.chunks[ci] = mapped.view(chunk.shape)
        self.n_spilled += 1

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

    def append_from(self, rows: Tensor) -> None:
        """rows: [n, *row_shape] on any device; copied in as append does, one chunk's slice at a
        time, so the store's device never holds a second whole copy of them (an index build of
        a 128K-row layer of Llama-3-8B moved whole first held 0.25 GiB more than its key copy).
        A host store takes rows from another device through a blocking copy (append's copy into
        a pinned chunk would not wait for it)."""
        if self.device.type == "cpu" and rows.device.type != "cpu":
            rows = rows.to(self.device)
        self.append(rows)

    def truncate(self, n: int) -> None:
        """Forget rows n.. (a session rolling back a failed call). Chunks past row n are freed;
        a spilled chunk that row n now falls inside is read back into memory (it will be
        written again), so spilled chunks stay full."""
        if not 0 <= n <= self.n:
            raise ValueError(f"cannot truncate {self.n} rows to {n}")
        keep = -(-n // self.chunk_rows)
        del self.chunks[keep:]
        self.n_spilled = min(self.n_spilled, keep)
        if self.n_spilled and self.n_spilled * self.chunk_rows > n:
            ci = self.n_spilled - 1
            mem = torch.empty(self.chunks[ci].shape, dtype=self.dtype, device=self.device, pin_memory=self.pin)
            self.chunks[ci] = mem.copy_(self.chunks[ci])
            self.n_spilled -= 1
        self.n = n
        self._table = None

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
        if ids.numel():
            lo, hi = torch.stack([ids.min(), ids.max()]).tolist()  # one read, not two
            if lo < 0 or hi >= self.n:
                raise IndexError(f"row ids must lie in [0, {self.n}), got [{lo}, {hi}]")
        if len(self.chunks) == 1:  # one gather; no per-chunk masks (each a read of a device store)
            return self.chunks[0][ids] if head is None else self.chunks[0][ids, head.to(self.device)]
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

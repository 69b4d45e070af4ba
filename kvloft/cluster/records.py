"""Append-only record files: one fixed-size record per token, a crc32 per record.

A pipeline stage keeps, per layer, one file `layer-<l>.rec` of every token's KV, in the
order they arrived. Record layout (little endian, packed, `record_size` bytes):

    pos    int64          the token's position
    block  int32          rows in the append call that starts here (0 inside a block)
    _pad   int32          zero
    k      row_bytes      the token's keys, all KV heads: [H_kv, D] in the model dtype
    v      row_bytes      its values
    crc    uint32         zlib.crc32 of every byte before it in the record

`block` keeps the boundaries of the append calls, so a reload can replay an index's
incremental adds exactly as they happened. Writes go through one buffered `write` per
append, then `flush` (the OS holds the data: a killed process loses nothing
acknowledged) and, with `fsync`, `os.fsync` (a lost node or power cut loses nothing
either; costs a disk sync per append).

Reading verifies every record. A file that ends inside a block (a partial record, or fewer
records than the block's first one announces) ends in an append that was being written
when its writer died: it was never acknowledged, so that tail is cut off and reported. A full record whose crc does
not match is corruption: `CorruptRecord` (a ValueError) names the file and the record.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

HEADER_BYTES = 16
CRC_BYTES = 4


class CorruptRecord(ValueError):
    """A record's checksum does not match its bytes (or the block structure is broken)."""


def record_dtype(row_bytes: int) -> np.dtype:
    """The packed numpy dtype of one record for rows of `row_bytes` bytes."""
    return np.dtype([("pos", "<i8"), ("block", "<i4"), ("_pad", "<i4"), ("k", "u1", (row_bytes,)),
                     ("v", "u1", (row_bytes,)), ("crc", "<u4")])


def _crc_rows(raw: np.ndarray) -> np.ndarray:
    """crc32 of each record's bytes but the last 4: raw [n, record_size] uint8 -> [n] uint32."""
    body = raw[:, :-CRC_BYTES]
    return np.fromiter((zlib.crc32(row) for row in body), dtype=np.uint32, count=raw.shape[0])


def tensor_rows_to_bytes(x: Tensor) -> np.ndarray:
    """x [n, H_kv, D] (any dtype, CPU) -> [n, H_kv * D * itemsize] uint8 (a view when contiguous)."""
    x = x.detach().to("cpu").contiguous()
    return x.view(torch.uint8).reshape(x.shape[0], -1).numpy()


def bytes_to_tensor_rows(b: np.ndarray, row_shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """[n, row_bytes] uint8 -> [n, *row_shape] of `dtype` (a copy)."""
    t = torch.from_numpy(np.ascontiguousarray(b)).clone()
    return t.view(dtype).reshape(b.shape[0], *row_shape)


@dataclass
class Loaded:
    """What a record file held: pos [N] int64, k, v [N, row_bytes] uint8, blocks (lengths, in order)."""

    pos: np.ndarray
    k: np.ndarray
    v: np.ndarray
    blocks: list[int]
    dropped_bytes: int  # a torn tail that was cut off (0 when the file was whole)


class RecordFile:
    """One layer's append-only record file."""

    def __init__(self, path: str | os.PathLike, row_bytes: int, fsync: bool = False) -> None:
        self.path = Path(path)
        self.dtype = record_dtype(row_bytes)
        self.row_bytes = row_bytes
        self.fsync = fsync
        self._f = None

    @property
    def record_size(self) -> int:
        return self.dtype.itemsize

    def append(self, pos: Tensor, k: Tensor, v: Tensor) -> None:
        """Write one block: pos [n] int64, k, v [n, H_kv, D] -> n records (one write, flushed)."""
        n = pos.shape[0]
        rec = np.zeros(n, dtype=self.dtype)
        rec["pos"] = pos.to("cpu").numpy()
        rec["block"][0] = n
        rec["k"] = tensor_rows_to_bytes(k)
        rec["v"] = tensor_rows_to_bytes(v)
        raw = rec.view(np.uint8).reshape(n, self.record_size)
        rec["crc"] = _crc_rows(raw)
        if self._f is None:
            self._f = open(self.path, "ab")  # noqa: SIM115 - kept open for the store's life
        self._f.write(rec.tobytes())
        self._f.flush()
        if self.fsync:
            os.fsync(self._f.fileno())

    def read(self) -> Loaded:
        """Every record, verified; a torn tail is truncated. Raises CorruptRecord."""
        if not self.path.exists():
            empty = np.zeros((0, self.row_bytes), np.uint8)
            return Loaded(np.zeros(0, np.int64), empty, empty.copy(), [], 0)
        size = self.path.stat().st_size
        raw = np.fromfile(self.path, dtype=np.uint8, count=size - size % self.record_size)
        raw = raw.reshape(-1, self.record_size)
        rec = raw.view(self.dtype).reshape(-1)
        bad = np.nonzero(_crc_rows(raw) != rec["crc"])[0]
        if bad.size:
            raise CorruptRecord(
                f"{self.path}: record {int(bad[0])} of {rec.shape[0]} fails its crc32 check "
                f"({bad.size} bad record(s), {self.record_size} bytes each); the stage's files are damaged: "
                "restore them from a copy or start the session again"
            )
        n = self._whole_blocks(rec["block"])
        if n * self.record_size != size:  # the last append was cut short: it was never acknowledged
            os.truncate(self.path, n * self.record_size)
        rec = rec[:n]
        blocks = rec["block"][rec["block"] > 0].astype(np.int64).tolist()
        return Loaded(rec["pos"].astype(np.int64), rec["k"], rec["v"], blocks, size - n * self.record_size)

    def _whole_blocks(self, marks: np.ndarray) -> int:
        """Records that belong to complete blocks; CorruptRecord if the marks do not tile them."""
        starts = np.nonzero(marks)[0]
        if marks.size and (not starts.size or starts[0] != 0):
            raise CorruptRecord(f"{self.path}: the first record starts no block; the file was not written "
                                "by kvloft or is damaged")
        ends = starts + marks[starts]
        if (starts.size > 1 and np.any(ends[:-1] != starts[1:])) or (starts.size and ends[-1] < marks.size):
            raise CorruptRecord(f"{self.path}: the block marks do not tile the {marks.size} records; "
                                "the file was not written by kvloft or is damaged")
        if starts.size and ends[-1] > marks.size:
            return int(starts[-1])
        return int(ends[-1]) if starts.size else 0

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

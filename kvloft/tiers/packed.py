"""Host rows stored 8-bit (CacheConfig.host_dtype "fp8" / "int8"): ChunkedRows' interface over
two chunked stores in lockstep, the codes [N, H_kv, D] (one byte each) and their scales
[N, H_kv] fp32 (kernels/rowquant.py: one scale per row and head).

Every read method of ChunkedRows (rows, all, iter_chunks, chunks) returns dequantized rows in
the model dtype, so code written for a ChunkedRows reads the same values either way. Kernels
that know the format read the codes in place instead: `chunks` is a PackedChunks (codes,
scales and their address tables), `pointer_table` gives the codes' chunk addresses and
`scale_table` the scales'. The disk tier spills codes and scales (two files per chunk).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from kvloft.kernels.rowquant import PackedChunks, code_dtype, dequantize_rows, quantize_rows
from kvloft.tiers.chunked import ChunkedRows, SpillPolicy

__all__ = ["PackedRows"]


class PackedRows:
    """Rows [*row_shape] (row_shape = (H_kv, D)) appended in order, stored as codes + scales.

    dtype: the dtype rows are read back in (the model's); host_dtype: "fp8" or "int8".
    spill / scale_spill: the disk tier's policies for the codes and the scales (both or none).
    read_device: where `chunks[i]` dequantizes a pinned chunk (the compute device; PackedChunks).
    """

    def __init__(self, row_shape: tuple[int, ...], dtype: torch.dtype, host_dtype: str, chunk_rows: int,
                 device: torch.device | str = "cpu", pin: bool = False, spill: SpillPolicy | None = None,
                 scale_spill: SpillPolicy | None = None, read_device: torch.device | None = None) -> None:
        assert len(row_shape) == 2 and (spill is None) == (scale_spill is None)
        self.row_shape = tuple(row_shape)
        self.dtype = dtype
        self.host_dtype = host_dtype
        self.codes = ChunkedRows(row_shape, code_dtype(host_dtype), chunk_rows, device, pin, spill)
        self.scales = ChunkedRows(row_shape[:1], torch.float32, chunk_rows, device, pin, scale_spill)
        self.chunk_rows = chunk_rows
        self.device = self.codes.device
        self.pin = self.codes.pin  # what readers see; the stores keep what they allocated with
        self.spill = spill
        self.read_device = None if read_device is None else torch.device(read_device)

    def __len__(self) -> int:
        return self.codes.n

    @property
    def n(self) -> int:
        return self.codes.n

    @property
    def n_spilled(self) -> int:
        return self.codes.n_spilled

    @property
    def nbytes(self) -> int:
        """Bytes in memory: codes + scales, whole chunks (spilled ones excluded)."""
        return self.codes.nbytes + self.scales.nbytes

    @property
    def disk_nbytes(self) -> int:
        return self.codes.disk_nbytes + self.scales.disk_nbytes

    @property
    def chunks(self) -> PackedChunks:
        """The chunks as a sequence of dequantized tensors (each a copy), carrying the codes
        and scales for kernels that read them in place (kernels/rowquant.py PackedChunks)."""
        return PackedChunks(self.codes.chunks, self.scales.chunks, self.host_dtype, self.dtype,
                            self.codes.pin, self.scales.pointer_table, self.n, self.read_device)

    def pointer_table(self, device: torch.device) -> Tensor:
        """[n_chunks] int64 base addresses of the codes' chunks (not of model-dtype rows)."""
        return self.codes.pointer_table(device)

    def scale_table(self, device: torch.device) -> Tensor:
        """[n_chunks] int64 base addresses of the scales' chunks ([R, H_kv] fp32 each)."""
        return self.scales.pointer_table(device)

    def append(self, rows: Tensor) -> None:
        """rows: [n, *row_shape], any device; quantized there, then copied in."""
        assert rows.shape[1:] == self.row_shape, (rows.shape, self.row_shape)
        codes, scales = quantize_rows(rows, self.host_dtype)
        self.codes.append(codes)
        self.scales.append(scales)

    def append_packed(self, codes: Tensor, scales: Tensor) -> None:
        """Rows already packed (a restored session): codes [n, *row_shape], scales [n, H_kv]."""
        if codes.dtype != self.codes.dtype or codes.shape[1:] != self.row_shape or scales.shape != codes.shape[:2]:
            raise ValueError(f"packed rows must be {self.codes.dtype} [n, {self.row_shape}] with scales [n, "
                             f"{self.row_shape[0]}], got {codes.dtype} {tuple(codes.shape)} and {tuple(scales.shape)}; "
                             f"load them into a store of the host_dtype they were saved with ({self.host_dtype} here)")
        self.codes.append(codes)
        self.scales.append(scales.float())

    def truncate(self, n: int) -> None:
        self.codes.truncate(n)
        self.scales.truncate(n)

    def iter_chunks(self) -> Iterator[tuple[int, Tensor]]:
        """Yields (first row index, filled part of the chunk dequantized [m, *row_shape])."""
        for (start, c), (_, s) in zip(self.codes.iter_chunks(), self.scales.iter_chunks()):
            yield start, dequantize_rows(c, s, self.host_dtype, self.dtype)

    def iter_packed(self) -> Iterator[tuple[int, Tensor, Tensor]]:
        """Yields (first row, codes [m, *row_shape], scales [m, H_kv]) of each chunk's filled part."""
        for (start, c), (_, s) in zip(self.codes.iter_chunks(), self.scales.iter_chunks()):
            yield start, c, s

    def packed_rows(self, ids: Tensor, head: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(codes, scales) of rows ids (ChunkedRows.rows' arguments): half the bytes of rows()."""
        return self.codes.rows(ids, head), self.scales.rows(ids, head)

    def rows(self, ids: Tensor, head: Tensor | None = None) -> Tensor:
        """As ChunkedRows.rows, dequantized: [..., *row_shape] (or [..., D] with head)."""
        codes, scales = self.packed_rows(ids, head)
        return dequantize_rows(codes, scales, self.host_dtype, self.dtype)

    def all(self) -> Tensor:
        """Every row dequantized: [n, *row_shape] (a copy; for tests and index builds)."""
        return dequantize_rows(self.codes.all(), self.scales.all(), self.host_dtype, self.dtype)

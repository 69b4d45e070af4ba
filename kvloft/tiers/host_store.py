"""The host store of one layer's keys or values (LayerTiers' host tier, tiers/layer_tiers.py).

CacheConfig.host_dtype None keeps host rows in the model dtype (ChunkedRows); "fp8" / "int8"
keeps one-byte codes with an fp32 scale per row and KV head (PackedRows, tiers/packed.py,
kernels/rowquant.py): reads dequantize, kernels read the codes in place. Positions, the static
tier and the block summary (made from the evicted rows before they are packed) stay exact.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from kvloft.kernels.rowquant import check_host_dtype
from kvloft.tiers.chunked import ChunkedRows, SpillPolicy
from kvloft.tiers.packed import PackedRows

__all__ = ["check_host_device", "host_rows", "packed_chunk_parts"]


def check_host_device(host_dtype: str | None, device: torch.device) -> None:
    """ValueError unless host_dtype is None, "fp8" or "int8" and the compute device can read it
    (fp8 on CUDA needs compute capability >= 8.9)."""
    check_host_dtype(host_dtype)
    if host_dtype == "fp8" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError(f"host_dtype='fp8' needs a GPU with fp8 support (compute capability >= 8.9: Ada, "
                         f"Hopper), got {torch.cuda.get_device_name(device)}; pass host_dtype='int8'")


def host_rows(row_shape: tuple[int, int], dtype: torch.dtype, host_dtype: str | None, chunk_rows: int,
              pin: bool, spill: dict[str, SpillPolicy], name: str, device: torch.device) -> ChunkedRows | PackedRows:
    """The host store of keys or values, rows [*row_shape] = [H_kv, D]: in the model dtype, or
    8-bit codes + scales (spill policies `name` and `name`.scale; dequantized on `device`)."""
    if host_dtype is None:
        return ChunkedRows(row_shape, dtype, chunk_rows, "cpu", pin, spill.get(name))
    return PackedRows(row_shape, dtype, host_dtype, chunk_rows, "cpu", pin, spill.get(name),
                      spill.get(f"{name}.scale"), read_device=device)


def packed_chunk_parts(host_k: PackedRows, host_v: PackedRows) -> Iterator[tuple[int, tuple[Tensor, ...]]]:
    """(first row, (key codes [m, H_kv, D], key scales [m, H_kv], value codes, value scales)) of
    each chunk of an 8-bit host tier's filled part, in order, as stored (no dequantized copy)."""
    for (start, kc, ks), (_, vc, vs) in zip(host_k.iter_packed(), host_v.iter_packed()):
        yield start, (kc, ks, vc, vs)

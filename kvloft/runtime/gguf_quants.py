"""GGUF (ggml) block dequantization in torch, bit-exact with `gguf.quants.dequantize`.

Each function takes the raw bytes of a tensor as blocks, `blocks [n_blocks, type_size]`
uint8, and returns `[n_blocks, block_size]` fp32. The arithmetic follows gguf's numpy
code step for step (same products, same order), so results are equal in fp32; torch runs
them several times faster on a multi-core CPU and works on any device. Types without a
torch version here fall back to the gguf package's numpy code (`dequantize`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

QK_K = 256  # elements per k-quant super-block


def f16(b: Tensor) -> Tensor:
    """b [n, 2] uint8 -> [n, 1] fp32 (a little-endian fp16 per row)."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: Tensor, group: int) -> Tensor:
    """qs [n, k * group] uint8 -> [n, k, 2, group]: low nibbles, then high nibbles, per group."""
    q = qs.reshape(qs.shape[0], -1, 1, group)
    return torch.cat((q & 0x0F, q >> 4), dim=2)


def _bits(qh: Tensor, n_bits: int) -> Tensor:
    """qh [n, 4] uint8 (a little-endian uint32) -> [n, n_bits] uint8, bit i in column i."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return ((qh.unsqueeze(-1) >> shifts) & 1).reshape(qh.shape[0], -1)[:, :n_bits]


def q4_0(b: Tensor) -> Tensor:
    d = f16(b[:, :2])
    qs = _nibbles(b[:, 2:], 16).reshape(b.shape[0], -1).to(torch.int8) - 8
    return d * qs.float()


def q4_1(b: Tensor) -> Tensor:
    d, m = f16(b[:, :2]), f16(b[:, 2:4])
    return d * _nibbles(b[:, 4:], 16).reshape(b.shape[0], -1).float() + m


def q5_values(b: Tensor, start: int) -> Tensor:
    """The 5-bit values of a Q5_0/Q5_1 block: qh (4 bytes) then qs (16) from `start`."""
    qh = _bits(b[:, start:start + 4], 32)
    ql = _nibbles(b[:, start + 4:], 16).reshape(b.shape[0], -1)
    return ql | (qh << 4)


def q5_0(b: Tensor) -> Tensor:
    return f16(b[:, :2]) * (q5_values(b, 2).to(torch.int8) - 16).float()


def q5_1(b: Tensor) -> Tensor:
    d, m = f16(b[:, :2]), f16(b[:, 2:4])
    return d * q5_values(b, 4).float() + m


def q8_0(b: Tensor) -> Tensor:
    return b[:, 2:].contiguous().view(torch.int8).float() * f16(b[:, :2])


def scale_min_k4(scales: Tensor) -> tuple[Tensor, Tensor]:
    """scales [n, 12] uint8 (8 packed 6-bit scales and mins) -> sc, m [n, 8] uint8."""
    s = scales.reshape(-1, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat((d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mn = torch.cat((m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return sc, mn


def _k_scales(b: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K/Q5_K header -> per-sub-block scale d*sc and offset dmin*m, each [n, 8, 1]."""
    d, dmin = f16(b[:, :2]), f16(b[:, 2:4])
    sc, m = scale_min_k4(b[:, 4:16])
    return (d * sc.float()).unsqueeze(-1), (dmin * m.float()).unsqueeze(-1)


def q4_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    d, dm = _k_scales(b)
    qs = _nibbles(b[:, 16:], 32).reshape(n, -1, 32).float()
    return (d * qs - dm).reshape(n, QK_K)


def q5_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    d, dm = _k_scales(b)
    qh = b[:, 16:48].reshape(n, 1, 1, 32)
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device).reshape(1, 1, 8, 1)
    qh = ((qh >> shifts) & 1).reshape(n, -1, 32)
    ql = _nibbles(b[:, 48:], 32).reshape(n, -1, 32)
    return (d * (ql | (qh << 4)).float() - dm).reshape(n, QK_K)


def q6_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (f16(b[:, 208:210]) * scales).reshape(n, QK_K // 16, 1)
    ql = _nibbles(ql, 64).reshape(n, -1, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).reshape(1, 1, 4, 1)
    qh = ((qh.reshape(n, -1, 1, 32) >> shifts) & 3).reshape(n, -1, 32)
    q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(n, QK_K // 16, -1).float()
    return (d * q).reshape(n, QK_K)


# name -> (elements per block, bytes per block, function)
BLOCK_DEQUANT: dict[str, tuple[int, int, Callable[[Tensor], Tensor]]] = {
    "Q4_0": (32, 18, q4_0),
    "Q4_1": (32, 20, q4_1),
    "Q5_0": (32, 22, q5_0),
    "Q5_1": (32, 24, q5_1),
    "Q8_0": (32, 34, q8_0),
    "Q4_K": (QK_K, 144, q4_k),
    "Q5_K": (QK_K, 176, q5_k),
    "Q6_K": (QK_K, 210, q6_k),
}
_PLAIN = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_CHUNK_BLOCKS = 1 << 16  # bounds the temporaries: ~64K blocks (2M-16M elements) at a time


def dequantize(raw: Tensor, qtype: str, n_elements: int) -> Tensor:
    """raw [n_bytes] uint8 of one GGUF tensor -> [n_elements] fp32 (a view for F32 input)."""
    if qtype in _PLAIN:
        return raw.view(_PLAIN[qtype]).float()
    if qtype not in BLOCK_DEQUANT:
        import gguf

        arr = gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType[qtype])
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).reshape(-1)
    size, type_size, fn = BLOCK_DEQUANT[qtype]
    blocks = raw.reshape(-1, type_size)
    out = torch.empty(blocks.shape[0], size, dtype=torch.float32, device=raw.device)
    for i in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        out[i:i + _CHUNK_BLOCKS] = fn(blocks[i:i + _CHUNK_BLOCKS])
    return out.reshape(-1)[:n_elements]

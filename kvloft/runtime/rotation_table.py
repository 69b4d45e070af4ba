"""RoPE re-rotation by integer position offsets through a cached cos/sin table.

Extrapolation mode (runtime/positions.py) rotates keys and search queries by whole numbers
of positions every chunk. kernels/reference.rotate_keys computes the fp64 angles
delta * inv_freq and their cos/sin for every row of every call; the deltas are integers, so
RotationTable computes cos/sin once per offset value, in fp64 exactly as rotate_keys does,
rounded to fp32 as rotate_keys rounds them, and indexes them: the rotated keys equal
rotate_keys' to the bit (same products, same order).

The table covers offsets 0..n-1 (sin is odd, cos even: a negative offset reads |delta| and
flips the sign of sin, exact in fp64 and fp32); it grows on demand to the next power of two
above the largest |delta| seen, up to `max_bytes` (default 256 MiB: 1M offsets at head dim
64). Offsets beyond it, and fp64 inputs, go through rotate_keys. A caller that knows a bound
on |delta| passes it, so the table is sized without reading delta back (no device sync).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvloft.kernels import reference

DEFAULT_MAX_BYTES = 256 << 20


class RotationTable:
    def __init__(self, inv_freq: Tensor, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        """inv_freq: [D/2] fp32, the model's RoPE frequencies (on the compute device)."""
        if inv_freq.dim() != 1:
            raise ValueError(f"RotationTable: inv_freq must be [D/2], got {tuple(inv_freq.shape)}")
        if max_bytes < 0:
            raise ValueError(f"RotationTable: max_bytes must be >= 0, got {max_bytes}")
        self.inv_freq = inv_freq
        self.max_rows = max_bytes // (2 * 4 * inv_freq.shape[0])  # cos and sin, fp32
        self.cos = torch.empty((0, inv_freq.shape[0]), dtype=torch.float32, device=inv_freq.device)
        self.sin = self.cos

    @property
    def rows(self) -> int:
        return self.cos.shape[0]

    def _grow(self, need: int) -> bool:
        """Cover offsets 0..need-1; False if that passes max_rows."""
        if need <= self.rows:
            return True
        if need > self.max_rows:
            return False
        n = min(max(1024, 1 << (need - 1).bit_length()), self.max_rows)
        dev = self.inv_freq.device
        ang = torch.arange(n, dtype=torch.float64, device=dev)[:, None] * self.inv_freq.to(torch.float64)
        self.cos, self.sin = ang.cos().float(), ang.sin().float()  # [n, D/2]
        return True

    def rotate(self, k: Tensor, delta: Tensor, bound: int | None = None) -> Tensor:
        """reference.rotate_keys(k, delta, inv_freq), from the table: k [n, H_kv, D], delta [n]
        or [H_kv, n] int64. bound: |delta| < bound, known to the caller (else read from delta;
        a wrong bound fails the table's indexing, it never reads a wrong row).
        Returns [n, H_kv, D] in k's dtype."""
        n, hkv, d = k.shape
        if delta.shape not in ((n,), (hkv, n)) or d != 2 * self.inv_freq.shape[0]:
            return reference.rotate_keys(k, delta, self.inv_freq)  # raises its own errors
        if k.dtype == torch.float64 or not n:
            return reference.rotate_keys(k, delta, self.inv_freq)
        delta = delta.to(k.device)
        mag = delta.abs()
        if not self._grow(int(mag.max()) + 1 if bound is None else bound):
            return reference.rotate_keys(k, delta, self.inv_freq)
        idx = mag if delta.dim() == 1 else mag.t()  # [n] or [n, H_kv]
        sign = delta.sign() if delta.dim() == 1 else delta.sign().t()
        flat = idx.reshape(-1)  # index_select: several times faster than advanced indexing on the CPU
        cos = self.cos.index_select(0, flat).view(*idx.shape, -1)  # [n(, H_kv), D/2], fresh copies
        sin = self.sin.index_select(0, flat).view(*idx.shape, -1)
        sin.mul_(sign[..., None].to(sin.dtype))  # sin(-x) = -sin(x); exact (sin(0) = 0)
        if delta.dim() == 1:
            cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
        kf = k.float()
        x1, x2 = kf.chunk(2, dim=-1)
        out = torch.empty((n, hkv, d), dtype=torch.float32, device=k.device)
        lo, hi = out[..., : d // 2], out[..., d // 2 :]
        torch.mul(x1, cos, out=lo)
        lo.sub_(x2 * sin)
        torch.mul(x2, cos, out=hi)
        hi.add_(x1 * sin)
        return out.to(k.dtype)

"""Packed weight-only quantization: the layout, the quantizers and the torch reference.

A linear weight W [N, K] (N outputs, K inputs) is kept as a `PackedWeight`:

  int4  qweight uint8 [N, K_pad // 2]. Within each block of 32 inputs, byte j (0..15)
        holds input j in its low nibble and input j + 16 in its high nibble: ggml's
        Q4_0/Q4_1 block layout, so those GGUF tensors are repacked by copying bytes.
        scales fp16 [N, K_pad // group]; mins fp16 [N, K_pad // group] or None.
        asymmetric (mins):  w = q * s + m        (q in 0..15; ggml Q4_1)
        symmetric (None):   w = (q - 8) * s      (ggml Q4_0)
  int8  qweight int8 [N, K_pad], scales fp16 [N, K_pad // group], w = q * s (ggml Q8_0
        with group 32; group = K_pad is one scale per output channel).

K_pad is K rounded up to a multiple of `group` (itself a multiple of 32): padded inputs
hold q = 0 (int8) or the group's zero and are never read against a real input (kernels
mask x beyond K). Scales are fp16 because GGUF's are: repacked scales stay bit-exact.
Bytes: int4 with group 128 and mins is 4.25 bits a weight, int8 per-channel ~8.
Every dequantization here computes in fp32 with the products in ggml's order, so a
repacked GGUF tensor dequantizes bit-exactly to `gguf.quants.dequantize`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

BLOCK = 32  # inputs per packing block (16 bytes of nibbles)
GROUPS = (32, 64, 128)
MAX_DIM = 1 << 20  # refuse absurd shapes before allocating


@dataclass
class PackedWeight:
    """One quantized weight (runtime state, plain tensors on one device).

    qweight: int4 -> uint8 [N, K_pad // 2]; int8 -> int8 [N, K_pad].
    scales: fp16 [N, K_pad // group]. mins: fp16 [N, K_pad // group] (int4 asymmetric) or None.
    shape: (N, K), the logical weight. bits: 4 or 8. group: inputs per scale.
    """

    qweight: Tensor
    scales: Tensor
    mins: Tensor | None
    shape: tuple[int, int]
    bits: int
    group: int

    @property
    def k_pad(self) -> int:
        return self.scales.shape[1] * self.group

    @property
    def nbytes(self) -> int:
        """Bytes held (packed values, scales, mins): what the budgets count."""
        ts = (self.qweight, self.scales) + ((self.mins,) if self.mins is not None else ())
        return sum(t.numel() * t.element_size() for t in ts)

    def to(self, device: torch.device | str) -> PackedWeight:
        mv = lambda t: None if t is None else t.to(device)
        return PackedWeight(mv(self.qweight), mv(self.scales), mv(self.mins), self.shape, self.bits, self.group)

    def rows(self, index: Tensor) -> PackedWeight:
        """The weight with its output rows reordered: index [N] int64 (a row permutation)."""
        mins = None if self.mins is None else self.mins[index]
        return PackedWeight(self.qweight[index], self.scales[index], mins, self.shape, self.bits, self.group)

    def validate(self) -> None:
        """Check the tensors against shape/bits/group; raises ValueError naming the mismatch."""
        n, k = self.shape
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        if self.group % BLOCK or self.group <= 0:
            raise ValueError(f"group must be a positive multiple of {BLOCK}, got {self.group}")
        kp = self.k_pad
        if not k <= kp < k + self.group:
            raise ValueError(f"scales [{n}, {self.scales.shape[1]}] x group {self.group} do not cover K={k}")
        want_q = (n, kp // 2) if self.bits == 4 else (n, kp)
        want_dt = torch.uint8 if self.bits == 4 else torch.int8
        if tuple(self.qweight.shape) != want_q or self.qweight.dtype != want_dt:
            raise ValueError(f"qweight must be {want_dt} {list(want_q)} for int{self.bits}, "
                             f"got {self.qweight.dtype} {list(self.qweight.shape)}")
        for name, t in (("scales", self.scales), ("mins", self.mins)):
            if t is not None and (t.dtype != torch.float16 or t.shape != self.scales.shape or t.shape[0] != n):
                raise ValueError(f"{name} must be float16 [{n}, {kp // self.group}], got {t.dtype} {list(t.shape)}")
        if self.mins is not None and self.bits == 8:
            raise ValueError("int8 weights are symmetric: mins must be None")


# ---- packing -----------------------------------------------------------------------------


def pack_nibbles(q: Tensor) -> Tensor:
    """q [N, K_pad] uint8 values 0..15 (K_pad % 32 == 0) -> [N, K_pad // 2] uint8 (layout above)."""
    n, kp = q.shape
    blocks = q.reshape(n, kp // BLOCK, 2, BLOCK // 2)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, kp // 2)


def unpack_nibbles(packed: Tensor) -> Tensor:
    """packed [N, K_pad // 2] uint8 -> q [N, K_pad] uint8 values 0..15 (inverse of pack_nibbles)."""
    n, half = packed.shape
    b = packed.reshape(n, half // (BLOCK // 2), 1, BLOCK // 2)
    return torch.cat((b & 0x0F, b >> 4), dim=2).reshape(n, half * 2)


# ---- quantizers (torch; run once at load) -----------------------------------------------


def _check_weight(w: Tensor, group: int) -> None:
    if w.dim() != 2:
        raise ValueError(f"a linear weight is [N, K], got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise TypeError(f"weight must be a float tensor, got {w.dtype}")
    if group not in GROUPS and group % BLOCK:
        raise ValueError(f"group must be one of {GROUPS} (or a multiple of {BLOCK}), got {group}")
    if max(w.shape) > MAX_DIM:
        raise ValueError(f"weight shape {tuple(w.shape)} exceeds {MAX_DIM} per dimension")


def _grouped(w: Tensor, group: int) -> tuple[Tensor, int]:
    """w [N, K] -> fp32 [N, K_pad // group, group], zero-padded along K; and K_pad."""
    n, k = w.shape
    kp = -(-k // group) * group
    wf = w.float()
    if kp != k:
        wf = torch.nn.functional.pad(wf, (0, kp - k))
    return wf.reshape(n, kp // group, group), kp


def quantize_int4(w: Tensor, group: int = 128, symmetric: bool = False) -> PackedWeight:
    """w [N, K] float -> int4 PackedWeight. Asymmetric: s = (max - min) / 15, m = min (fp16),
    q = round((w - m) / s); symmetric (ggml Q4_0): s = the group's value of largest magnitude
    / -8, q = round(w / s) + 8, clamped to 0..15. Quantized against the fp16-rounded s, m."""
    _check_weight(w, group)
    g, kp = _grouped(w, group)
    if symmetric:
        idx = g.abs().argmax(-1, keepdim=True)
        s = (g.gather(-1, idx) / -8.0).half()
        inv = torch.where(s == 0, 0.0, 1.0 / s.float())
        q = (g * inv + 8.0).round().clamp_(0, 15)
        mins = None
    else:
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        m = lo.half()
        s = ((hi - m.float()) / 15.0).half()
        inv = torch.where(s == 0, 0.0, 1.0 / s.float())
        q = ((g - m.float()) * inv).round().clamp_(0, 15)
        mins = m.squeeze(-1).contiguous()
    q = q.to(torch.uint8).reshape(w.shape[0], kp)
    return PackedWeight(pack_nibbles(q), s.squeeze(-1).contiguous(), mins, tuple(w.shape), 4, group)


def quantize_int8(w: Tensor, group: int | None = None) -> PackedWeight:
    """w [N, K] float -> int8 PackedWeight, symmetric: s = absmax / 127 (fp16) per group of
    `group` inputs, or per output channel when group is None (group = K rounded up to 32)."""
    n, k = w.shape if w.dim() == 2 else (0, 0)
    group = group if group is not None else -(-max(k, 1) // BLOCK) * BLOCK
    _check_weight(w, group)
    g, kp = _grouped(w, group)
    s = (g.abs().amax(-1, keepdim=True) / 127.0).half()
    inv = torch.where(s == 0, 0.0, 1.0 / s.float())
    q = (g * inv).round().clamp_(-127, 127).to(torch.int8).reshape(n, kp)
    return PackedWeight(q, s.squeeze(-1).contiguous(), None, tuple(w.shape), 8, group)


# ---- reference (torch, any device) ----------------------------------------------------------


def dequantize(pw: PackedWeight) -> Tensor:
    """PackedWeight -> W [N, K] fp32, computed as ggml does (q * s + m, (q - 8) * s, q * s)."""
    n, k = pw.shape
    groups = pw.scales.shape[1]
    s = pw.scales.float().unsqueeze(-1)  # [N, G, 1]
    if pw.bits == 8:
        w = pw.qweight.float().reshape(n, groups, pw.group) * s
    else:
        q = unpack_nibbles(pw.qweight).reshape(n, groups, pw.group)
        if pw.mins is None:
            w = (q.to(torch.int8) - 8).float() * s
        else:
            w = q.float() * s + pw.mins.float().unsqueeze(-1)
    return w.reshape(n, groups * pw.group)[:, :k]


def reference_matmul(x: Tensor, pw: PackedWeight) -> Tensor:
    """x [T, K] float -> x @ W^T [T, N] in x's dtype: dequantized to x's dtype, then matmul
    (what a plain torch implementation at x's precision computes)."""
    return x @ dequantize(pw).to(x.dtype).t()

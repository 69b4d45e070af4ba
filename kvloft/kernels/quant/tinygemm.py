"""PyTorch's own int4 kernels ("tinygemm", `aten._weight_int4pack_mm`) behind a packed int4
weight (packed.py): the layout conversion (once, at load), the capability check and the
matmul launcher.

tinygemm dequantizes every weight as

    w = (q - 8) * scale + zero          q in 0..15, scale and zero per group and output,

so our two int4 forms map onto it exactly (in real arithmetic):

    asymmetric (mins)  w = q * s + m    ->  scale = s, zero = m + 8 s
    symmetric (Q4_0)   w = (q - 8) * s  ->  scale = s, zero = 0

scales_and_zeros is [K_pad / group, N_pad, 2] (scale at [..., 0], zero at [..., 1]) in the
activations' dtype: bf16 on CUDA, whose kernel rounds both to bf16 (our fp16 scales lose
3 mantissa bits there) and dequantizes with a bf16 FMA; on the CPU fp32, bf16 or fp16,
dequantized in fp32.

The ops (PyTorch 2.5+; the limits are those of its int4mm.cu / int4mm_kernel.cpp):
  CUDA  _convert_weight_to_int4pack(uint8 [N, K/2]: input 2i in the HIGH nibble, 2i+1 in
        the low one; inner_k_tiles 2/4/8) -> int32 [N/8, K/(16 inner_k_tiles), 32,
        inner_k_tiles/2]; K % (16 inner_k_tiles) == 0. _weight_int4pack_mm(x bf16 [T, K]
        contiguous, B, group in 32/64/128/256, sz bf16 [K/group, N_pad8, 2]) -> bf16
        [T, N_pad8]. Needs sm80+ (mma.m16n8k16 bf16); not on ROCm (another tile size).
  CPU   _convert_weight_to_int4pack_for_cpu(int32 [N, K] values 0..15) -> uint8 [N, K/2]
        (N % 16 == 0); _weight_int4pack_mm_for_cpu(x [T, K] fp32/bf16/fp16, B, group, sz in
        x's dtype) -> [T, N].
We pad N to 8 (CUDA) or 16 (CPU) with zero-scale rows and K to K_pad (x is zero-padded
per call only when K % group != 0).

`unpack_cuda_layout` inverts the CUDA layout (derived from the layout int4mm.cu documents:
lane t of an n8 x k16 tile holds row t // 4, inputs 2 (t % 4) + {0, 1, 8, 9} of each k16
tile, two k16 tiles per int32); it lets a layer hold only the tinygemm form on the GPU
and still give back its packed values (prefill chunks, the reference, fingerprints).
`supported_reasons` checks it against the op once per device.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kvloft.kernels.quant.packed import PackedWeight, pack_nibbles, unpack_nibbles

GROUPS = (32, 64, 128, 256)  # the group sizes the ops are built for
# rows of x up to which tinygemm runs; above, dequantize + GEMM is faster. CPU, one thread of
# a shared 2-core EPYC, 2048 x 2048: fp32 (a scalar loop, cost ~ T) 28 ms at T = 1, 103 at 4,
# 208 at 8 against the reference's 116-158; bf16 (vectorised) 0.7 ms at T = 1, 55 at T = 64
# against 42 and 185. CUDA (H100, bench/results/h100/s17): tinygemm takes one 16-row tile
# at a time, 0.025-0.57 ms at T = 16 against dequantize + cuBLAS's ~0.04-0.73 ms, so about
# twice that at T = 17-32: an estimate until bench/quant_speed.py measures the crossover.
MAX_T = {("cuda", torch.bfloat16): 16, ("cpu", torch.float32): 4, ("cpu", torch.float16): 4,
         ("cpu", torch.bfloat16): 64}
N_ALIGN = {"cuda": 8, "cpu": 16}
MAX_ELEMENTS = (1 << 31) - 1  # the CUDA conversion indexes with int32 accessors


@dataclass
class TinyGemmWeight:
    """One int4 weight in tinygemm's layout (runtime state, on one device).

    packed: CUDA int32 [N_pad / 8, K_pad / (16 inner), 32, inner / 2]; CPU uint8 [N_pad, K_pad / 2].
    scales_zeros: [K_pad / group, N_pad, 2] in `dtype` (scale, zero: w = (q - 8) * scale + zero).
    shape: (N, K), the logical weight. group: inputs per scale. dtype: the activations' dtype.
    """

    packed: Tensor
    scales_zeros: Tensor
    shape: tuple[int, int]
    group: int
    dtype: torch.dtype

    @property
    def k_pad(self) -> int:
        return self.scales_zeros.shape[0] * self.group

    @property
    def n_pad(self) -> int:
        return self.scales_zeros.shape[1]

    @property
    def max_t(self) -> int:
        return MAX_T[(self.packed.device.type, self.dtype)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales_zeros))


def inner_k_tiles(k_pad: int) -> int:
    """The widest inner k-tiling that divides K_pad (8: 16-byte loads; K_pad % 32 == 0 always)."""
    return next(i for i in (8, 4, 2) if k_pad % (16 * i) == 0)


def supported_reasons(pw: PackedWeight, dtype: torch.dtype) -> list[str]:
    """Every reason the tinygemm ops cannot run this weight with activations of `dtype` on
    the weight's device ([] = they can). Queries the device (CUDA capability, a one-time
    layout check) on the first call per device, never at import."""
    dev = pw.qweight.device
    n, _ = pw.shape
    reasons = []
    if pw.bits != 4:
        reasons.append(f"tinygemm is int4 only, the weight is int{pw.bits}")
    if pw.group not in GROUPS:
        reasons.append(f"tinygemm takes groups {GROUPS}, the weight has group {pw.group}")
    if dev.type not in N_ALIGN:
        return reasons + [f"tinygemm runs on CUDA or the CPU, the weight is on {dev.type}"]
    n_pad = -(-n // N_ALIGN[dev.type]) * N_ALIGN[dev.type]
    if n_pad * pw.k_pad > MAX_ELEMENTS:
        reasons.append(f"N_pad x K_pad = {n_pad * pw.k_pad} exceeds the ops' int32 indexing")
    if dev.type == "cpu" and dtype not in (torch.float32, torch.bfloat16, torch.float16):
        reasons.append(f"the CPU op takes fp32/bf16/fp16 activations, not {dtype}")
    if dev.type == "cuda":
        if dtype != torch.bfloat16:
            reasons.append(f"the CUDA op takes bf16 activations only, the model computes in {dtype}")
        reasons += _cuda_reasons(dev)
    return reasons


@functools.lru_cache(maxsize=8)
def _cuda_reasons(dev: torch.device) -> tuple[str, ...]:
    if torch.version.hip:
        return ("tinygemm's ROCm build uses another tile layout",)
    if torch.cuda.get_device_capability(dev) < (8, 0):
        return ("tinygemm needs compute capability 8.0 or newer",)
    q = torch.randint(0, 16, (16, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).to(dev)
    try:
        got = unpack_cuda_layout(torch.ops.aten._convert_weight_to_int4pack(_hi_lo_bytes(q), 8))
    except RuntimeError as e:  # an op this build lacks
        return (f"aten._convert_weight_to_int4pack failed: {str(e).splitlines()[0][:120]}",)
    return () if torch.equal(got, q) else ("this PyTorch's int4pack layout differs from the one unpacked here",)


def _hi_lo_bytes(q: Tensor) -> Tensor:
    """q [N, K] uint8 0..15 -> [N, K / 2] uint8, input 2i in the high nibble (the CUDA op's input)."""
    return (q[:, 0::2] << 4 | q[:, 1::2]).contiguous()


def convert(pw: PackedWeight, dtype: torch.dtype) -> TinyGemmWeight:
    """The packed int4 weight -> tinygemm's layout on the same device, for activations of
    `dtype` (check supported_reasons first). Runs once per layer at load."""
    dev = pw.qweight.device
    n, _ = pw.shape
    n_pad = -(-n // N_ALIGN[dev.type]) * N_ALIGN[dev.type]
    q = F.pad(unpack_nibbles(pw.qweight), (0, 0, 0, n_pad - n))  # [N_pad, K_pad] uint8
    s = pw.scales.float()
    zero = torch.zeros_like(s) if pw.mins is None else pw.mins.float() + 8.0 * s  # in fp32, rounded once
    sz = F.pad(torch.stack((s, zero), -1), (0, 0, 0, 0, 0, n_pad - n))  # [N_pad, G, 2], padded rows 0
    sz = sz.transpose(0, 1).to(dtype).contiguous()
    ikt = inner_k_tiles(pw.k_pad)
    if dev.type == "cuda":
        packed = torch.ops.aten._convert_weight_to_int4pack(_hi_lo_bytes(q), ikt)
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), ikt)
    return TinyGemmWeight(packed, sz, pw.shape, pw.group, dtype)


def matmul(x: Tensor, tw: TinyGemmWeight) -> Tensor:
    """x [T, K] in tw.dtype times W [N, K] -> [T, N] in x's dtype (tinygemm)."""
    n, k = tw.shape
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"tinygemm matmul: x must be [T, {k}], got {list(x.shape)}")
    if x.dtype != tw.dtype or x.device != tw.packed.device:
        raise ValueError(f"tinygemm matmul: x is {x.dtype} on {x.device}, the weight was converted for "
                         f"{tw.dtype} on {tw.packed.device}; convert it again for this dtype")
    if tw.k_pad != k:
        x = F.pad(x, (0, tw.k_pad - k))
    x = x.contiguous()
    if x.is_cuda:
        y = torch.ops.aten._weight_int4pack_mm(x, tw.packed, tw.group, tw.scales_zeros)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, tw.packed, tw.group, tw.scales_zeros)
    return y if tw.n_pad == n else y[:, :n]


# ---- the CUDA layout, unpacked (torch) -------------------------------------------------------


def unpack_cuda_layout(packed: Tensor) -> Tensor:
    """int32 [N_pad / 8, K_pad / (16 inner), 32, inner / 2] (the CUDA op's output) -> q [N_pad, K_pad]
    uint8 0..15. Nibble s of an int32 (bits 4s..4s+3, s = 4h + 2 i1 + i0) of lane t = 4r + c in
    tile (n8, ko), inner pair j, is W[8 n8 + r, 16 inner ko + 32 j + 16 i1 + 8 i0 + 2 c + h]."""
    n8, ko, lanes, half = packed.shape
    if lanes != 32 or packed.dtype != torch.int32:
        raise ValueError(f"expected int32 [N/8, K/(16 inner), 32, inner/2], got {packed.dtype} {list(packed.shape)}")
    by = packed.contiguous().view(torch.uint8).reshape(n8, ko, 32, half, 4)  # little-endian: slots 2b, 2b+1
    nib = torch.stack((by & 15, by >> 4), -1)  # [n8, ko, 32, half, 4, 2] = slot order
    nib = nib.reshape(n8, ko, 8, 4, half, 2, 2, 2)  # [n8, ko, r, c, j, h, i1, i0]
    return nib.permute(0, 2, 1, 4, 6, 7, 3, 5).reshape(n8 * 8, ko * half * 32)


def pack_cuda_layout(q: Tensor, inner: int) -> Tensor:
    """q [N_pad, K_pad] uint8 0..15 (N_pad % 8 == 0, K_pad % (16 inner) == 0) -> the CUDA op's int32
    layout (the inverse of unpack_cuda_layout; the op itself is what `convert` uses)."""
    n, k = q.shape
    half = inner // 2
    t = q.reshape(n // 8, 8, k // (16 * inner), half, 2, 2, 4, 2)  # [n8, r, ko, j, i1, i0, c, h]
    t = t.permute(0, 2, 1, 6, 3, 7, 4, 5).reshape(n // 8, k // (16 * inner), 32, half, 4, 2)
    by = (t[..., 0] | (t[..., 1] << 4)).contiguous()  # [n8, ko, 32, half, 4] bytes, little-endian
    return by.view(torch.int32).reshape(n // 8, k // (16 * inner), 32, half)


def packed_from_cuda(tw: TinyGemmWeight, scales: Tensor, mins: Tensor | None) -> PackedWeight:
    """The packed int4 weight back from the CUDA layout: q exact; scales fp16 [N, K_pad / group]
    and mins (the layer keeps them, tinygemm's bf16 copies are rounded)."""
    n, _ = tw.shape
    q = unpack_cuda_layout(tw.packed)[:n]
    return PackedWeight(pack_nibbles(q), scales, mins, tw.shape, 4, tw.group)

"""Launchers for the packed-weight kernels (kernels/quant/triton_qmm.py): validate, pick the
grid, launch. Nothing here queries CUDA at import time.

    quant_matmul(x [T, K], pw) -> [T, N]   T <= GEMV_MAX_T: the dequantizing GEMV kernel;
                                           larger T: dequantize to x's dtype, then cuBLAS.
    dequantize_dense(pw, dtype) -> [N, K]  the weight in a dense dtype (Triton).
    dequantize_tiny(tw, scales, mins, dtype) -> [N, K]  the same from PyTorch's int4pack
                                           layout (kernels/quant/tinygemm.py) and our scales.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from kvloft.kernels import checks
from kvloft.kernels.quant.packed import PackedWeight

GEMV_MAX_T = 16  # rows of x the GEMV kernel takes (T padded to 16 for the tensor-core dot)


@dataclass(frozen=True)
class QmmConfig:
    """Tile sizes of one qmm launch (bench/quant_speed.py sweeps them)."""

    block_n: int = 32
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 0  # 0 = enough splits for about two programs per multiprocessor


DECODE = QmmConfig()  # T == 1
SKINNY = QmmConfig(block_n=64, block_k=64)  # 1 < T <= 16: a [16, K] x [K, 64] dot per step


def _kernels():
    from kvloft.kernels.quant import triton_qmm

    return triton_qmm


@functools.lru_cache(maxsize=8)
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few splits, to exercise split-K
    return torch.cuda.get_device_properties(device).multi_processor_count


def _check(x: Tensor, pw: PackedWeight, op: str) -> None:
    checks.require_float("x", x)
    checks.require_dim("x", x, 2, "[T, K]")
    n, k = pw.shape
    if x.shape[1] != k:
        raise ValueError(f"{op}: x has {x.shape[1]} inputs but the weight [N={n}, K={k}] takes {k}; "
                         "pass x [T, K]")
    if x.stride(1) != 1:
        raise ValueError(f"{op}: x's last dimension must be contiguous (stride 1); pass x.contiguous()")
    for name, t in (("qweight", pw.qweight), ("scales", pw.scales), ("mins", pw.mins)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x on {x.device}; move the weight with .to()")
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous; pass a PackedWeight from quantize_*")


def _block_k(want: int, group: int) -> int:
    """The largest K tile <= want that divides the group (a tile then needs one scale per row)."""
    if want < 32 or want & (want - 1):
        raise ValueError(f"block_k must be a power of two >= 32, got {want}")
    while group % want:
        want //= 2
    return want


def _splits(n_blocks: int, k_pad: int, block_k: int, want: int, device: torch.device) -> tuple[int, int]:
    """-> (splits, inputs per split): split K until about two programs run per multiprocessor."""
    tiles = -(-k_pad // block_k)
    if want <= 0:
        want = max(1, -(-2 * _multiprocessors(device) // n_blocks))
    per = -(-tiles // min(want, tiles)) * block_k
    return -(-k_pad // per), per


def quant_matmul(x: Tensor, pw: PackedWeight, cfg: QmmConfig | None = None) -> Tensor:
    """x [T, K] float (fp32/bf16/fp16) times the packed W [N, K] -> [T, N] in x's dtype."""
    kern = _kernels()
    _check(x, pw, "quant_matmul")
    checks.require_runnable(x.device, kern._qmm_kernel, "quant_matmul")
    t, n = x.shape[0], pw.shape[0]
    if t == 0:
        return x.new_empty(0, n)
    if t > GEMV_MAX_T:
        return x @ dequantize_dense(pw, x.dtype).t()
    cfg = cfg or (DECODE if t == 1 else SKINNY)
    block_k = _block_k(cfg.block_k, pw.group)
    n_blocks = -(-n // cfg.block_n)
    splits, per = _splits(n_blocks, pw.k_pad, block_k, cfg.split_k, x.device)
    dt = x.dtype if splits == 1 else torch.float32
    out = torch.empty(splits, t, n, dtype=dt, device=x.device)
    kern._qmm_kernel[(n_blocks, splits)](
        x, pw.qweight, pw.scales, pw.scales if pw.mins is None else pw.mins, out,
        t, n, pw.shape[1], pw.k_pad, per,
        x.stride(0), pw.qweight.stride(0), pw.scales.stride(0), out.stride(0), out.stride(1),
        BITS=pw.bits, HAS_MIN=pw.mins is not None, GROUP=pw.group,
        BLOCK_T=1 if t == 1 else 16, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
        USE_DOT=t > 1, IEEE=x.dtype == torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out[0] if splits == 1 else out.sum(0).to(x.dtype)


def dequantize_dense(pw: PackedWeight, dtype: torch.dtype, block_n: int = 32, block_k: int = 128) -> Tensor:
    """The packed W -> [N, K] in `dtype` (Triton; reference: packed.dequantize)."""
    kern = _kernels()
    checks.require_runnable(pw.qweight.device, kern._dequant_kernel, "dequantize_dense")
    n, k = pw.shape
    w = torch.empty(n, k, dtype=dtype, device=pw.qweight.device)
    block_k = _block_k(block_k, pw.group)
    grid = (-(-n // block_n), -(-pw.k_pad // block_k))
    kern._dequant_kernel[grid](
        pw.qweight, pw.scales, pw.scales if pw.mins is None else pw.mins, w,
        n, k, pw.k_pad, pw.qweight.stride(0), pw.scales.stride(0),
        BITS=pw.bits, HAS_MIN=pw.mins is not None, GROUP=pw.group, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return w


def dequantize_tiny(tw, scales: Tensor, mins: Tensor | None, dtype: torch.dtype, block_n: int = 32,
                    block_k: int = 128) -> Tensor:
    """W [N, K] in `dtype` from a CUDA-layout tinygemm.TinyGemmWeight `tw` (int32 [N_pad / 8,
    K_pad / (16 inner), 32, inner / 2]) and our fp16 scales/mins [N, K_pad / group] (Triton;
    equal to dequantize_dense of the packed weight it came from)."""
    kern = _kernels()
    packed = tw.packed
    checks.require_runnable(packed.device, kern._dequant_tiny_kernel, "dequantize_tiny")
    n, k = tw.shape
    if packed.dim() != 4 or packed.dtype != torch.int32 or packed.shape[2] != 32:
        raise ValueError(f"dequantize_tiny: expected the CUDA int4pack layout int32 [N/8, K/(16 inner), 32, "
                         f"inner/2], got {packed.dtype} {list(packed.shape)}")
    if scales.shape != (n, tw.k_pad // tw.group) or (mins is not None and mins.shape != scales.shape):
        raise ValueError(f"dequantize_tiny: scales/mins must be [{n}, {tw.k_pad // tw.group}], "
                         f"got {list(scales.shape)}")
    w = torch.empty(n, k, dtype=dtype, device=packed.device)
    block_k = _block_k(block_k, tw.group)
    grid = (-(-n // block_n), -(-tw.k_pad // block_k))
    kern._dequant_tiny_kernel[grid](
        packed.contiguous(), scales, scales if mins is None else mins, w, n, k, packed.shape[1], scales.stride(0),
        INNER=2 * packed.shape[3], HAS_MIN=mins is not None, GROUP=tw.group, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return w

"""RMSNorm of few rows, with an optional residual add first, in one Triton launch.

    s = x + r              (if a residual r is given: the new residual stream, stored)
    y = w * (s * rsqrt(mean(s^2) + eps)).to(dtype)

HF Llama arithmetic, as runtime/model.py RMSNorm.forward does it: the sum of squares and
rsqrt in fp32, the normed row cast to the input dtype before the weight multiply, that
product rounded once (a product of two bf16/fp16 values is exact in fp32, so it rounds as
torch's). x + r is taken in fp32 and rounded once, as torch's add. Only the fp32 sum of
squares is summed in another order than torch's, so results may differ from the torch
module by the rounding of that sum (tests/kernels/test_rms_norm.py bounds it).

Replaces torch's float/pow/mean/add/rsqrt/mul/cast/mul chain (~8 launches, ~10 with the
residual add) by one. One program per row: memory traffic read T*H*(1 or 2) + H, write
T*H*(1 or 2) values of the dtype. Reference: `reference` below.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kvloft.kernels import checks
from kvloft.kernels.rounding import round_to

__all__ = ["MAX_HIDDEN", "reference", "rms_norm", "rms_norm_unchecked"]

MAX_HIDDEN = 65536  # a row is held in registers by one program (next_pow2(H) fp32 values)


@triton.jit(do_not_specialize=["n_cols", "eps"])
def _rms_norm_kernel(
    x,  # [T, H] any float dtype, last dim contiguous
    res,  # [T, H] the residual added to x (HAS_RES), last dim contiguous
    w,  # [H] the norm weight
    out,  # [T, H] contiguous: the normed rows
    res_out,  # [T, H] contiguous: x + res (HAS_RES)
    n_cols,
    eps,
    stride_x,
    stride_r,
    HAS_RES: tl.constexpr,
    BLOCK: tl.constexpr,  # next_pow2(H): the whole row in one program
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    xv = tl.load(x + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        rv = tl.load(res + row * stride_r + cols, mask=mask, other=0.0)
        xv = round_to(xv.to(tl.float32) + rv.to(tl.float32), res_out.dtype.element_ty)  # torch's add: one rounding
        tl.store(res_out + row * n_cols + cols, xv, mask=mask)
    xf = xv.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    normed = round_to(xf * rstd, xv.dtype).to(tl.float32)  # cast to the dtype before the weight, as HF
    wv = tl.load(w + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out + row * n_cols + cols, round_to(normed * wv, out.dtype.element_ty), mask=mask)


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """x [T, H], weight [H], residual None or [T, H] (x's dtype) -> (y [T, H], s [T, H]).

    s = x + residual (x itself without one); y = RMSNorm(s) * weight in the dtype torch's
    `weight * normed.to(x.dtype)` has. Last dims must be contiguous (row strides are free)."""
    _validate(x, weight, residual)
    return rms_norm_unchecked(x, weight, eps, residual)


def rms_norm_unchecked(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None) -> tuple[Tensor, Tensor]:
    """rms_norm without the argument checks: for a declared route (kernels/gpu_layer.py), whose
    shapes were checked once."""
    t, h = x.shape
    dtype = x.dtype if weight.dtype == x.dtype else torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty((t, h), dtype=dtype, device=x.device)
    res_out = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else x
    if t == 0:
        return out, res_out
    block = checks.next_pow2(h)
    _rms_norm_kernel[(t,)](
        x, residual if residual is not None else x, weight, out, res_out, h, float(eps),
        x.stride(0), residual.stride(0) if residual is not None else 0,
        HAS_RES=residual is not None, BLOCK=block, num_warps=max(1, min(16, block // 256)),
    )  # fmt: skip
    return out, res_out


def _validate(x: Tensor, weight: Tensor, residual: Tensor | None) -> None:
    checks.require_dim("rms_norm: x", x, 2, "[T, H]")
    checks.require_runnable(x.device, _rms_norm_kernel, "rms_norm")
    checks.require_float("rms_norm: x", x)
    h = x.shape[1]
    if not 0 < h <= MAX_HIDDEN:
        raise ValueError(f"rms_norm: hidden size must be in 1..{MAX_HIDDEN}, got {h}; use the torch RMSNorm")
    if weight.shape != (h,) or weight.stride(0) != 1:
        raise ValueError(f"rms_norm: weight must be contiguous [{h}], got shape {tuple(weight.shape)}")
    if x.stride(1) != 1:
        raise ValueError("rms_norm: x's last dim must be contiguous; pass x.contiguous()")
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(1) != 1:
            raise ValueError(f"rms_norm: residual must be [T, H] {x.dtype} with a contiguous last dim like x "
                             f"{tuple(x.shape)}, got {tuple(residual.shape)} {residual.dtype}")
        checks.require_same_device("rms_norm", x, residual=residual)
    checks.require_same_device("rms_norm", x, weight=weight)


def reference(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The torch arithmetic the kernel replaces (runtime/model.py RMSNorm.forward for 16-bit x)."""
    s = x if residual is None else residual + x
    xf = s.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(s.dtype), s

"""SwiGLU's activation, silu(gate) * up, in one Triton launch.

    out = silu(gate).to(dtype) * up      (silu in fp32, as torch's F.silu on 16-bit input)

gate and up may be the two halves of one fused [T, 2I] GEMM output (their own row strides);
out is [T, I] contiguous. Torch's F.silu(gate) * up is two launches and a [T, I] temporary;
here one: read 2 T I, write T I values. Equal to torch up to the fp32 exp (tests bound it).
Reference: `reference` below.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from kvloft.kernels import checks
from kvloft.kernels.rounding import round_to

__all__ = ["reference", "silu_mul", "silu_mul_unchecked"]

BLOCK = 1024  # columns a program


@triton.jit(do_not_specialize=["n_cols"])
def _silu_mul_kernel(
    gate, up,  # [T, I] each, last dim contiguous, own row strides
    out,  # [T, I] contiguous
    n_cols,
    stride_g, stride_u,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(gate + row * stride_g + cols, mask=mask, other=0.0)
    u = tl.load(up + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    gf = g.to(tl.float32)
    act = round_to(gf / (1.0 + tl.exp(-gf)), g.dtype).to(tl.float32)  # F.silu: fp32, rounded to the dtype
    tl.store(out + row * n_cols + cols, round_to(act * u, out.dtype.element_ty), mask=mask)


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """gate, up [T, I] (one dtype, last dims contiguous, any row stride) -> silu(gate) * up [T, I]."""
    for name, x in (("gate", gate), ("up", up)):
        checks.require_dim(f"silu_mul: {name}", x, 2, "[T, I]")
        checks.require_float(f"silu_mul: {name}", x, gate.dtype)
        if x.shape != gate.shape or x.stride(1) != 1:
            raise ValueError(f"silu_mul: {name} must be [T, I] = {tuple(gate.shape)} with a contiguous last dim, "
                             f"got {tuple(x.shape)} strides {x.stride()}")
    checks.require_runnable(gate.device, _silu_mul_kernel, "silu_mul")
    checks.require_same_device("silu_mul", gate, up=up)
    return silu_mul_unchecked(gate, up)


def silu_mul_unchecked(gate: Tensor, up: Tensor) -> Tensor:
    """silu_mul without the argument checks: for a declared route (kernels/gpu_layer.py)."""
    t, n = gate.shape
    out = torch.empty((t, n), dtype=gate.dtype, device=gate.device)
    if t and n:
        _silu_mul_kernel[(t, triton.cdiv(n, BLOCK))](gate, up, out, n, gate.stride(0), up.stride(0), BLOCK=BLOCK)
    return out


def reference(gate: Tensor, up: Tensor) -> Tensor:
    """The torch arithmetic the kernel replaces (runtime/model.py MLP)."""
    return F.silu(gate) * up

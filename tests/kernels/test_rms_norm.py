"""Triton RMSNorm (with and without the residual add) vs runtime/model.py's RMSNorm arithmetic
(CPU: the interpreter). bf16/fp16: equal bit for bit here (every rounding is torch's; the fp32
sum of squares came out the same); the bound for any dtype: the kernel's error against fp64
at most 2x torch's plus one ulp of the output (the sum's order is the kernel's own)."""

from __future__ import annotations

import pytest
import torch

from kvloft.kernels import rms_norm as rn
from kvloft.runtime.model import RMSNorm


def _fp64(x, w, eps, r):
    s = (x.double() + r.double()) if r is not None else x.double()
    return w.double() * s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)


def _rows(t, h, dtype, stride_pad=0):
    x = torch.randn(t, h + stride_pad).to(dtype)[:, :h]  # a row stride wider than H: slices pass
    return x


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t,h", [(1, 100), (3, 96), (16, 144), (5, 1)])
@pytest.mark.parametrize("residual", [False, True])
def test_matches_the_module(dtype, t, h, residual):
    norm = RMSNorm(h, 1e-5).to(dtype)
    torch.nn.init.normal_(norm.weight, 1.0, 0.3)
    x, r = _rows(t, h, dtype, stride_pad=3), _rows(t, h, dtype) if residual else None
    y, s = rn.rms_norm(x, norm.weight, norm.eps, r)
    want_s = x + r if residual else x
    assert torch.equal(s, want_s)
    want = norm(want_s)
    assert y.dtype == want.dtype and y.shape == (t, h)
    assert torch.equal(y, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_error_bound_against_fp64(dtype):
    x, r = 5 * torch.randn(7, 1000).to(dtype), torch.randn(7, 1000).to(dtype)
    w = (1 + 0.1 * torch.randn(1000)).to(dtype)
    y, _ = rn.rms_norm(x, w, 1e-6, r)
    base, _ = rn.reference(x, w, 1e-6, r)
    exact = _fp64(x, w, 1e-6, r)
    ulp = torch.finfo(dtype).eps * exact.abs().max().item()
    assert (y.double() - exact).abs().max() <= 2 * (base.double() - exact).abs().max() + ulp


def test_bad_arguments_name_the_fix():
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="weight must be contiguous"):
        rn.rms_norm(x, torch.ones(7, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(ValueError, match="residual must be"):
        rn.rms_norm(x, torch.ones(8, dtype=torch.bfloat16), 1e-5, torch.randn(2, 8))
    with pytest.raises(ValueError, match="last dim must be contiguous"):
        rn.rms_norm(x.t().contiguous().t(), torch.ones(8, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(ValueError, match="must be \\[T, H\\]"):
        rn.rms_norm(x[0], torch.ones(8, dtype=torch.bfloat16), 1e-5)

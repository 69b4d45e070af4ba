"""Triton silu(gate) * up vs the MLP's F.silu(gate) * up (CPU: the interpreter), from the two
halves of one fused gate/up GEMM output. bf16/fp16: every rounding is torch's, but exp is the
kernel's own (numpy's here, torch's vectorized one on the CPU): silu may round to the next
value, so under 1% of the outputs differ, each by at most two ulps. For any dtype: the
kernel's error against fp64 at most 2x torch's plus an ulp."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvloft.kernels import silu_mul as sm


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t,n", [(1, 100), (3, 96), (16, 288), (2, 2500)])
def test_matches_torch_from_fused_halves(dtype, t, n):
    gu = (3 * torch.randn(t, 2 * n)).to(dtype)
    g, u = gu[:, :n], gu[:, n:]
    got = sm.silu_mul(g, u)
    assert got.shape == (t, n) and got.is_contiguous()
    want = F.silu(g) * u
    diff = got != want
    assert diff.float().mean() < 0.01, f"{int(diff.sum())} of {diff.numel()} values differ"
    assert ((got.double() - want.double()).abs() <= 2 * torch.finfo(dtype).eps * want.double().abs()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_error_bound_against_fp64(dtype):
    g, u = (4 * torch.randn(5, 777)).to(dtype), torch.randn(5, 777).to(dtype)
    exact = F.silu(g.double()) * u.double()
    ulp = torch.finfo(dtype).eps * exact.abs().max().item()
    err = (sm.silu_mul(g, u).double() - exact).abs().max()
    assert err <= 2 * (sm.reference(g, u).double() - exact).abs().max() + ulp


def test_bad_arguments_name_the_fix():
    g = torch.randn(2, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="must be \\[T, I\\]"):
        sm.silu_mul(g, g[:, :4])
    with pytest.raises(TypeError, match="cast both"):
        sm.silu_mul(g, g.float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nan_inf_and_overflow_round_as_torch(dtype):
    big = torch.finfo(dtype).max
    g = torch.tensor([[float("nan"), float("inf"), -float("inf"), 3.0, big, 1.0]]).to(dtype)
    u = torch.tensor([[1.0, 2.0, 1.0, float("nan"), 4.0, big]]).to(dtype)  # big * 4, silu(1) * max: overflow
    got, want = sm.silu_mul(g, u), F.silu(g) * u
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got[~want.isnan()], want[~want.isnan()])

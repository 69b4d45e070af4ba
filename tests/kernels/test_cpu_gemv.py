"""kernels/cpu_gemv.py (few-row fp32 linear, compiled) against F.linear and an fp64 oracle:
its error at most 2x F.linear's fp32 error plus 1e-6 (both against fp64), on awkward shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvloft.kernels import cpu_gemv


def _err(got, want):
    return (got.double() - want).abs().max().item()


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 13, 16])
@pytest.mark.parametrize("n_in,n_out,bias", [(576, 1536, False), (97, 1025, True), (13, 7, True), (1, 3, False)])
def test_within_twice_f_linear_error(rows, n_in, n_out, bias, parallel, monkeypatch):
    monkeypatch.setattr(cpu_gemv, "PARALLEL_MIN_BYTES", 0 if parallel else None)
    gen = torch.Generator().manual_seed(rows * 1000 + n_in)
    x = torch.randn(rows, n_in, generator=gen)
    w = torch.randn(n_out, n_in, generator=gen) / n_in**0.5
    b = torch.randn(n_out, generator=gen) if bias else None
    out = cpu_gemv.linear(x, w, b)
    plain = F.linear(x, w, b)
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert out.shape == (rows, n_out) and out.dtype == torch.float32
    assert _err(out, want) <= 2 * _err(plain, want) + 1e-6


def test_leading_dims_and_strided_input():
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(33, 20, generator=gen), torch.randn(33, generator=gen)
    x = torch.randn(2, 3, 40, generator=gen)[..., ::2]  # [2, 3, 20], every other column
    assert not x.is_contiguous()
    out = cpu_gemv.linear(x, w, b)
    want = F.linear(x.double(), w.double(), b.double())
    assert out.shape == (2, 3, 33)
    assert _err(out, want) <= 2 * _err(F.linear(x, w, b), want) + 1e-6
    empty = cpu_gemv.linear(x[:0], w, b)
    assert empty.shape == (0, 3, 33)


def test_refuses_what_it_cannot_take():
    w = torch.randn(8, 16)
    assert not cpu_gemv.applies(torch.randn(cpu_gemv.MAX_ROWS + 1, 16), w)
    for x, wt, b in [(torch.randn(2, 16).double(), w.double(), None),      # fp64
                     (torch.randn(2, 16), w.t().contiguous().t(), None),    # weight not contiguous
                     (torch.randn(2, 15), w, None),                         # inner size differs
                     (torch.randn(2, 16), w, torch.randn(7)),               # bias of the wrong size
                     (torch.randn(cpu_gemv.MAX_ROWS + 1, 16), w, None)]:    # too many rows
        with pytest.raises(ValueError, match="F.linear"):
            cpu_gemv.linear(x, wt, b)

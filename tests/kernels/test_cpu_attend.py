"""reference.attend on CPU tensors (ATen's fused flash attention for the CPU, bottom-right
causal split) against the written-out oracle attend_math in fp64."""

from __future__ import annotations

import pytest
import torch

from kvloft.kernels import reference


def _qkv(tq, tk, hq, hkv, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(tq, hq, d, generator=gen)
    # keys and values as views into a larger token-major buffer, as the KV stores hand them out
    k = torch.randn(tk + 7, hkv, d, generator=gen)[:tk]
    v = torch.randn(tk + 7, hkv, d, generator=gen)[:tk]
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _err(got, want):
    return (got.double() - want.double()).abs().nan_to_num(0.0).max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tq,tk,hq,hkv,d,causal", [
    (97, 1025, 9, 3, 64, True),   # a chunk after a long prefix, GQA group of 3
    (97, 97, 9, 3, 59, True),     # square causal, odd head dim
    (1, 1025, 9, 3, 64, False),   # one decode token
    (1, 33, 7, 7, 16, True),      # MHA, causal with one query
    (64, 300, 8, 2, 32, False),
    (5, 77, 9, 3, 59, False),     # several queries of a group as rows of one head, odd head dim
    (3, 50, 7, 7, 16, False),     # MHA without a mask (groups of one)
])
def test_fused_route_within_twice_the_plain_error(dtype, tq, tk, hq, hkv, d, causal):
    q, k, v = _qkv(tq, tk, hq, hkv, d, dtype)
    assert reference._fused_cpu_ok(q, k, v)
    out, lse = reference.attend(q, k, v, scale=d**-0.5, causal=causal)
    plain_out, plain_lse = reference.attend_math(q, k, v, scale=d**-0.5, causal=causal)
    want_out, want_lse = reference.attend_math(q.double(), k.double(), v.double(), scale=d**-0.5, causal=causal)
    assert out.dtype == dtype and out.shape == (tq, hq, d)
    assert lse.dtype == torch.float32 and lse.shape == (tq, hq)
    # attend_math upcasts bf16 inputs to fp32 before the logits; the fused kernel keeps some
    # bf16 products, so in bf16 both results get a margin of about one bf16 ulp (2^-8) on top
    eps_out, eps_lse = (1e-6, 1e-5) if dtype == torch.float32 else (1e-3, 2e-4)
    assert _err(out, want_out) <= 2 * _err(plain_out, want_out) + eps_out
    assert _err(lse, want_lse) <= 2 * _err(plain_lse, want_lse) + eps_lse


def test_more_queries_than_keys_and_no_keys_take_the_oracle():
    q, k, v = _qkv(12, 5, 4, 2, 8, torch.float32)
    out, lse = reference.attend(q, k, v, scale=0.3, causal=True)  # the first 7 queries see nothing
    want_out, want_lse = reference.attend_math(q, k, v, scale=0.3, causal=True)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    assert bool(torch.isneginf(lse[:7]).all())
    out, lse = reference.attend(q, k[:0], v[:0], scale=0.3)
    assert bool((out == 0).all()) and bool(torch.isneginf(lse).all())


def test_fp64_stays_the_oracle():
    q, k, v = _qkv(5, 40, 9, 3, 16, torch.float64)
    assert not reference._fused_cpu_ok(q, k, v)
    out, lse = reference.attend(q, k, v, scale=0.25, causal=True)
    want_out, want_lse = reference.attend_math(q, k, v, scale=0.25, causal=True)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tk,hq,hkv,d", [(1025, 9, 3, 64), (33, 7, 7, 59), (1, 12, 2, 16)])
def test_decode_attend_straight_into_flash(dtype, tk, hq, hkv, d, monkeypatch):
    """decode_attend's direct call (one token: [H_kv, 1, g, D]) against the fp64 oracle, keys
    and values as strided views of a token-major buffer (fp32 with the compiled kernel of
    kernels/cpu_attend.py switched off: tests/kernels/test_cpu_attend_decode.py tests that one)."""
    from kvloft.kernels import cpu_attend

    monkeypatch.setattr(cpu_attend, "enabled", False)
    q, k, v = _qkv(1, tk, hq, hkv, d, dtype, seed=tk)
    out, lse = reference.decode_attend(q[0], k, v, scale=d**-0.5)
    want, want_lse = reference.attend_math(q.double(), k.double(), v.double(), scale=d**-0.5)
    assert out.shape == (hq, d) and out.dtype == dtype and lse.shape == (hq,) and lse.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), want[0], rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), want_lse[0], rtol=tol, atol=tol)

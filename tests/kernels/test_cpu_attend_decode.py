"""kernels/cpu_attend.py (dense decode over token-major K/V, compiled) against the fp64 oracle
reference.attend_math: its error at most 2x that of the plain fp32 torch route plus 1e-6."""

from __future__ import annotations

import pytest
import torch

from kvloft.kernels import cpu_attend, cpu_split, reference


def _qkv(tk, hq, hkv, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(hq, d, generator=gen)
    # the first rows of a larger buffer, as DenseKV hands them out (contiguous)
    k = torch.randn(tk + 7, hkv, d, generator=gen)[:tk] * 2.0  # spread logits: a peaked softmax
    v = torch.randn(tk + 7, hkv, d, generator=gen)[:tk]
    return q, k, v


def _err(got, want):
    return (got.double() - want.double()).abs().max().item()


@pytest.mark.parametrize("tk,hq,hkv,d", [
    (1025, 9, 3, 64),  # SmolLM2's heads, one row past four blocks
    (97, 9, 3, 59),    # odd head dim, one partial block
    (1, 12, 2, 16),    # one key
    (256, 7, 7, 16),   # MHA, exactly one block
    (3000, 8, 1, 32),  # MQA, many blocks merged
    (513, 6, 2, 128),
])
@pytest.mark.parametrize("mode", ["serial", "openmp", "split"])
def test_within_twice_the_plain_error(tk, hq, hkv, d, mode, monkeypatch):
    monkeypatch.setattr(cpu_attend, "PARALLEL_MIN_BYTES", 0 if mode == "openmp" else None)
    monkeypatch.setattr(cpu_attend, "SPLIT", cpu_split.helper(True) if mode == "split" else None)
    q, k, v = _qkv(tk, hq, hkv, d, seed=tk)
    assert cpu_attend.applies(q, k, v)
    scale = d**-0.5
    out, lse = cpu_attend.decode_attend(q, k, v, scale=scale)
    plain_out, plain_lse = reference.attend_math(q[None], k, v, scale=scale)
    want_out, want_lse = reference.attend_math(q[None].double(), k.double(), v.double(), scale=scale)
    assert out.shape == (hq, d) and out.dtype == torch.float32
    assert lse.shape == (hq,) and lse.dtype == torch.float32
    assert _err(out, want_out[0]) <= 2 * _err(plain_out[0], want_out[0]) + 1e-6
    assert _err(lse, want_lse[0]) <= 2 * _err(plain_lse[0], want_lse[0]) + 1e-6


def test_reference_decode_attend_takes_it_for_fp32_and_not_elsewhere(monkeypatch):
    q, k, v = _qkv(300, 9, 3, 64)
    calls = []
    want_out, want_lse = cpu_attend.decode_attend(q, k, v, scale=0.125)
    real = cpu_attend.decode_attend_unchecked
    monkeypatch.setattr(cpu_attend, "decode_attend_unchecked", lambda *a: calls.append(1) or real(*a))
    out, lse = reference.decode_attend(q, k, v, scale=0.125)
    assert calls == [1] and torch.equal(out, want_out) and torch.equal(lse, want_lse)
    reference.decode_attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), scale=0.125)  # ATen's route
    wide = torch.randn(300, 2, 3, 64)[:, 0]  # token-major rows with a gap: not contiguous
    reference.decode_attend(q, wide, v, scale=0.125)
    assert calls == [1]


def test_no_keys_and_refused_inputs():
    q, k, v = _qkv(0, 4, 2, 8)
    out, lse = cpu_attend.decode_attend(q, k, v, scale=0.3)
    assert bool((out == 0).all()) and bool(torch.isneginf(lse).all())
    q, k, v = _qkv(10, 4, 2, 8)
    with pytest.raises(ValueError, match="reference.decode_attend"):
        cpu_attend.decode_attend(q.double(), k.double(), v.double(), scale=0.3)
    with pytest.raises(ValueError, match="contiguous"):
        cpu_attend.decode_attend(q, k.transpose(0, 1).contiguous().transpose(0, 1), v, scale=0.3)
    with pytest.raises(ValueError):
        cpu_attend.decode_attend(q[:3], k, v, scale=0.3)  # 3 query heads over 2 KV heads


@pytest.mark.parametrize("where", ["k", "v"])
def test_a_nan_in_the_cache_reaches_the_output(where):
    """fast-math keeps NaN semantics (numba_flags.FASTMATH_FINITE): the session's non-finite
    check sees a corrupted row through this kernel's output."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(9, 64, generator=g)
    k, v = torch.randn(700, 3, 64, generator=g), torch.randn(700, 3, 64, generator=g)
    (k if where == "k" else v)[300, 1, 5] = float("nan")
    out, _ = cpu_attend.decode_attend_unchecked(q, k, v, 0.125)
    assert not torch.isfinite(out).all()

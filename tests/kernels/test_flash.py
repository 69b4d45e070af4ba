"""Prefill attention through PyTorch's fused kernel (kernels/flash.py) against the reference."""

from __future__ import annotations

import pytest
import torch

from kvloft.kernels import flash, reference


def _close(got, want, atol, rtol=0.0):
    err = (got.float() - want.float()).abs()
    assert bool((err <= atol + rtol * want.float().abs()).all()), f"max error {err.max().item():.3g}"


def _qkv(tq, tk, hq, hkv, d, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(t, h, d, generator=gen) for t, h in ((tq, hq), (tk, hkv), (tk, hkv)))
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


@pytest.mark.parametrize("tq,tk,causal", [(7, 7, True), (5, 40, True), (6, 33, False), (1, 9, True)])
def test_bottom_right_causal_split_equals_reference(monkeypatch, tq, tk, causal):
    # The fused kernel aligns its causal mask top-left; the split into an unmasked prefix and a
    # square causal part must give the reference's bottom-right result. Emulated on the CPU.
    def fused(q, k, v, scale, causal):
        assert not causal or q.shape[0] == k.shape[0]  # only square causal calls reach the kernel
        return reference.attend(q, k, v, scale=scale, causal=causal)

    monkeypatch.setattr(flash, "fused_supported", lambda q, k: True)
    monkeypatch.setattr(flash, "_fused", fused)
    q, k, v = _qkv(tq, tk, 9, 3, 16, torch.float64)
    out, lse = flash.attend(q, k, v, scale=0.25, causal=causal)
    ref_out, ref_lse = reference.attend(q, k, v, scale=0.25, causal=causal)
    _close(out, ref_out, 1e-10)
    _close(lse, ref_lse, 1e-10)


def test_cpu_tensors_take_the_reference():
    q, k, v = _qkv(4, 12, 4, 2, 8)
    assert not flash.fused_supported(q, k)
    out, lse = flash.attend(q, k, v, scale=0.3, causal=True)
    ref_out, ref_lse = reference.attend(q, k, v, scale=0.3, causal=True)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tq,tk,hq,hkv,d,causal", [
    (512, 512, 32, 8, 128, True), (512, 4608, 32, 8, 128, True), (300, 4096, 28, 4, 128, False),
    (77, 1000, 9, 3, 64, True), (1, 2048, 32, 8, 128, True),
])
def test_fused_matches_reference_cuda(dtype, tq, tk, hq, hkv, d, causal):
    q, k, v = _qkv(tq, tk, hq, hkv, d, dtype, "cuda")
    assert flash.fused_supported(q, k)
    out, lse = flash.attend(q, k, v, scale=d**-0.5, causal=causal)
    ref_out, ref_lse = reference.attend(q.double(), k.double(), v.double(), scale=d**-0.5, causal=causal)
    assert out.dtype == dtype and lse.dtype == torch.float32
    _close(out, ref_out, 2e-2, 2e-2)
    _close(lse, ref_lse, 1e-2, 1e-3)

"""Prefill attention through PyTorch's fused kernel (kernels/flash.py) against the reference."""

from __future__ import annotations

import pytest
import torch

from kvloft.kernels import REFERENCE, flash, reference


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

    monkeypatch.setattr(flash, "flash_supported", lambda q, k: False)  # a card without flash
    monkeypatch.setattr(flash, "fused_supported", lambda q, k: True)
    monkeypatch.setattr(flash, "_fused", fused)
    q, k, v = _qkv(tq, tk, 9, 3, 16, torch.float64)
    out, lse = flash.attend(q, k, v, scale=0.25, causal=causal)
    ref_out, ref_lse = reference.attend(q, k, v, scale=0.25, causal=causal)
    _close(out, ref_out, 1e-10)
    _close(lse, ref_lse, 1e-10)


# awkward shapes: a chunk shorter than its keys (L < S) and square (L = S), one query, lengths
# 97 and 1025, GQA groups of 3 (9/3) and 7 (14/2), head dims 16 and 64
AWKWARD = [(5, 40, 9, 3, 16), (7, 7, 9, 3, 16), (1, 9, 14, 2, 64), (97, 1025, 14, 2, 64),
           (97, 97, 14, 2, 64), (33, 130, 4, 4, 32)]


@pytest.mark.parametrize("gqa", [True, False])
@pytest.mark.parametrize("tq,tk,hq,hkv,d", AWKWARD)
def test_sdpa_lower_right_equals_reference(monkeypatch, gqa, tq, tk, hq, hkv, d):
    # public SDPA with causal_lower_right (CPU: a materialized mask) against the fp64 oracle;
    # without enable_gqa (torch 2.4) K and V are expanded instead
    monkeypatch.setattr(flash, "_ENABLE_GQA", gqa and flash._ENABLE_GQA)
    q, k, v = _qkv(tq, tk, hq, hkv, d, torch.float64, seed=tq + tk)
    out = flash.sdpa_causal(q, k, v, scale=d**-0.5)
    ref, _ = reference.attend_math(q, k, v, scale=d**-0.5, causal=True)
    assert out.shape == (tq, hq, d) and out.dtype == torch.float64
    _close(out, ref, 1e-10)


def test_sdpa_lower_right_fp32_within_twice_the_references_error():
    # the flash-attention tolerance rule: error against fp64 at most 2x (+ eps) the fp32 reference's
    q, k, v = _qkv(97, 1025, 14, 2, 64, torch.float64, seed=3)
    want, _ = reference.attend_math(q, k, v, scale=0.125, causal=True)
    got = flash.sdpa_causal(q.float(), k.float(), v.float(), scale=0.125)
    plain, _ = reference.attend_math(q.float(), k.float(), v.float(), scale=0.125, causal=True)
    err, base = (got.double() - want).abs().max(), (plain.double() - want).abs().max()
    assert err <= 2 * base + 1e-6, (err, base)


def test_sdpa_lower_right_refuses_more_queries_than_keys():
    q, k, v = _qkv(9, 4, 9, 3, 16)
    with pytest.raises(ValueError, match="Tq <= Tk"):
        flash.sdpa_causal(q, k, v, scale=0.25)


@pytest.mark.parametrize("tq,tk,hq,hkv,d", AWKWARD[:4])
def test_causal_attend_routes(monkeypatch, tq, tk, hq, hkv, d):
    # CPU tensors: the reference's out; with the flash route forced, the SDPA wrapper: both the
    # reference's result (KernelSet.causal_attend of either set)
    q, k, v = _qkv(tq, tk, hq, hkv, d, seed=tk)
    ref, _ = reference.attend(q, k, v, scale=0.3, causal=True)
    assert torch.equal(flash.causal_attend(q, k, v, scale=0.3), ref)
    assert torch.equal(REFERENCE.causal_attend(q, k, v, scale=0.3), ref)
    monkeypatch.setattr(flash, "flash_supported", lambda q, k: True)
    _close(flash.causal_attend(q, k, v, scale=0.3), ref, 1e-5)


def _flash_emulated(q, k, v, dropout, *, is_causal, scale):
    """aten._scaled_dot_product_flash_attention's contract on the CPU: q [1, H_q, Tq, D],
    k, v [1, H_kv, Tk, D] (GQA), causal lower-right -> (out [1, H_q, Tq, D], lse [1, H_q, Tq])."""
    assert dropout == 0.0 and (q.shape[2] <= k.shape[2] or not is_causal)
    tq = lambda x: x[0].transpose(0, 1)
    out, lse = reference.attend_math(tq(q), tq(k), tq(v), scale=scale, causal=is_causal)
    return out.transpose(0, 1)[None], lse.transpose(0, 1)[None]


@pytest.mark.parametrize("tq,tk,causal", [(7, 7, True), (5, 40, True), (6, 33, False), (1, 9, True)])
def test_flash_route_is_one_call_with_the_lse(monkeypatch, tq, tk, causal):
    # the flash route's layout (no K/V copy, lse sliced and transposed) with the op emulated
    calls = []
    monkeypatch.setattr(flash, "flash_supported", lambda q, k: True)
    monkeypatch.setattr(flash, "_FLASH", lambda *a, **kw: calls.append(a[1].shape) or _flash_emulated(*a, **kw))
    q, k, v = _qkv(tq, tk, 14, 2, 16, torch.float64)
    out, lse = flash.attend(q, k, v, scale=0.25, causal=causal)
    ref_out, ref_lse = reference.attend(q, k, v, scale=0.25, causal=causal)
    assert calls == [(1, 2, tk, 16)]  # one launch, the KV heads as they are
    _close(out, ref_out, 1e-10)
    _close(lse, ref_lse, 1e-10)


def _cudnn_emulated(q, k, v, bias, lse, dropout, is_causal, debug, *, scale):
    """aten._scaled_dot_product_cudnn_attention's contract on the CPU: q [1, H_q, Tq, D],
    k, v [1, H_kv, Tk, D] (GQA), causal top-left -> (out [1, H_q, Tq, D], lse [1, H_q, Tq, 1], ...)."""
    assert bias is None and lse and dropout == 0.0 and not debug
    assert not is_causal or q.shape[2] == k.shape[2], "only square causal calls reach cuDNN"
    tq = lambda x: x[0].transpose(0, 1)
    out, lse = reference.attend_math(tq(q), tq(k), tq(v), scale=scale, causal=is_causal)
    return out.transpose(0, 1)[None], lse.transpose(0, 1)[None, ..., None], None


@pytest.mark.parametrize("tq,tk,causal", [(7, 7, True), (5, 40, True), (6, 33, False), (1, 9, True), (33, 34, True)])
def test_cudnn_route_splits_a_short_chunk_into_prefix_and_square(monkeypatch, tq, tk, causal):
    # a causal chunk shorter than its keys: two calls (the unmasked prefix, the causal square),
    # merged; square and unmasked calls: one. The op emulated on the CPU, against the reference.
    calls = []
    monkeypatch.setattr(flash, "cudnn_supported", lambda q, k: True)
    monkeypatch.setattr(flash, "flash_supported", lambda q, k: True)
    monkeypatch.setattr(flash, "_FLASH", None)  # the flash op must not be reached on this route
    monkeypatch.setattr(flash, "_CUDNN", lambda *a, **kw: calls.append((a[1].shape[2], a[6])) or _cudnn_emulated(*a, **kw))
    q, k, v = _qkv(tq, tk, 14, 2, 16, torch.float64, seed=tq * tk)
    ref_out, ref_lse = reference.attend(q, k, v, scale=0.25, causal=causal)
    if causal and tq < tk:
        out, lse = flash.attend(q, k, v, scale=0.25, causal=True)
        assert calls == [(tk - tq, False), (tq, True)]
        # the merge weights come from fp32 lse (the op's), so fp32's rounding bounds the error
        _close(out, ref_out, 1e-6)
        _close(lse, ref_lse, 1e-6)
        assert out.is_contiguous() and out.shape == (tq, 14, 16)
        _close(flash.causal_attend(q, k, v, scale=0.25), ref_out, 1e-6)
    else:
        monkeypatch.setattr(flash, "_FLASH", lambda *a, **kw: _flash_emulated(*a, **kw))
        out, lse = flash.attend(q, k, v, scale=0.25, causal=causal)
        assert calls == []  # the flash route keeps square and unmasked calls
        _close(out, ref_out, 1e-10)


def test_workspace_of_the_flash_route_does_not_grow_with_the_keys():
    small = flash.workspace_bytes(512, 1024, 32, 8, 128, 2, fused=True)
    assert small == flash.workspace_bytes(512, 131072, 32, 8, 128, 2, fused=True)
    # the reference holds the [H_q, Tq, Tk] fp32 logits
    assert flash.workspace_bytes(512, 131072, 32, 8, 128, 2, fused=False) >= 32 * 512 * 131072 * 4


def test_cpu_tensors_take_the_reference():
    q, k, v = _qkv(4, 12, 4, 2, 8)
    assert not flash.fused_supported(q, k) and not flash.flash_supported(q, k)
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


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tq,tk,hq,hkv,d", [
    (512, 512, 32, 8, 128), (512, 4608, 32, 8, 128), (97, 1025, 14, 2, 64), (1, 2048, 14, 2, 64),
    (1024, 9000, 14, 2, 64), (77, 1000, 9, 3, 64),
])
def test_flash_and_sdpa_lower_right_match_reference_cuda(dtype, tq, tk, hq, hkv, d):
    # the flash route (with lse) and the out-only SDPA wrapper, GQA read in place, lower-right
    q, k, v = _qkv(tq, tk, hq, hkv, d, dtype, "cuda")
    assert flash.flash_supported(q, k), "an sm80+ card takes the flash route"
    ref_out, ref_lse = reference.attend(q.double(), k.double(), v.double(), scale=d**-0.5, causal=True)
    out, lse = flash.attend(q, k, v, scale=d**-0.5, causal=True)
    _close(out, ref_out, 2e-2, 2e-2)
    _close(lse, ref_lse, 1e-2, 1e-3)
    _close(flash.causal_attend(q, k, v, scale=d**-0.5), ref_out, 2e-2, 2e-2)
    _close(flash.sdpa_causal(q, k, v, scale=d**-0.5), ref_out, 2e-2, 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("tq,tk,hq,hkv,d", [
    (512, 4608, 32, 8, 128), (97, 1025, 14, 2, 64), (1024, 9000, 14, 2, 64), (77, 1000, 9, 3, 64),
    (2048, 4096, 14, 2, 64),
])
def test_cudnn_split_matches_reference_cuda(monkeypatch, tq, tk, hq, hkv, d):
    # sm90/sm100: the short chunk's two cuDNN calls, GQA read in place, against the fp64 oracle
    # (the route's minimum chunk lowered to these shapes; at the default they keep flash)
    q, k, v = _qkv(tq, tk, hq, hkv, d, torch.bfloat16, "cuda")
    assert not flash.cudnn_supported(q, k), f"chunks under {flash.CUDNN_MIN_QUERIES} queries keep flash"
    monkeypatch.setattr(flash, "CUDNN_MIN_QUERIES", 1)
    if not flash.cudnn_supported(q, k):
        pytest.skip("not an sm90/sm100 card, or cuDNN attention is off")
    ref_out, ref_lse = reference.attend(q.double(), k.double(), v.double(), scale=d**-0.5, causal=True)
    out, lse = flash.attend(q, k, v, scale=d**-0.5, causal=True)
    _close(out, ref_out, 2e-2, 2e-2)
    _close(lse, ref_lse, 1e-2, 1e-3)
    _close(flash.causal_attend(q, k, v, scale=d**-0.5), ref_out, 2e-2, 2e-2)

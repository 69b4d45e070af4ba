"""Triton RoPE on q/k (and v copied out) vs runtime/model.py `rotate` (CPU: the interpreter).
Inputs as the GPU route gives them: row-strided slices of one fused qkv GEMM output, or three
tensors. Equal bit for bit (bf16, fp16 and fp32): both take x*cos rounded, then rot*sin added
by a fused multiply-add (torch's addcmul on CUDA and on this CPU). fp32 also held to the
rule: the kernel's error against fp64 at most 2x torch's plus an ulp."""

from __future__ import annotations

import pytest
import torch

from kvloft.config import ModelConfig
from kvloft.kernels import rope_qkv as rq
from kvloft.runtime.model import Transformer, rope_inv_freq, rotate


def _cos_sin(t, d, start=0):
    cfg = ModelConfig(hidden_size=d * 4, n_heads=4, n_kv_heads=4, head_dim=d, rope_theta=10000.0)
    net = Transformer.__new__(Transformer)
    torch.nn.Module.__init__(net)
    net.register_buffer("inv_freq", rope_inv_freq(cfg))
    return Transformer.rope(net, torch.arange(start, start + t) * 977)  # [T, D] fp32 each, far positions


def _fused(t, hq, hkv, d, dtype):
    qkv = torch.randn(t, (hq + 2 * hkv) * d).to(dtype)
    return qkv[:, : hq * d], qkv[:, hq * d : (hq + hkv) * d], qkv[:, (hq + hkv) * d :]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("t,hkv,group,d", [(1, 8, 4, 64), (3, 2, 7, 32), (16, 3, 1, 64), (2, 1, 4, 16)])
def test_matches_rotate(dtype, t, hkv, group, d):
    hq = hkv * group
    q, k, v = _fused(t, hq, hkv, d, dtype)
    cos, sin = _cos_sin(t, d)
    gq, gk, gv = rq.rope_qkv(q, k, v, cos, sin, d)
    assert gq.shape == (t, hq, d) and gk.shape == (t, hkv, d) and gv.shape == (t, hkv, d)
    assert gq.is_contiguous() and gk.is_contiguous() and gv.is_contiguous()
    assert torch.equal(gq, rotate(q.reshape(t, hq, d), cos, sin))
    assert torch.equal(gk, rotate(k.reshape(t, hkv, d), cos, sin))
    assert torch.equal(gv, v.reshape(t, hkv, d))


def test_three_separate_inputs_and_the_reference():
    q, k, v = (torch.randn(3, w).to(torch.bfloat16) for w in (4 * 32, 2 * 32, 2 * 32))
    cos, sin = _cos_sin(3, 32, start=5)
    for got, want in zip(rq.rope_qkv(q, k, v, cos, sin, 32), rq.reference(q, k, v, cos, sin, 32)):
        assert torch.equal(got, want)


def test_fp32_error_bound_against_fp64():
    q, k, v = _fused(4, 6, 2, 64, torch.float32)
    cos, sin = _cos_sin(4, 64)
    got = rq.rope_qkv(q, k, v, cos, sin, 64)
    base = rq.reference(q, k, v, cos, sin, 64)
    exact = rq.reference(q.double(), k.double(), v.double(), cos.double(), sin.double(), 64)
    for g, b, e in zip(got, base, exact):
        ulp = torch.finfo(torch.float32).eps * e.abs().max().item()
        assert (g.double() - e).abs().max() <= 2 * (b.double() - e).abs().max() + ulp


def test_bad_arguments_name_the_fix():
    q, k, v = _fused(2, 4, 2, 32, torch.bfloat16)
    cos, sin = _cos_sin(2, 32)
    with pytest.raises(ValueError, match="head_dim must be even"):
        rq.rope_qkv(q, k, v, cos, sin, 31)
    with pytest.raises(ValueError, match="cos must be contiguous fp32"):
        rq.rope_qkv(q, k, v, cos.to(torch.bfloat16), sin, 32)
    with pytest.raises(TypeError, match="cast both"):
        rq.rope_qkv(q, k.float(), v, cos, sin, 32)
    with pytest.raises(ValueError, match="k and v alike"):
        rq.rope_qkv(q, k, v[:, :32], cos, sin, 32)

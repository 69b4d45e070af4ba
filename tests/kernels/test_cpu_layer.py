"""kernels/cpu_layer.py (a decoder layer's few-row arithmetic, compiled, split with a helper
thread) against the same arithmetic in torch fp32 and an fp64 oracle: its error at most 2x the
torch fp32 error plus 1e-5, on awkward shapes (7 query heads over 1 KV head, head dim 10, hidden
100, intermediate 150: partial chunks), with and without the helper thread and biases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvloft.kernels import cpu_layer, cpu_split

EPS = 1e-5


def _err(got, want):
    return (got.double() - want).abs().max().item()


def _rope(x, cos, sin):  # x [T, H, D], cos/sin [T, D]: HF rotate-half
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]


def _norm(x, w):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))


def _weights(hidden, hq, hkv, d, inter, bias, seed):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, s=1.0):
        return torch.randn(*shape, generator=gen) * s

    w = {"w_in": 1 + 0.1 * r(hidden), "wq": r(hq * d, hidden, s=hidden**-0.5), "wk": r(hkv * d, hidden, s=hidden**-0.5),
         "wv": r(hkv * d, hidden, s=hidden**-0.5), "wo": r(hidden, hq * d, s=(hq * d) ** -0.5),
         "w_post": 1 + 0.1 * r(hidden), "wg": r(inter, hidden, s=hidden**-0.5), "wu": r(inter, hidden, s=hidden**-0.5),
         "wd": r(hidden, inter, s=inter**-0.5)}
    w.update({"bq": r(hq * d), "bk": r(hkv * d), "bv": r(hkv * d)} if bias else {"bq": None, "bk": None, "bv": None})
    return w


def _reference(w, x, o, cos, sin, hq, hkv, d):  # the layer in torch, any dtype
    def lin(a, name, b=None):
        return F.linear(a, w[name].to(a.dtype), None if w.get(b) is None else w[b].to(a.dtype))
    h = _norm(x, w["w_in"].to(x.dtype))
    t = x.shape[0]
    q = _rope(lin(h, "wq", "bq").view(t, hq, d), cos.to(x.dtype), sin.to(x.dtype))
    k = _rope(lin(h, "wk", "bk").view(t, hkv, d), cos.to(x.dtype), sin.to(x.dtype))
    v = lin(h, "wv", "bv").view(t, hkv, d)
    x1 = x + lin(o.reshape(t, -1).to(x.dtype), "wo")
    h1 = _norm(x1, w["w_post"].to(x.dtype))
    x2 = x1 + lin(F.silu(lin(h1, "wg")) * lin(h1, "wu"), "wd")
    return q, k, v, x2


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("t,hidden,hq,hkv,d,inter,bias", [
    (1, 576, 9, 3, 64, 1536, False),   # SmolLM2's layer, one token
    (3, 100, 7, 1, 10, 150, True),     # MQA, partial chunks, biases (Qwen2)
    (8, 64, 4, 2, 16, 65, False),      # one row past a chunk
    (cpu_layer.MAX_ROWS, 64, 4, 2, 16, 65, False),  # MAX_ROWS rows: four-row passes only
    (11, 100, 7, 1, 10, 150, True),    # two four-row passes and three rows alone
])
def test_layer_within_twice_torch_error(t, hidden, hq, hkv, d, inter, bias, split):
    w = _weights(hidden, hq, hkv, d, inter, bias, seed=t * 100 + hidden)
    gen = torch.Generator().manual_seed(7)
    x, o = torch.randn(t, hidden, generator=gen), torch.randn(t, hq, d, generator=gen)
    ang = torch.rand(t, d // 2, generator=gen, dtype=torch.float64) * 100
    cos, sin = torch.cat((ang, ang), -1).cos().float(), torch.cat((ang, ang), -1).sin().float()
    layer = cpu_layer.DecodeLayer(eps=EPS, head_dim=d, split=cpu_split.helper(True) if split else None, **w)
    q, k, v = layer.pre(x, cos, sin)
    x2 = layer.post(x, o)
    got = (q, k, v, x2)
    plain = _reference(w, x, o, cos, sin, hq, hkv, d)
    want = _reference(w, x.double(), o, cos.double(), sin.double(), hq, hkv, d)
    for g, p, ref in zip(got, plain, want):
        assert g.shape == p.shape and g.dtype == torch.float32
        assert _err(g, ref) <= 2 * _err(p, ref) + 1e-5


@pytest.mark.parametrize("split", [False, True])
def test_head_within_twice_torch_error(split):
    gen = torch.Generator().manual_seed(3)
    x, nw = torch.randn(2, 96, generator=gen), 1 + 0.1 * torch.randn(96, generator=gen)
    w = torch.randn(1000, 96, generator=gen) / 10
    out = cpu_layer.head(x, nw, EPS, w, cpu_split.helper(True) if split else None)
    plain = F.linear(_norm(x, nw), w)
    want = F.linear(_norm(x.double(), nw.double()), w.double())
    assert out.shape == (2, 1000) and _err(out, want) <= 2 * _err(plain, want) + 1e-5


def test_nan_in_a_weight_reaches_the_output():
    w = torch.randn(130, 32)
    w[129, 5] = float("nan")
    out = cpu_layer.head(torch.randn(1, 32), torch.ones(32), EPS, w, cpu_split.helper(True))
    assert out[0, 129].isnan() and out[0, :129].isfinite().all()

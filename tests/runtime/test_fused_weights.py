"""q/k/v and gate/up held as row slices of one weight each (runtime/fused_weights.py): the
state dict, the fingerprint and every output are the unfused model's, the parameters share
one storage, declaring again copies nothing, `.to()` fuses anew, QuantLinears stay apart."""

from __future__ import annotations

import dataclasses

import torch

from kvloft.config import PRESETS
from kvloft.runtime.fingerprint import model_fingerprint
from kvloft.runtime.fused_weights import fuse
from kvloft.runtime.loader import random_model
from kvloft.runtime.quant_linear import QuantLinear, quantize_linears

CFG = dataclasses.replace(PRESETS["tiny"], hidden_size=100, intermediate_size=96, n_heads=7, n_kv_heads=1,
                          head_dim=32, attention_bias=True)


def _model(cfg=CFG, dtype=torch.bfloat16, **kw):
    model = random_model(cfg, device="cpu", dtype=dtype, **kw)
    for name, p in model.net.named_parameters():
        if name.endswith("bias"):  # random_model draws biases with std 0.02: make them count
            torch.nn.init.normal_(p.data, std=1.0)
    return model


def _qkv(block):
    a = block.self_attn
    return a.q_proj, a.k_proj, a.v_proj


def test_views_share_one_storage_and_state_dict_is_unchanged():
    model = _model()
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    finger, nbytes = model_fingerprint(model), model.weight_bytes
    x = torch.randn(3, CFG.hidden_size).to(torch.bfloat16)
    want = [li(x) for li in _qkv(model.net.layers[0])]
    w, b = fuse(_qkv(model.net.layers[0]))
    gu, none = fuse((model.net.layers[0].mlp.gate_proj, model.net.layers[0].mlp.up_proj))
    assert w.shape == ((CFG.n_heads + 2 * CFG.n_kv_heads) * CFG.head_dim, CFG.hidden_size)
    assert b.shape == (w.shape[0],) and none is None and gu.shape == (2 * CFG.intermediate_size, CFG.hidden_size)
    after = model.net.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert model_fingerprint(model) == finger and model.weight_bytes == nbytes
    for li in _qkv(model.net.layers[0]):
        assert li.weight.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
        assert li.weight.is_contiguous() and isinstance(li.weight, torch.nn.Parameter)
    assert [torch.equal(li(x), y) for li, y in zip(_qkv(model.net.layers[0]), want)] == [True] * 3
    assert torch.equal(torch.nn.functional.linear(x, w, b), torch.cat(want, -1))


def test_fusing_again_copies_nothing_and_to_fuses_anew():
    model = _model()
    w, b = fuse(_qkv(model.net.layers[1]))
    w2, b2 = fuse(_qkv(model.net.layers[1]))
    assert w2.data_ptr() == w.data_ptr() and torch.equal(w2, w) and b2.data_ptr() == b.data_ptr()
    net = model.net.float()  # each parameter gets its own storage
    q = net.layers[1].self_attn.q_proj.weight
    w3, _ = fuse(_qkv(net.layers[1]))
    assert w3.dtype == torch.float32 and torch.equal(w3, w.float())
    assert q.data_ptr() == w3.data_ptr()


def test_quant_linears_and_mismatches_are_left_alone():
    model = _model(dtype=torch.float32)
    quantize_linears(model.net, "int4")
    block = model.net.layers[0]
    assert isinstance(block.self_attn.q_proj, QuantLinear)
    assert fuse(_qkv(block)) is None
    plain = _model()
    q, k, v = _qkv(plain.net.layers[0])
    k.weight.data = k.weight.data.float()
    ptr = q.weight.data_ptr()
    assert fuse((q, k, v)) is None and q.weight.data_ptr() == ptr

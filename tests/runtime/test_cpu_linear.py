"""The model's linears on the CPU: fp32 weights declared at load take the compiled few-row
GEMV (kernels/cpu_gemv.py) for decode-sized inputs, F.linear otherwise; the declaration
follows the weights when the network is moved or cast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dense_backend import DenseBackend

from kvloft.config import PRESETS
from kvloft.kernels import cpu_gemv, cpu_warmup
from kvloft.runtime.loader import random_model
from kvloft.runtime.model import Linear


def _linears(net):
    return [m for m in net.modules() if isinstance(m, Linear)]


def test_loader_declares_fp32_cpu_and_decode_rows_take_the_gemv(monkeypatch):
    model = random_model(PRESETS["tiny"], device="cpu", dtype=torch.float32)
    lins = _linears(model.net)
    assert len(lins) == 7 * model.config.n_layers + 1 and all(m.few_rows for m in lins)
    assert cpu_warmup.start().name == "kvloft-cpu-kernels"  # started at load, once
    calls = []
    real = cpu_gemv.linear_unchecked
    monkeypatch.setattr("kvloft.runtime.model._gemv", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    head = model.net.lm_head
    for rows in (1, cpu_gemv.MAX_ROWS, cpu_gemv.MAX_ROWS + 1):
        x = torch.randn(rows, head.in_features)
        want = F.linear(x.double(), head.weight.double())
        got = head(x)
        assert (got.double() - want).abs().max() <= 2 * (F.linear(x, head.weight).double() - want).abs().max() + 1e-6
    assert calls == [1, cpu_gemv.MAX_ROWS]  # MAX_ROWS + 1 rows: a GEMM through F.linear


def test_declaration_follows_dtype_and_can_be_refused():
    model = random_model(PRESETS["tiny"], device="cpu", dtype=torch.float32)
    net = model.net.to(torch.bfloat16)
    assert not any(m.few_rows for m in _linears(net))
    net = net.float()
    assert all(m.few_rows for m in _linears(net))
    assert not net.declare_kernels(compiled_cpu=False)
    assert not any(m.few_rows for m in _linears(net))
    assert random_model(PRESETS["tiny"], device="cpu", dtype=torch.bfloat16).net.compiled_cpu is True
    assert not any(m.few_rows for m in _linears(random_model(PRESETS["tiny"], device="cpu",
                                                             dtype=torch.bfloat16).net))


def test_state_dict_names_are_nn_linear_s():
    model = random_model(PRESETS["tiny"], device="cpu", dtype=torch.float32)
    names = set(model.net.state_dict())
    assert {"layers.0.self_attn.q_proj.weight", "layers.0.mlp.down_proj.weight", "lm_head.weight"} <= names


def _decode(net, steps=3):
    be, ids = DenseBackend(), torch.tensor([3, 17, 5, 9, 11, 2])
    net(ids, torch.arange(6), be)
    return [net(ids[i : i + 1], torch.tensor([6 + i]), be) for i in range(steps)]


@pytest.mark.parametrize("split", [False, True])
def test_decode_layers_compiled_match_the_modules(split):
    model = random_model(PRESETS["tiny"], device="cpu", dtype=torch.float32)
    net = model.net
    net.declare_kernels(split=split)
    assert all(b.cpu is not None for b in net.layers) and net._cpu_head is not None
    got = _decode(net)
    net.declare_kernels(compiled_cpu=False)
    assert all(b.cpu is None for b in net.layers) and net._cpu_head is None
    plain = _decode(net)
    want = _decode(net.double())
    for g, p, w in zip(got, plain, want):
        assert g.dtype == torch.float32
        assert (g.double() - w).abs().max() <= 2 * (p.double() - w).abs().max() + 1e-5
    assert all(b.cpu is None for b in net.layers)  # fp64: the modules

"""QuantLinear, quantize_linears and weights="int4"/"int8" through load_model and Session:
the forward against the dequantized reference, the logits' error against fp32, the
packed bytes in stats and budgets, and SmolLM2's answers with quantized weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kvloft
from kvloft.kernels.quant import dequantize, quantize_int4
from kvloft.runtime.quant_linear import QuantLinear, apply_weights, quantize_linears, scheme
from kvloft.scheduler.budget import weight_bytes

DENSE = kvloft.RetrievalConfig(method="dense")


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def logits(model, ids):
    s = kvloft.Session(model, DENSE, kvloft.RuntimeConfig(progress=False))
    s.feed(ids)
    return s.last_logits.clone(), s


@pytest.fixture(scope="module")
def tiny_fp32():
    return kvloft.load_model("tiny", device="cpu", dtype="float32")


def test_quant_linear_forward_is_the_dequantized_linear():
    w, b = torch.randn(33, 100) * 0.05, torch.randn(33)
    ql = QuantLinear(quantize_int4(w, 32), b)
    x = torch.randn(2, 5, 100)
    assert torch.equal(ql(x), F.linear(x, dequantize(ql.packed), b))
    assert ql(x).shape == (2, 5, 33)
    ql.kernels = "triton"  # the interpreter on the CPU: the GEMV kernel (T = 1, 3) and dequant + matmul (T = 20)
    for t in (1, 3, 20):
        xt = torch.randn(t, 100)
        assert torch.allclose(ql(xt), F.linear(xt, dequantize(ql.packed), b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weights,bound", [("int8", 0.03), ("int4", 0.3)])  # random Gaussian weights
def test_tiny_model_logits_error_is_bounded(tiny_fp32, weights, bound):
    ids = list(range(1, 40))
    ref, _ = logits(tiny_fp32, ids)
    q = kvloft.load_model("tiny", device="cpu", dtype="float32", weights=weights)
    got, s = logits(q, ids)
    err = rel_err(got, ref)
    print(f"tiny {weights}: logits relative error vs fp32 {err:.4f}")
    assert err < bound
    assert q.weights == weights and isinstance(q.net.layers[1].mlp.down_proj, QuantLinear)
    assert isinstance(q.net.lm_head, QuantLinear)  # untied head quantized too
    n = len(s.tokens)
    s.generate(max_new_tokens=4)  # no tokenizer: no text, but four decode steps
    assert len(s.tokens) == n + 4 and torch.isfinite(s.last_logits).all()


def test_tiny_model_through_the_triton_kernels_matches_the_reference():
    q = kvloft.load_model("tiny", device="cpu", dtype="float32", weights="int4", quant_group=64)
    ids = list(range(3, 11))
    ref, _ = logits(q, ids)
    for m in q.net.modules():
        if isinstance(m, QuantLinear):
            m.kernels = "triton"
    s = kvloft.Session(q, DENSE, kvloft.RuntimeConfig(progress=False, kernels="triton"))
    s.feed(ids[:-1])
    s.step(ids[-1])  # decode: T = 1 through the GEMV kernel
    assert rel_err(s.last_logits, ref) < 1e-5


def test_packed_bytes_in_stats_and_budget():
    for weights in ("int4", "int8"):
        m = kvloft.load_model("tiny", device="cpu", dtype="float32", weights=weights)
        packed = sum(mod.packed_bytes for mod in m.net.modules() if isinstance(mod, QuantLinear))
        dense = sum(p.numel() * 4 for p in m.net.parameters())  # embeddings and norms only
        assert m.weight_bytes == packed + dense
        assert weight_bytes(m.config, 4, weights) == m.weight_bytes
        s = kvloft.Session(m, DENSE, kvloft.RuntimeConfig(progress=False))
        st = s.stats()
        assert st["weights"] == weights and st["weight_bytes"] == m.weight_bytes
    llama = kvloft.ModelConfig.from_name("llama3-8b")
    assert weight_bytes(llama, 2, "int4") / 2**30 < 5.5  # the GPU target
    assert weight_bytes(llama, 2, "int4") < 0.32 * weight_bytes(llama, 2)  # bf16 embeddings stay


def test_session_runtime_weights_quantize_in_place_or_refuse():
    m = kvloft.load_model("tiny", device="cpu", dtype="float32")
    before = m.weight_bytes
    kvloft.Session(m, DENSE, kvloft.RuntimeConfig(progress=False, weights="int4"))
    assert m.weights == "int4" and m.weight_bytes < before / 2
    with pytest.raises(ValueError, match=r"load_model\(\.\.\., weights='int8'\)"):
        kvloft.Session(m, DENSE, kvloft.RuntimeConfig(progress=False, weights="int8"))
    kvloft.Session(m, DENSE, kvloft.RuntimeConfig(progress=False, weights="auto"))
    with pytest.raises(ValueError, match="weights must be one of"):
        kvloft.RuntimeConfig(weights="int3")
    with pytest.raises(ValueError, match="quant_group"):
        kvloft.RuntimeConfig(quant_group=100)
    with pytest.raises(ValueError, match="weights must be one of"):
        kvloft.load_model("tiny", device="cpu", weights="fp8")


def test_quantize_linears_replaces_the_seven_and_is_idempotent():
    m = kvloft.load_model("tiny", device="cpu", dtype="float32")
    net = quantize_linears(m.net, scheme("int8"))
    n = sum(isinstance(mod, QuantLinear) for mod in net.modules())
    assert n == 7 * m.config.n_layers + 1
    qweight = net.layers[0].self_attn.q_proj.qweight
    quantize_linears(net, "int8")
    assert net.layers[0].self_attn.q_proj.qweight is qweight
    apply_weights(net, "int8", kvloft.RuntimeConfig(kernels="reference"))
    assert net.layers[0].mlp.up_proj.kernels == "reference"


def test_qwen2_biases_survive_quantization():
    import dataclasses

    cfg = dataclasses.replace(kvloft.ModelConfig.from_name("tiny"), attention_bias=True)
    from kvloft.runtime.loader import random_model

    m = random_model(cfg, device="cpu", dtype=torch.float32)
    torch.nn.init.normal_(m.net.layers[0].self_attn.q_proj.bias, std=1.0)
    b = m.net.layers[0].self_attn.q_proj.bias.clone()
    quantize_linears(m.net, "int4")
    assert torch.equal(m.net.layers[0].self_attn.q_proj.bias, b)


# ---- SmolLM2 (the real GGUF: Q4_1 linears, a Q8_0 tied embedding) ---------------------------


@pytest.fixture(scope="module")
def smol_fp32(smollm2_gguf):
    return kvloft.load_model(smollm2_gguf, device="cpu", dtype="float32")


def _answer(model, question="What is the capital of France?", n=8):
    s = kvloft.Session(model, DENSE, kvloft.RuntimeConfig(progress=False))
    s.feed_chat([{"role": "user", "content": question}])
    first = s.last_logits.clone()
    return s.generate(max_new_tokens=n, temperature=0.0), first


@pytest.mark.slow
def test_smollm2_int4_repacks_q4_1_exactly(smol_fp32, smollm2_gguf):
    q = kvloft.load_model(smollm2_gguf, device="cpu", dtype="float32", weights="int4")
    down = q.net.layers[0].mlp.down_proj
    assert down.group == 32 and down.mins is not None  # Q4_1 kept: group 32 with mins
    assert torch.equal(dequantize(down.packed), smol_fp32.net.layers[0].mlp.down_proj.weight)
    text, first = _answer(q)
    ref_text, ref_first = _answer(smol_fp32)
    assert rel_err(first, ref_first) < 1e-5  # the same weights: only matmul rounding differs
    assert text == ref_text and "Paris" in text
    assert q.weight_bytes < 0.5 * smol_fp32.weight_bytes


@pytest.mark.slow
def test_smollm2_int8_answers_as_fp32(smol_fp32, smollm2_gguf):
    q = kvloft.load_model(smollm2_gguf, device="cpu", dtype="float32", weights="int8")
    text, first = _answer(q)
    ref_text, ref_first = _answer(smol_fp32)
    err = rel_err(first, ref_first)
    print(f"SmolLM2 int8 (requantized from Q4_1): first logits relative error {err:.4f}")
    assert err < 0.1  # per-channel int8 of a Q4_1 grid: compounding over 30 layers
    assert text == ref_text


def test_quantized_session_saves_and_restores(tmp_path):
    m = kvloft.load_model("tiny", device="cpu", dtype="float32", weights="int4")
    s = kvloft.Session(m, DENSE, kvloft.RuntimeConfig(progress=False))
    s.feed(list(range(1, 12)))
    s.save(tmp_path / "s")
    r = kvloft.Session.load(tmp_path / "s", m)
    assert r.tokens == s.tokens
    assert torch.equal(r.step(5), s.step(5))
    other = kvloft.load_model("tiny", device="cpu", dtype="float32", weights="int4", quant_group=64)
    with pytest.raises(ValueError):  # other packed values: another model for the save
        kvloft.Session.load(tmp_path / "s", other)


@pytest.mark.gpu
@pytest.mark.parametrize("weights", ["int4", "int8"])
def test_gpu_decode_with_graphs_matches_the_reference(weights):
    m = kvloft.load_model("tiny", device="cuda", dtype="bfloat16", weights=weights)
    backends = {q.backend for q in m.net.modules() if isinstance(q, QuantLinear)}
    assert backends == ({"tinygemm"} if weights == "int4" else {"triton"})  # int4: PyTorch's kernel
    ids = list(range(1, 40))
    s = kvloft.Session(m, DENSE, kvloft.RuntimeConfig(progress=False))  # tinygemm / Triton GEMV, CUDA graphs
    s.feed(ids)
    got = [s.step(t).float() for t in (5, 6, 7)]
    r = kvloft.Session(m, DENSE, kvloft.RuntimeConfig(progress=False, kernels="reference", cuda_graphs=False))
    r.feed(ids)
    want = [r.step(t).float() for t in (5, 6, 7)]
    for a, b in zip(got, want):
        assert rel_err(a, b) < 2e-2  # bf16 activations, different summation orders

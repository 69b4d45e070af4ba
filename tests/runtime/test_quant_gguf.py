"""GGUF blocks repacked into packed weights: Q4_0/Q4_1/Q8_0/Q5_0 bit-exact against gguf's own
dequantization, Q4_K within the fp16 rounding of its sub-block scales and mins, Q6_K kept
at 8 bits; through whole (llama, row-permuted q/k) GGUF files and load_model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_llama_gguf

import kvloft
from kvloft.kernels.quant import dequantize
from kvloft.kernels.quant.ops import quant_matmul
from kvloft.kernels.quant.packed import reference_matmul
from kvloft.runtime.quant_gguf import repack
from kvloft.runtime.quant_linear import QuantLinear

gguf = pytest.importorskip("gguf")

H, F, NH, NKV, V = 64, 96, 4, 2, 64


def ggml(a: np.ndarray, qtype: str) -> tuple[torch.Tensor, np.ndarray]:
    """a [N, K] fp32 -> (its GGUF bytes [n_bytes] uint8, gguf's dequantization [N, K])."""
    t = gguf.GGMLQuantizationType[qtype]
    raw = gguf.quants.quantize(a, t)
    return torch.from_numpy(raw.reshape(-1).copy()), gguf.quants.dequantize(raw, t).reshape(a.shape)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "Q5_0"])
@pytest.mark.parametrize("n,k", [(7, 64), (33, 160)])
def test_repack_dequantizes_bit_exactly(qtype, n, k):
    a = (np.random.default_rng(n).standard_normal((n, k)) * 0.1).astype(np.float32)
    raw, want = ggml(a, qtype)
    pw = repack(raw, qtype, (n, k))
    pw.validate()
    assert torch.equal(dequantize(pw), torch.from_numpy(want))
    assert pw.nbytes == (raw.numel() // 22 * 34 if qtype == "Q5_0" else raw.numel())  # rearranged; Q5_0 widened
    x = torch.randn(3, k)  # and the GEMV kernel reads them (the interpreter here)
    assert torch.allclose(quant_matmul(x, pw), reference_matmul(x, pw), rtol=1e-5, atol=1e-5)


def test_repack_refuses_other_types():
    with pytest.raises(ValueError, match="no direct repack"):
        repack(torch.zeros(210, dtype=torch.uint8), "Q6_K", (1, 256))
    with pytest.raises(ValueError, match="multiple of 256"):
        repack(torch.zeros(144, dtype=torch.uint8), "Q4_K", (2, 128))
    with pytest.raises(ValueError, match="takes 144 uint8 bytes"):
        repack(torch.zeros(140, dtype=torch.uint8), "Q4_K", (1, 256))


TYPES = {"blk.0.attn_q.weight": "Q4_0", "blk.0.attn_k.weight": "Q4_1", "blk.0.attn_v.weight": "Q8_0",
         "blk.0.attn_output.weight": "Q4_0", "blk.0.ffn_gate.weight": "Q4_1", "blk.0.ffn_up.weight": "Q8_0",
         "blk.0.ffn_down.weight": "Q4_0", "output.weight": "Q8_0"}


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory):
    """A one-layer llama GGUF whose linears are Q4_0, Q4_1 and Q8_0 (row-permuted q/k)."""
    def tensor(name, shape, rng):
        a = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if name not in TYPES:
            return a, None
        t = gguf.GGMLQuantizationType[TYPES[name]]
        return gguf.quants.quantize(a, t), t

    return write_llama_gguf(tmp_path_factory.mktemp("gguf") / "mixed.gguf", H, F, NH, NKV, V, tensor)


def _linears(model):
    return {n: m for n, m in model.net.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("weights,bits,exact", [("int4", 4, ("Q4_0", "Q4_1", "Q8_0")), ("int8", 8, ("Q8_0",))])
def test_gguf_file_repacks_exactly_and_requantizes_the_rest(mixed_gguf, weights, bits, exact):
    """Under "int4" Q8_0 stays int8 (bit-exact); under "int8" Q4_* are requantized."""
    ref = _load(mixed_gguf, "bf16")
    q = _load(mixed_gguf, weights)
    lin = _linears(q)
    assert q.weights == weights
    gg_names = {"layers.0.self_attn.q_proj": "blk.0.attn_q.weight", "layers.0.self_attn.k_proj": "blk.0.attn_k.weight",
                "layers.0.self_attn.v_proj": "blk.0.attn_v.weight", "layers.0.self_attn.o_proj": "blk.0.attn_output.weight",
                "layers.0.mlp.gate_proj": "blk.0.ffn_gate.weight", "layers.0.mlp.up_proj": "blk.0.ffn_up.weight",
                "layers.0.mlp.down_proj": "blk.0.ffn_down.weight", "lm_head": "output.weight"}
    assert len(lin) == 8 and all(m.bits == (8 if TYPES[gg_names[n]] == "Q8_0" else bits) for n, m in lin.items())
    for name, m in lin.items():
        want = ref.net.get_submodule(name).weight
        got = dequantize(m.packed)
        if TYPES[gg_names[name]] in exact:  # repacked: the GGUF's values, rows in HF order
            assert m.group == 32 and torch.equal(got, want), name
        else:  # dequantized and quantized again
            assert ((got - want).norm() / want.norm()).item() < (0.15 if bits == 4 else 0.01), name
    ids = torch.arange(1, 9)
    s_ref = kvloft.Session(ref, kvloft.RetrievalConfig(method="dense"), kvloft.RuntimeConfig(progress=False))
    s_q = kvloft.Session(q, kvloft.RetrievalConfig(method="dense"), kvloft.RuntimeConfig(progress=False))
    s_ref.feed(ids.tolist())
    s_q.feed(ids.tolist())
    err = ((s_q.last_logits - s_ref.last_logits).norm() / s_ref.last_logits.norm()).item()
    assert err < (0.15 if bits == 4 else 0.02)


def _load(path, weights):
    from kvloft.runtime.loader import load_gguf
    from kvloft.runtime.quant_linear import scheme

    tok = object()  # the file holds no tokenizer; load_gguf only attaches the one it is given
    return load_gguf(path, device=torch.device("cpu"), dtype=torch.float32, tokenizer=tok, cache=False,
                     quant=scheme(weights))

"""kvloft's dense runner against the HF transformers implementation on the same random weights."""

import json

import pytest
import torch

from kvloft import load_model
from kvloft.kernels import REFERENCE
from kvloft.runtime.attention import DenseAttention

transformers = pytest.importorskip("transformers")


def _hf_model(kind: str, **shape):
    base = dict(vocab_size=301, hidden_size=9 * 16, intermediate_size=200, num_hidden_layers=2,
                num_attention_heads=9, num_key_value_heads=3, head_dim=16, max_position_embeddings=4096,
                rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    base.update(shape)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**base)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        base.pop("head_dim")
        cfg = transformers.Qwen2Config(**base)
        model = transformers.Qwen2ForCausalLM(cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # HF init leaves norms at 1 and biases at 0: randomize all
            p.copy_(torch.randn_like(p) * 0.1)
    return model.eval()


def _save(model, path):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(model.config.to_dict()))


@pytest.mark.parametrize(
    "kind,shape,length",
    [
        ("llama", {}, 97),  # 9 query heads over 3 KV heads (GQA group of 3)
        ("llama", {"num_attention_heads": 7, "num_key_value_heads": 7, "hidden_size": 7 * 16}, 50),
        ("llama", {"tie_word_embeddings": True,
                   "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}, 131),
        ("qwen2", {}, 61),  # q/k/v bias
    ],
)
def test_dense_runner_matches_hf(tmp_path, kind, shape, length):
    hf = _hf_model(kind, **shape)
    _save(hf, tmp_path)
    ours = load_model(tmp_path, device="cpu", dtype="float32")
    ids = torch.randint(0, hf.config.vocab_size, (length,))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0].double()
    got = ours.net(ids, torch.arange(length), DenseAttention(ours.config, REFERENCE, ours.device, ours.dtype))
    err = (got.double() - ref).norm() / ref.norm()
    assert err < 1e-5, f"relative error {err:.2e} vs HF {kind}"


def test_chunked_prefill_equals_one_pass(tmp_path):
    """Feeding in chunks through a session gives the logits of one full forward pass."""
    import kvloft

    hf = _hf_model("llama")
    _save(hf, tmp_path)
    model = load_model(tmp_path, device="cpu", dtype="float32")
    ids = torch.randint(0, 301, (203,))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0, -1].double()
    for method in ("dense", "exact"):
        s = kvloft.Session(model, kvloft.RetrievalConfig(method=method, n_sink=4, n_window=16),
                           kvloft.RuntimeConfig(prefill_chunk=37, progress=False))
        s.feed(ids)
        err = (s.last_logits.double() - ref).norm() / ref.norm()
        assert err < 1e-5, (method, err)


def test_mlp_in_row_blocks_matches_hf(tmp_path, monkeypatch):
    """A prefill longer than the CPU's MLP row limit (runtime/model.py MLP_ROWS) goes through the
    MLP in equal row blocks: the logits stay HF's (97 tokens in blocks of 33, 33, 31), and the
    same as one call to within fp32 summation order."""
    from kvloft.runtime import model as model_mod

    hf = _hf_model("llama")
    _save(hf, tmp_path)
    ours = load_model(tmp_path, device="cpu", dtype="float32")
    ids = torch.randint(0, hf.config.vocab_size, (97,))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0].double()

    def run():
        return ours.net(ids, torch.arange(97), DenseAttention(ours.config, REFERENCE, ours.device, ours.dtype))

    whole = run()
    monkeypatch.setattr(model_mod, "MLP_ROWS", {"cpu": 40})
    seen = []
    real = model_mod.MLP._rows
    monkeypatch.setattr(model_mod.MLP, "_rows",
                        lambda self, x, *gate_up: seen.append(x.shape[0]) or real(self, x, *gate_up))
    blocked = run()
    assert seen[:3] == [33, 33, 31]
    assert (blocked.double() - ref).norm() / ref.norm() < 1e-5
    torch.testing.assert_close(blocked, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("promote", [False, True], ids=["cast-first", "promote-in-kernel"])
def test_rotate_equals_rotate_half(dtype, promote, monkeypatch):
    """RoPE in three passes (runtime/model.py rotate) gives HF's x*cos + rotate_half(x)*sin in
    fp32, rounded once, bit for bit (9 heads, head dim 64, positions 0..96 and 1e6..): with x
    copied to fp32 first (the CPU) or read as it is by the fp32 ops (PROMOTE_IN_KERNEL, CUDA's),
    returned or rounded into given rows (a row-strided x: a fused GEMM's output)."""
    from kvloft.runtime import model as model_mod
    from kvloft.runtime.model import rotate

    if promote:
        monkeypatch.setattr(model_mod, "PROMOTE_IN_KERNEL", ("cuda", "cpu"))

    torch.manual_seed(0)
    inv = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    for start in (0, 1_000_000):
        ang = torch.arange(start, start + 97, dtype=torch.float64)[:, None] * inv[None]
        ang = torch.cat((ang, ang), dim=-1)
        cos, sin = ang.cos().float(), ang.sin().float()
        x = torch.randn(97, 11 * 64).to(dtype)[:, 64 : 10 * 64].view(97, 9, 64)  # row-strided
        xf = x.float()
        half = torch.cat((-xf[..., 32:], xf[..., :32]), dim=-1)
        want = torch.addcmul(xf * cos[:, None], half, sin[:, None]).to(dtype)
        assert torch.equal(rotate(x, cos, sin), want)
        rows = torch.full((97, 9, 64), 7.0, dtype=dtype)
        assert rotate(x, cos, sin, rows) is rows and torch.equal(rows, want)

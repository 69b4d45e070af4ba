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

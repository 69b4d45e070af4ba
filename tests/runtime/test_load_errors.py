"""Loading errors name the file and the fix (a ValueError each, never a bare numpy/JSON error)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import kvloft
from kvloft.runtime.gguf_header import read_header

gguf = pytest.importorskip("gguf")

V, H, F, NH, NKV = 64, 32, 48, 4, 2


def _hf_dir(path, **cfg_over):
    cfg = {"model_type": "llama", "vocab_size": V, "hidden_size": H, "intermediate_size": F,
           "num_hidden_layers": 1, "num_attention_heads": NH, "num_key_value_heads": NKV,
           "tie_word_embeddings": True}
    cfg.update(cfg_over)
    d = H // NH
    state = {"model.embed_tokens.weight": torch.randn(V, H), "model.norm.weight": torch.ones(H),
             "model.layers.0.input_layernorm.weight": torch.ones(H),
             "model.layers.0.post_attention_layernorm.weight": torch.ones(H),
             "model.layers.0.self_attn.q_proj.weight": torch.randn(NH * d, H),
             "model.layers.0.self_attn.k_proj.weight": torch.randn(NKV * d, H),
             "model.layers.0.self_attn.v_proj.weight": torch.randn(NKV * d, H),
             "model.layers.0.self_attn.o_proj.weight": torch.randn(H, NH * d),
             "model.layers.0.mlp.gate_proj.weight": torch.randn(F, H),
             "model.layers.0.mlp.up_proj.weight": torch.randn(F, H),
             "model.layers.0.mlp.down_proj.weight": torch.randn(H, F)}
    save_file(state, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg))
    return state


def _gguf(path, arch="llama", tokenizer=False):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(H)
    w.add_feed_forward_length(F)
    w.add_head_count(NH)
    w.add_head_count_kv(NKV)
    w.add_vocab_size(V)
    w.add_context_length(256)
    rng = np.random.default_rng(0)
    d = H // NH
    shapes = {"token_embd.weight": (V, H), "output_norm.weight": (H,), "blk.0.attn_norm.weight": (H,),
              "blk.0.ffn_norm.weight": (H,), "blk.0.attn_q.weight": (NH * d, H), "blk.0.attn_k.weight": (NKV * d, H),
              "blk.0.attn_v.weight": (NKV * d, H), "blk.0.attn_output.weight": (H, NH * d),
              "blk.0.ffn_gate.weight": (F, H), "blk.0.ffn_up.weight": (F, H), "blk.0.ffn_down.weight": (H, F)}
    for name, shape in shapes.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _tokenizer_json(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(V - 1)} | {"[UNK]": V - 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def smollm2_bytes(smollm2_gguf):
    return smollm2_gguf, smollm2_gguf.read_bytes()


def test_truncated_gguf_names_tensor_and_missing_bytes(tmp_path, smollm2_bytes):
    src, data = smollm2_bytes
    first = read_header(src)[1][0]  # token_embd.weight, the first tensor of the table
    cut = first.offset + first.n_bytes // 2
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:cut])
    missing = first.offset + first.n_bytes - cut
    with pytest.raises(ValueError, match=rf"cut.gguf.*file ends at byte {cut}, tensor {first.name} "
                                         rf"needs {missing} more bytes.*download it again"):
        kvloft.load_model(bad, device="cpu")


def test_gguf_cut_inside_its_header(tmp_path, smollm2_bytes):
    bad = tmp_path / "head.gguf"
    bad.write_bytes(smollm2_bytes[1][:5000])
    with pytest.raises(ValueError, match=r"head.gguf is not a complete GGUF file: file ends at byte 5000 inside"):
        kvloft.load_model(bad, device="cpu")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all, just some text......")
    with pytest.raises(ValueError, match=r"junk.gguf .*does not start with b'GGUF'"):
        kvloft.load_model(tmp_path / "junk.gguf", device="cpu")


def test_unknown_gguf_architecture(tmp_path):
    path = _gguf(tmp_path / "m.gguf", arch="mamba")
    with pytest.raises(ValueError, match=r"m.gguf: GGUF architecture 'mamba' is not supported; kvloft runs llama, qwen2"):
        kvloft.load_model(path, device="cpu")


def test_gguf_without_tokenizer_then_given_one(tmp_path):
    path = _gguf(tmp_path / "m.gguf")
    with pytest.raises(ValueError, match=r"m.gguf holds no tokenizer.*pass tokenizer="):
        kvloft.load_model(path, device="cpu")
    tok = _tokenizer_json(tmp_path / "tokenizer.json")
    model = kvloft.load_model(path, device="cpu", tokenizer=tok)
    assert model.tokenizer.encode("w3 w5") == [3, 5]
    with pytest.raises(ValueError, match=r"tokenizer '.*nope.json' does not exist"):
        kvloft.load_model(path, device="cpu", tokenizer=tmp_path / "nope.json")


def test_config_json_invalid(tmp_path):
    _hf_dir(tmp_path)
    (tmp_path / "config.json").write_text('{"vocab_size": 64,, }')
    with pytest.raises(ValueError, match=r"config.json is not valid JSON \(line 1, column 19"):
        kvloft.load_model(tmp_path, device="cpu")


def test_config_json_missing_and_bad_keys(tmp_path):
    _hf_dir(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "num_attention_heads"}))
    with pytest.raises(ValueError, match=r"config.json lacks the keys \['num_attention_heads'\]"):
        kvloft.load_model(tmp_path, device="cpu")
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"hidden_size": "32"}))
    with pytest.raises(ValueError, match=r"hidden_size='32' must be positive integers"):
        kvloft.load_model(tmp_path, device="cpu")
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"config.json: model_type 'gpt2' is not supported; kvloft runs llama"):
        kvloft.load_model(tmp_path, device="cpu")


def test_safetensors_not_matching_config(tmp_path):
    _hf_dir(tmp_path, intermediate_size=2 * F)
    with pytest.raises(ValueError, match=r"tensor layers.0.mlp.down_proj.weight has shape \[32, 48\] but the "
                                         r"config implies \[32, 96\]"):
        kvloft.load_model(tmp_path, device="cpu")
    _hf_dir(tmp_path, num_hidden_layers=2)
    with pytest.raises(ValueError, match=r"do not match the config: missing \['layers.1."):
        kvloft.load_model(tmp_path, device="cpu")


def test_truncated_safetensors(tmp_path):
    _hf_dir(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model.safetensors: file ends at byte \d+, tensor .* needs \d+ more bytes"):
        kvloft.load_model(tmp_path, device="cpu")


def test_hf_dir_without_tokenizer_loads_ids_only(tmp_path):
    _hf_dir(tmp_path)
    model = kvloft.load_model(tmp_path, device="cpu")
    assert model.tokenizer is None
    model = kvloft.load_model(tmp_path, device="cpu", tokenizer=_tokenizer_json(tmp_path / "tokenizer.json"))
    assert model.tokenizer.encode("w1") == [1]

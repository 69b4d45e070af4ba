"""Fixtures shared by the server and Hugging Face tests: the real SmolLM2, loaded once."""

import dataclasses

import pytest
import torch

import kvloft
from kvloft.runtime.loader import random_model


@pytest.fixture(scope="session")
def smollm2():
    return kvloft.load_model("smollm2", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def chatty(smollm2):
    """Tiny random weights behind the real SmolLM2 tokenizer: real text in and out, fast."""
    tok = smollm2.tokenizer
    cfg = dataclasses.replace(kvloft.ModelConfig.from_name("tiny"), name="tiny-chat", vocab_size=tok.vocab_size)
    model = random_model(cfg, device=torch.device("cpu"), dtype=torch.float32, seed=0)
    return dataclasses.replace(model, tokenizer=tok)


def hf_llama_from(model: kvloft.Model, attn_implementation: str = "sdpa"):
    """The same network as a transformers LlamaForCausalLM (kvloft names its weights as HF does)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.initialization import no_init_weights

    c = model.config
    cfg = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
        head_dim=c.head_dim, rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=c.tie_word_embeddings, bos_token_id=c.bos_token_id,
        eos_token_id=list(c.eos_token_ids) or None, attn_implementation=attn_implementation,
    )
    with no_init_weights():  # the weights are overwritten below: skip the random init
        hf = LlamaForCausalLM(cfg).eval()
    state = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v
             for k, v in model.net.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return hf.to(torch.float32)

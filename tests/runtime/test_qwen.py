"""Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M) end to end; needs `make models` (skipped otherwise)."""

import pytest

import kvloft

pytestmark = pytest.mark.qwen


@pytest.fixture(scope="module")
def qwen_model(qwen_gguf):
    return kvloft.load_model("qwen2.5-0.5b", device="cpu", dtype="float32")


def test_config_matches_the_model_card(qwen_model):
    c = qwen_model.config
    assert (c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim) == (24, 14, 2, 64)
    assert (c.hidden_size, c.intermediate_size, c.vocab_size) == (896, 4864, 151936)
    assert c.rope_theta == 1e6 and c.max_position_embeddings == 32768
    assert c.attention_bias and not c.tie_word_embeddings


def test_greedy_chat_answer(qwen_model):
    s = kvloft.Session(qwen_model, kvloft.RetrievalConfig(method="dense"), kvloft.RuntimeConfig(progress=False))
    s.feed_chat([{"role": "user", "content": "What is the capital of France?"}])
    answer = s.generate(max_new_tokens=16)
    assert "Paris" in answer, answer

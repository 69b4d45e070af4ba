"""kvloft inside transformers: a kvloft Cache + the "kvloft" attention against plain HF attention."""

import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("kvloft.hf needs transformers>=5", allow_module_level=True)

from conftest import hf_llama_from

import kvloft.hf
from kvloft import RetrievalConfig, RuntimeConfig
from kvloft.eval.scoring import score
from kvloft.eval.tasks import build_prompt, generate

RUNTIME = RuntimeConfig(progress=False)
# transformers 5.x renamed generate's/forward's `past_key_values` to `cache` (the old name warns)
CACHE_KW = "cache" if "cache" in inspect.signature(transformers.LlamaForCausalLM.forward).parameters \
    else "past_key_values"


@pytest.fixture(scope="module")
def llama():
    """A tiny random Llama with awkward heads: 9 query heads over 3 KV heads, head dim 16."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=144, intermediate_size=288, num_hidden_layers=2,
                                   num_attention_heads=9, num_key_value_heads=3, head_dim=16,
                                   max_position_embeddings=4096, attn_implementation="sdpa",
                                   bos_token_id=None, eos_token_id=None, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture
def as_kvloft(llama):
    llama.set_attn_implementation("kvloft")
    yield llama
    llama.set_attn_implementation("sdpa")


def _generate(model, ids, n, cache=None):
    kw = {CACHE_KW: cache} if cache is not None else {}
    out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("method", ["exact", "tokenselect", "dense"])
def test_covering_budget_generates_what_plain_hf_generates(llama, method):
    ids = torch.randint(1, 512, (1, 150))
    want = _generate(llama, ids, 10)
    llama.set_attn_implementation("kvloft")
    try:
        cache = kvloft.hf.Cache(llama, RetrievalConfig(method=method, budget=10_000, n_sink=4, n_window=32),
                                RUNTIME)
        got = _generate(llama, ids, 10, cache)
    finally:
        llama.set_attn_implementation("sdpa")
    assert got == want
    st = cache.stats()
    assert st["tokens"] == 150 + 9  # the last token is sampled, never fed
    if method != "dense":
        assert st["tier_tokens"] == {"static": 36, "host": 159 - 36}  # the past really sat in the host tier
        assert st["retriever"]["calls"] == 9 * 2  # decode steps x layers


def _teacher_forced(model, ids, prompt_len, cache):
    """Logits [S, V] of every decode step after the prompt, feeding the given tokens."""
    out = [model(input_ids=ids[:, :prompt_len], **{CACHE_KW: cache}).logits[0, -1]]
    for t in range(prompt_len, ids.shape[1] - 1):
        out.append(model(input_ids=ids[:, t : t + 1], **{CACHE_KW: cache}).logits[0, -1])
    return torch.stack(out).double()


def test_small_budget_retrieves_and_beats_window_only(llama, as_kvloft):
    """A budget below the host tier changes the result, and exact top-k retrieval is closer to
    dense attention than the static tier alone (budget 0)."""
    ids = torch.randint(1, 512, (1, 306))
    with torch.no_grad():
        llama.set_attn_implementation("sdpa")
        dense = llama(input_ids=ids).logits[0, 299:-1].double()  # [6, V]: predictions after 300.. tokens
        llama.set_attn_implementation("kvloft")

        def err(budget):
            c = kvloft.hf.Cache(llama, RetrievalConfig(method="exact", budget=budget, n_sink=4, n_window=16),
                                RUNTIME)
            got = _teacher_forced(llama, ids, 300, c)
            return ((got[1:] - dense[1:]).norm() / dense[1:].norm()).item(), c, got

        err_topk, c, got = err(32)
        err_none, _, _ = err(0)
    torch.testing.assert_close(got[0], dense[0], rtol=1e-4, atol=1e-5)  # the prefill is dense whatever the budget
    assert 0 < err_topk < err_none
    # 5 decode steps x 2 layers x 3 KV heads x 32 rows: the retriever picked exactly the budget
    assert c.stats()["retriever"]["selected"] == 5 * 2 * 3 * 32


def test_plain_forward_without_cache_falls_back_to_sdpa(llama, as_kvloft):
    ids = torch.randint(1, 512, (1, 40))
    with torch.no_grad():
        got = llama(input_ids=ids, use_cache=False).logits
        llama.set_attn_implementation("sdpa")
        want = llama(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want)


def test_refusals_name_the_fix(llama):
    with pytest.raises(ValueError, match="attn_implementation='kvloft'"):
        kvloft.hf.Cache(llama, RetrievalConfig(method="exact"))
    llama.set_attn_implementation("kvloft")
    try:
        cache = kvloft.hf.Cache(llama, RetrievalConfig(method="exact", n_sink=4, n_window=16), RUNTIME)
        with pytest.raises(ValueError, match="batch size 1"):
            llama(input_ids=torch.randint(1, 512, (2, 8)), **{CACHE_KW: cache})
        cache = kvloft.hf.Cache(llama, RetrievalConfig(method="exact", n_sink=4, n_window=16), RUNTIME)
        mask = torch.ones(1, 8, dtype=torch.long)
        mask[0, :2] = 0
        with pytest.raises(ValueError, match="padding"):
            llama(input_ids=torch.randint(1, 512, (1, 8)), attention_mask=mask, **{CACHE_KW: cache})
        with pytest.raises(ValueError, match="kvloft.hf.Cache"):  # another cache kind with kvloft attention
            llama.generate(torch.randint(1, 512, (1, 8)), max_new_tokens=2, do_sample=False, pad_token_id=0)
    finally:
        llama.set_attn_implementation("sdpa")


@pytest.mark.slow
def test_smollm2_through_hf_finds_the_passkey(smollm2):
    hf = hf_llama_from(smollm2, attn_implementation="kvloft")
    sample = generate("passkey", smollm2.tokenizer, 400, seed=2, depth=0.3)
    ids = torch.tensor([smollm2.tokenizer.encode(build_prompt(sample))])
    cache = kvloft.hf.Cache(hf, RetrievalConfig(method="exact", budget=32, n_sink=16, n_window=64), RUNTIME)
    out = _generate(hf, ids, 7, cache)
    answer = smollm2.tokenizer.decode(out)
    assert score("passkey", answer, sample.references) == 1.0, answer
    assert cache.stats()["tier_tokens"]["host"] > 300  # the key sat in the host tier, found by retrieval

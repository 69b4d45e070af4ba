"""Session.fork: a copy continues as its parent would, another method's fork decodes as a fresh
session fed the same prompt, parent and fork never change each other, bad forks are refused."""

import pytest
import torch
from session_helpers import CACHE, RUNTIME, TIERED, fed, greedy, prompt_ids

from kvloft import CacheConfig, RetrievalConfig, RuntimeConfig, Session, load_model

HIP_OPTS = {"chunk_sizes": [32, 8], "kept_tokens": [64, 24], "refresh_steps": [4, 2], "chunk_rows": 64,
            "kernel": "torch"}
CONFIGS = {
    "dense": RetrievalConfig(method="dense"),
    "exact": RetrievalConfig(method="exact", **TIERED),
    "tokenselect": RetrievalConfig(method="tokenselect", **TIERED, options={"theta": 0.0}),
    "hip": RetrievalConfig(method="hip", **TIERED, options=HIP_OPTS),
    "attention_graph": RetrievalConfig(method="attention_graph", **TIERED),
}
N_PROMPT = 200


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu", dtype="float32", seed=3)


@pytest.fixture(scope="module")
def prompt(tiny):
    return prompt_ids(tiny, N_PROMPT, seed=5)


@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.slow) if m == "attention_graph" else m
                                    for m in sorted(CONFIGS)])  # attention_graph: ~40 s on a 2-core CPU
def test_copy_decodes_as_the_parent_would_interleaved(tiny, prompt, method):
    """A same-config fork after 6 decode steps (ring wrapped, retriever caches warm): parent and
    fork decoding turn about each give the tokens and logits of an untouched reference."""
    rcfg = CONFIGS[method]
    ref, parent = fed(tiny, rcfg, prompt, steps=6), fed(tiny, rcfg, prompt, steps=6)
    fork = parent.fork()
    assert fork.tokens == parent.tokens and fork.retrieval == rcfg and fork.stats()["bytes"] == parent.stats()["bytes"]
    want_ids, want = greedy(ref, 10)
    got = {"parent": [], "fork": []}
    for _ in range(10):
        for name, s in (("parent", parent), ("fork", fork)):
            got[name].append(greedy(s, 1))
    for name, steps in got.items():
        assert [i for ids, _ in steps for i in ids] == want_ids, name
        torch.testing.assert_close(torch.cat([lg for _, lg in steps]), want, rtol=0, atol=1e-6)


def test_parent_going_elsewhere_leaves_the_fork_alone(tiny, prompt):
    """The parent fed other tokens, rolled back and decoded on after the fork: the fork still
    decodes as a session that never saw them."""
    rcfg = CONFIGS["exact"]
    ref, parent = fed(tiny, rcfg, prompt, steps=3), fed(tiny, rcfg, prompt, steps=3)
    fork = parent.fork()
    parent.feed(torch.arange(100) % tiny.config.vocab_size)  # 100 more rows through the host tier
    greedy(parent, 5)
    want_ids, want = greedy(ref, 8)
    got_ids, got = greedy(fork, 8)
    assert got_ids == want_ids
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["exact", "tokenselect", "hip"])
def test_dense_fork_decodes_as_a_fresh_session(tiny, prompt, method):
    """dense -> method: the fork's tiers and index, built from the dense K/V, decode as a
    session of that method fed the same prompt (float rounding of the two prefills apart)."""
    rcfg = CONFIGS[method]
    dense = fed(tiny, CONFIGS["dense"], prompt)
    fork = dense.fork(rcfg)
    fresh = fed(tiny, rcfg, prompt)
    assert fork.stats()["tier_tokens"] == fresh.stats()["tier_tokens"]
    assert fork.stats()["bytes"] == fresh.stats()["bytes"]
    torch.testing.assert_close(fork.last_logits, fresh.last_logits, rtol=0, atol=1e-5)
    want_ids, want = greedy(fresh, 10)
    got_ids, got = greedy(fork, 10)
    assert got_ids == want_ids
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_covering_exact_fork_decodes_as_its_dense_parent(tiny, prompt):
    """An exact fork whose budget covers the host tier attends to every key: the dense parent's
    tokens, both decoding turn about (DESIGN.md: the identity of every retriever)."""
    dense = fed(tiny, CONFIGS["dense"], prompt, steps=2)  # dense decode rows count as prefilled
    fork = dense.fork(RetrievalConfig(method="exact", budget=N_PROMPT, n_sink=4, n_window=32))
    got = {"dense": [], "fork": []}
    for _ in range(8):
        for name, s in (("dense", dense), ("fork", fork)):
            got[name].append(greedy(s, 1))
    assert [ids for ids, _ in got["fork"]] == [ids for ids, _ in got["dense"]]
    torch.testing.assert_close(torch.cat([lg for _, lg in got["fork"]]),
                               torch.cat([lg for _, lg in got["dense"]]), rtol=0, atol=1e-4)


def test_undecoded_exact_session_forks_into_another_method_and_dense(tiny, prompt):
    exact = fed(tiny, CONFIGS["exact"], prompt)
    for method in ("hip", "dense"):
        fork, fresh = exact.fork(CONFIGS[method]), fed(tiny, CONFIGS[method], prompt)
        want_ids, _ = greedy(fresh, 6)
        assert greedy(fork, 6)[0] == want_ids, method


def test_refusals_name_the_reason_and_the_fix(tiny, prompt):
    decoded = fed(tiny, CONFIGS["exact"], prompt, steps=1)
    with pytest.raises(ValueError, match=r"decoded tokens.*new Session"):
        decoded.fork(CONFIGS["hip"])
    dense = fed(tiny, CONFIGS["dense"], prompt)
    with pytest.raises(ValueError, match="remapped positions"):
        dense.fork(RetrievalConfig(method="exact", position_mode="extrapolate", **TIERED))
    with pytest.raises(ValueError, match=r"over prefill_dense_tokens \+ 1 = 100"):
        dense.fork(RetrievalConfig(method="exact", prefill_dense_tokens=99, **TIERED))
    with pytest.raises(ValueError, match="learns from prefill queries"):
        dense.fork(CONFIGS["attention_graph"])
    with pytest.raises(TypeError, match="RetrievalConfig"):
        dense.fork("exact")
    assert greedy(dense.fork(RetrievalConfig(method="exact", prefill_dense_tokens=199, **TIERED)), 1)


def test_fork_into_a_quantized_host_tier_is_refused(tiny, prompt):
    """A fresh session with an int8 host tier prefills over int8 rows (its logits differ from
    dense by ~1e-3 on the tiny preset), so a dense parent's K/V are not its own: refused."""
    s = Session(tiny, CONFIGS["dense"], RUNTIME, CacheConfig(host_chunk_tokens=64, host_dtype="int8"))
    s.feed(prompt)
    with pytest.raises(ValueError, match="int8 rows, which its own prefill attends to"):
        s.fork(CONFIGS["exact"])
    assert len(s.fork()) == N_PROMPT  # a copy of the dense session is fine


def test_fork_over_the_limits_is_refused(tiny, prompt):
    small = CacheConfig(host_chunk_tokens=64, max_context=N_PROMPT)
    s = Session(tiny, CONFIGS["dense"], RUNTIME, small)
    s.feed(prompt)
    assert len(s.fork(CONFIGS["exact"])) == N_PROMPT  # the limit holds the context: fine
    budget = RuntimeConfig(prefill_chunk=64, progress=False, host_memory_budget=1024)
    tight = Session(tiny, CONFIGS["dense"], budget, CACHE)
    tight.feed(prompt)
    with pytest.raises(ValueError, match="host"):
        tight.fork(CONFIGS["exact"])


def test_fork_during_a_call_is_refused_and_the_call_rolls_back(tiny, prompt):
    s = fed(tiny, CONFIGS["exact"], prompt)
    before = s.last_logits.clone()

    def fork_now(done, total):
        s.fork()

    with pytest.raises(ValueError, match="middle of a call"):
        s.feed(torch.arange(10), on_progress=fork_now)
    assert len(s) == N_PROMPT and not s.in_call
    torch.testing.assert_close(s.last_logits, before, rtol=0, atol=0)
    assert len(s.fork()) == N_PROMPT


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["exact", "hip"])
def test_cuda_forks_decode_as_their_references(method):
    """On CUDA (Triton kernels, pinned host tier, batched evictions, CUDA graphs): a dense
    session's fork decodes as a fresh session of the method, and a copy of that fork as the fork."""
    model = load_model("tiny", device="cuda", dtype="float32", seed=3)
    runtime = RuntimeConfig(progress=False)
    rcfg = RetrievalConfig(method=method, **TIERED, options={k: v for k, v in CONFIGS[method].options.items()
                                                             if k != "kernel"})  # hip: its Triton kernels
    ids = torch.randint(0, model.config.vocab_size, (700,), generator=torch.Generator().manual_seed(1))
    dense = Session(model, RetrievalConfig(method="dense"), runtime)
    dense.feed(ids)
    fresh = Session(model, rcfg, runtime)
    fresh.feed(ids)
    fork = dense.fork(rcfg)
    want_ids, want = greedy(fresh, 80)  # past evict_batch (64 on CUDA): rows move down
    copy = fork.fork()
    got_ids, got = greedy(fork, 80)
    assert got_ids == want_ids
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=0, atol=1e-3)
    assert greedy(copy, 80)[0] == got_ids

"""NaN/inf weights or KV: a clear NonFiniteError, and the call rolled back (tokens, tiers,
retriever state), so that once the cause is repaired the session continues exactly as a clean
session does. Dense and exact, through feed (a later chunk failing after earlier ones were
appended), generate and step."""

import copy
from contextlib import contextmanager

import pytest
import torch

from kvloft import CacheConfig, RetrievalConfig, RuntimeConfig, Session, load_model
from kvloft.runtime.numerics import NonFiniteError, finite_sum

RUNTIME = RuntimeConfig(prefill_chunk=32, progress=False)
CACHE = CacheConfig(host_chunk_tokens=32)
CONFIGS = {
    "dense": RetrievalConfig(method="dense"),
    "exact": RetrievalConfig(method="exact", budget=12, n_sink=4, n_window=16),
    "tokenselect": RetrievalConfig(method="tokenselect", budget=12, n_sink=4, n_window=16, options={"theta": 0.0}),
    "hip": RetrievalConfig(method="hip", budget=12, n_sink=4, n_window=16, options={
        "chunk_sizes": [16, 4], "kept_tokens": [32, 12], "refresh_steps": [4, 2], "chunk_rows": 32}),
    "actqkv": RetrievalConfig(method="actqkv", budget=12, n_sink=4, n_window=16),
}
POISON = 7  # a token id whose embedding row is made NaN


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu", dtype="float32", seed=5)


def _prompt(n, seed):
    ids = torch.randint(8, 512, (n,), generator=torch.Generator().manual_seed(seed))
    return ids.tolist()


@contextmanager
def _nan(t: torch.Tensor, index):
    """t[index] = NaN for the duration (weights: no_grad)."""
    old = t[index].clone()
    with torch.no_grad():
        t[index] = float("nan")
    try:
        yield
    finally:
        with torch.no_grad():
            t[index] = old


def _state(s: Session):
    st = copy.deepcopy(s.stats())  # stats() may hand out the retriever's live lists
    return len(s), s.tokens[:], st["bytes"], st.get("tier_tokens"), st.get("retriever")


def _pair(model, method):
    """Two sessions with the same context (100 tokens fed, 4 generated): clean and victim."""
    out = []
    for _ in range(2):
        s = Session(model, CONFIGS[method], RUNTIME, CACHE)
        s.feed(_prompt(100, 0))
        s.generate(4)
        out.append(s)
    return out


@pytest.mark.parametrize("method", ["dense", "exact", "tokenselect"])
def test_nan_in_a_later_feed_chunk_rolls_back_the_whole_feed(tiny, method):
    clean, s = _pair(tiny, method)
    before = _state(s)
    bad = _prompt(90, 1)
    bad[70] = POISON  # the third chunk of 32: two chunks are appended before it fails
    with _nan(tiny.net.embed_tokens.weight, POISON), pytest.raises(NonFiniteError, match="prefill of tokens 168..") as e:
        s.feed(bad)
    assert "rolled back" in str(e.value)
    assert _state(s) == before
    clean.feed(bad)  # repaired: the same feed now gives what a clean session gives
    s.feed(bad)
    assert s.generate(8) == clean.generate(8) and s.tokens == clean.tokens
    torch.testing.assert_close(s.last_logits, clean.last_logits, rtol=0, atol=0)


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_nan_weights_in_generate_roll_back_every_step_of_the_call(tiny, method):
    clean, s = _pair(tiny, method)
    before = _state(s)
    w = tiny.net.layers[1].mlp.down_proj.weight
    with _nan(w, (3, 5)), pytest.raises(NonFiniteError, match="non-finite"):
        s.generate(12)
    assert _state(s) == before  # not 59 tokens more, as the exact retriever once left it
    assert s.generate(16) == clean.generate(16) and s.tokens == clean.tokens
    torch.testing.assert_close(s.last_logits, clean.last_logits, rtol=0, atol=0)
    assert _state(s) == _state(clean)


@pytest.mark.parametrize("method", ["dense", "exact"])
def test_nan_kv_in_the_tiers_is_reported_and_the_step_rolled_back(tiny, method):
    clean, s = _pair(tiny, method)
    before = _state(s)
    if method == "dense":
        keys = s.backend.layers[0].k
    else:
        keys = s.backend.cache[0].k  # the static tier: every decode step reads it
    with _nan(keys, (5, 1, 3)):
        with pytest.raises(NonFiniteError):
            s.generate(8)
        assert _state(s) == before
        with pytest.raises(NonFiniteError, match="decode step of token 104"):
            s.step(3)
        assert _state(s) == before
    assert s.generate(10) == clean.generate(10) and s.tokens == clean.tokens


def test_first_feed_of_nan_weights_leaves_an_empty_usable_session(tiny):
    s = Session(tiny, CONFIGS["exact"], RUNTIME, CACHE)
    with _nan(tiny.net.layers[0].self_attn.k_proj.weight, (0, 0)), pytest.raises(NonFiniteError):
        s.feed(_prompt(100, 0))
    assert len(s) == 0 and s.last_logits is None and s.stats()["tier_tokens"] == {"static": 0, "host": 0, "disk": 0}
    s.feed(_prompt(100, 0))
    clean = Session(tiny, CONFIGS["exact"], RUNTIME, CACHE)
    clean.feed(_prompt(100, 0))
    assert s.generate(10) == clean.generate(10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_finite_sum_flags_exactly_the_non_finite(dtype):
    big = torch.full((4096, 3), torch.finfo(dtype).max, dtype=dtype)  # its sum overflows dtype, not fp64
    assert bool(torch.isfinite(finite_sum(big))) and bool(torch.isfinite(finite_sum(-big)))
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = big.clone()
        t[1234, 1] = bad
        assert not bool(torch.isfinite(finite_sum(t)))
    mixed = torch.tensor([float("inf"), float("-inf")], dtype=dtype)  # inf - inf reads as NaN
    assert not bool(torch.isfinite(finite_sum(mixed)))

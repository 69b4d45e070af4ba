"""Bad input gets a clear ValueError/TypeError naming the fix, and the session stays usable."""

import pytest
import torch

import kvloft
from kvloft import CacheConfig, RetrievalConfig, RuntimeConfig, Session


@pytest.fixture(scope="module")
def tiny():
    return kvloft.load_model("tiny", device="cpu", dtype="float32")


def _session(tiny, **cache):
    return Session(tiny, RetrievalConfig(method="exact", budget=16, n_sink=4, n_window=8),
                   RuntimeConfig(progress=False), CacheConfig(**cache))


def test_unknown_model_and_method():
    with pytest.raises(ValueError, match="unknown model 'nope'.*preset"):
        kvloft.load_model("nope")
    with pytest.raises(ValueError, match="unknown retrieval method 'magic'"):
        RetrievalConfig(method="magic")


@pytest.mark.parametrize("budget,exc", [(-1, ValueError), (2.5, TypeError), ("10", TypeError), (True, TypeError)])
def test_bad_budget(budget, exc):
    with pytest.raises(exc, match="budget"):
        RetrievalConfig(budget=budget)


def test_bad_configs():
    with pytest.raises(ValueError, match="24GiB"):
        RuntimeConfig(gpu_memory_budget="lots")
    with pytest.raises(ValueError, match="kernels"):
        RuntimeConfig(kernels="fast")
    with pytest.raises(TypeError, match="RetrievalConfig"):
        Session(kvloft.load_model("tiny"), {"method": "exact"})


def test_bad_inputs_leave_session_usable(tiny):
    s = _session(tiny, max_context=64)
    s.feed(list(range(20)))
    before = s.last_logits.clone()
    n = len(s)
    with pytest.raises(ValueError, match="empty"):
        s.feed([])
    with pytest.raises(TypeError, match="integer tensor"):
        s.feed(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="1-D"):
        s.feed(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 512\)"):
        s.feed([1, 2, 600])
    with pytest.raises(ValueError, match="no tokenizer"):
        s.feed("text needs a tokenizer")
    with pytest.raises(ValueError, match="max_context=64"):
        s.feed(list(range(50)))
    with pytest.raises(ValueError, match="top_p"):
        s.generate(4, top_p=0)
    assert len(s) == n and torch.equal(s.last_logits, before)  # nothing changed
    s.feed(list(range(5)))  # and it still works
    assert len(s) == n + 5


def test_host_budget_refused_before_anything_moves(tiny):
    s = Session(tiny, RetrievalConfig(method="exact", n_sink=4, n_window=8), RuntimeConfig(
        progress=False, host_memory_budget=50_000), CacheConfig(host_chunk_tokens=16))
    s.feed(list(range(20)))
    with pytest.raises(ValueError, match="host_memory_budget"):
        s.feed(list(range(200)))
    assert len(s) == 20
    s.feed(list(range(10)))


def test_generate_before_feed(tiny):
    with pytest.raises(ValueError, match="feed a prompt"):
        _session(tiny).generate(3)


def test_retriever_rejects_nan_keys():
    cfg = kvloft.ModelConfig.from_name("tiny")
    r = kvloft.index.make_retriever(RetrievalConfig(method="exact"), cfg)
    keys = torch.randn(cfg.n_kv_heads, 10, cfg.head_dim)
    keys[0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        r.build(0, keys, None)

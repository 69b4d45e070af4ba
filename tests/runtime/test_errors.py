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


def test_prefill_chunk_default_resolves_per_device(tiny):
    assert RuntimeConfig().resolved_prefill_chunk("cuda:1") == 512
    assert RuntimeConfig().resolved_prefill_chunk(torch.device("cpu")) == 8192
    assert RuntimeConfig(prefill_chunk=37).resolved_prefill_chunk("cpu") == 37
    with pytest.raises(ValueError, match="prefill_chunk"):
        RuntimeConfig(prefill_chunk=0)
    s = Session(tiny, RetrievalConfig(method="dense"), RuntimeConfig(device="cpu", progress=False))
    seen = []
    s.feed([t % 500 + 1 for t in range(8194)], on_progress=lambda done, total: seen.append(done))
    assert seen == [8192, 8194]


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


# ---- memory of the static tier and dense KV: refused before allocating ----------------------


def test_huge_static_tier_is_refused_before_allocating(tiny, monkeypatch):
    import kvloft.runtime.capacity as session_mod

    monkeypatch.setattr(session_mod, "available_bytes", lambda dev: 2**30)  # a 1 GiB machine
    monkeypatch.setattr(session_mod.TieredKVCache, "__init__", lambda *a, **k: pytest.fail("allocated"))
    with pytest.raises(ValueError, match=r"static tier \(\d+\.?\d* GiB: n_sink=64 \+ n_window=100000000.*"
                                         r"available; lower RetrievalConfig.n_window"):
        Session(tiny, RetrievalConfig(method="exact", n_window=10**8))


def test_static_tier_counts_against_the_gpu_budget_on_the_cpu_too(tiny):
    rcfg = RetrievalConfig(method="exact", n_sink=4, n_window=4096)  # 2 layers x 4100 x 392 B = 3.07 MiB
    with pytest.raises(ValueError, match=r"weights \(1.94 MiB\) \+ the static tier \(3.07 MiB.*exceed "
                                         r"gpu_memory_budget=4 MiB \(on the CPU.*lower RetrievalConfig.n_window"):
        Session(tiny, rcfg, RuntimeConfig(progress=False, gpu_memory_budget="4MiB"))
    Session(tiny, rcfg, RuntimeConfig(progress=False, gpu_memory_budget="6MiB"))  # fits: built
    # the host budget is the host tier's (with a disk tier: the chunks kept in memory)
    Session(tiny, rcfg, RuntimeConfig(progress=False, host_memory_budget="1MiB"))


def test_dense_kv_growth_counts_against_the_budget(tiny):
    budget = tiny.weight_bytes + 2**20
    s = Session(tiny, RetrievalConfig(method="dense"), RuntimeConfig(progress=False, gpu_memory_budget=budget))
    s.feed(list(range(100)))  # 1024 rows x 2 layers x 2 x 3 x 16 x 4 B = 768 KiB, allocated up front
    with pytest.raises(ValueError, match=r"dense KV for 1100 tokens \(1.5 MiB.*gpu_memory_budget"):
        s.feed([i % 500 for i in range(1000)])
    assert len(s) == 100 and s.backend.layers[0].k.shape[0] == 1024


def test_host_budget_refusal_names_the_options_that_size_it(tiny):
    s = Session(tiny, RetrievalConfig(method="exact", n_sink=4, n_window=8),
                RuntimeConfig(progress=False, host_memory_budget=50_000), CacheConfig(host_chunk_tokens=4096))
    with pytest.raises(ValueError, match=r"host_chunk_tokens=4096.*n_window.*disk_dir") as e:
        s.feed(list(range(80)))
    assert "3.06 MiB each" in str(e.value)  # 4096 tokens x 2 layers x (2 x 3 x 16 x 4 + 8) B
    assert len(s) == 0


# ---- arguments of feed / generate / stream ---------------------------------------------------


@pytest.mark.parametrize("prompt,exc,match", [
    (b"hello", TypeError, "bytes.*decode"),
    (bytearray(b"hi"), TypeError, "bytearray"),
    ([1, 2.0], TypeError, "Python ints, got float"),
    ([1, True], TypeError, "got bool"),
    (torch.tensor([True, False]), TypeError, "integer tensor"),
    (3, TypeError, "got int"),
    (None, TypeError, "got NoneType"),
])
def test_feed_rejects_what_is_not_text_or_ids(tiny, prompt, exc, match):
    s = _session(tiny)
    with pytest.raises(exc, match=match):
        s.feed(prompt)
    with pytest.raises(TypeError, match="on_progress"):
        s.feed([1, 2], on_progress=5)
    assert len(s) == 0


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"temperature": float("nan")}, ValueError, "temperature must be a finite"),
    ({"temperature": float("inf")}, ValueError, "temperature must be a finite"),
    ({"temperature": -0.5}, ValueError, "temperature must be >= 0"),
    ({"temperature": "0.7"}, TypeError, "temperature must be a number"),
    ({"top_p": float("nan")}, ValueError, "top_p must be a finite"),
    ({"top_p": 1.5}, ValueError, r"top_p must lie in \(0, 1\]"),
    ({"top_p": True}, TypeError, "top_p must be a number"),
    ({"max_new_tokens": -1}, ValueError, "max_new_tokens must be >= 0"),
    ({"max_new_tokens": 4.0}, TypeError, "max_new_tokens must be an int"),
    ({"max_new_tokens": float("inf")}, TypeError, "max_new_tokens must be an int"),
    ({"stop": 5}, TypeError, "stop must be a str, a list of str or None, got int"),
    ({"stop": [5]}, TypeError, "stop strings must be str"),
    ({"stop": ""}, ValueError, "empty stop string"),
    ({"seed": "1"}, TypeError, "seed must be an int"),
])
def test_generation_arguments_are_checked_at_the_call(tiny, kwargs, exc, match):
    s = _session(tiny)
    s.feed(list(range(10)))
    with pytest.raises(exc, match=match):
        s.generate(**kwargs)
    with pytest.raises(exc, match=match):
        s.stream(**kwargs)  # at the call, not at the first next()
    assert len(s) == 10

"""Every retriever runs inside a Session; with a budget covering the host tier it equals dense."""

import pytest
import torch

from kvloft import RetrievalConfig, RuntimeConfig, Session, load_model

COVERING = {
    "exact": {},
    "tokenselect": {},
    "recycled": {},
    "hip": {},
    "actqkv": {},
    "attention_graph": {},  # fed chunk by chunk during prefill (incremental), then searched
}


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu", dtype="float32", seed=5)


def _run(model, rcfg, prompt, steps):
    s = Session(model, rcfg, RuntimeConfig(prefill_chunk=64, progress=False))
    s.feed(prompt)
    out = [s.step(int(t)).clone() for t in steps]
    return torch.stack(out), s


@pytest.mark.parametrize("method", sorted(COVERING))
def test_covering_budget_equals_dense(tiny, method):
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, tiny.config.vocab_size, (300,), generator=g)
    steps = torch.randint(0, tiny.config.vocab_size, (6,), generator=g)
    dense, _ = _run(tiny, RetrievalConfig(method="dense"), prompt, steps)
    rcfg = RetrievalConfig(method=method, budget=4096, n_sink=8, n_window=32, options=COVERING[method])
    got, s = _run(tiny, rcfg, prompt, steps)
    assert s.stats()["tier_tokens"]["host"] > 200
    err = ((got.double() - dense.double()).norm() / dense.double().norm()).item()
    assert err < 1e-5, (method, err)


@pytest.mark.parametrize("method", sorted(COVERING))
def test_small_budget_runs_and_selects(tiny, method):
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, tiny.config.vocab_size, (400,), generator=g)
    rcfg = RetrievalConfig(method=method, budget=64, n_sink=8, n_window=32)
    s = Session(tiny, rcfg, RuntimeConfig(prefill_chunk=128, progress=False))
    s.feed(prompt)
    for t in range(5):
        logits = s.step(t)
        assert torch.isfinite(logits).all()
    st = s.stats()
    assert st["retriever"]["calls"] == 5 * tiny.config.n_layers


def test_host_side_partial_attention_path(tiny, monkeypatch):
    """The CPU-next-to-the-data path (taken on CUDA for attention_graph) equals the gather path."""
    import types

    import kvloft.index.attention_graph as ag

    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, tiny.config.vocab_size, (300,), generator=g)
    rcfg = RetrievalConfig(method="exact", budget=48, n_sink=8, n_window=32)
    ref, _ = _run(tiny, rcfg, prompt, range(4))
    s = Session(tiny, rcfg, RuntimeConfig(prefill_chunk=64, progress=False))
    s.feed(prompt)
    calls = []
    real = ag.cpu_partial_attention
    monkeypatch.setattr(ag, "cpu_partial_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(s.backend.retriever, "attend_on_host", True, raising=False)
    monkeypatch.setattr(s.backend, "device", types.SimpleNamespace(type="cuda"))  # as if on a GPU
    got = torch.stack([s.step(t).clone() for t in range(4)])
    assert len(calls) == 4 * tiny.config.n_layers
    assert torch.allclose(got, ref, atol=1e-5)


def test_hip_reading_the_host_tier_in_place_equals_its_own_copy(tiny):
    # keys_on="host": HiP searches the session's host tier itself (no key copy, no add());
    # the selections, hence the logits, equal those of HiP over its own copy of the keys
    from kvloft import CacheConfig

    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, tiny.config.vocab_size, (700,), generator=g)
    steps = torch.randint(0, tiny.config.vocab_size, (12,), generator=g)
    small = {"chunk_sizes": (64, 16, 4), "kept_tokens": (256, 128, 64), "refresh_steps": (4, 2, 1), "chunk_rows": 128}
    runs = {}
    for where in ("device", "host"):
        rcfg = RetrievalConfig(method="hip", budget=64, n_sink=8, n_window=32, options={**small, "keys_on": where})
        s = Session(tiny, rcfg, RuntimeConfig(prefill_chunk=128, progress=False), CacheConfig(host_chunk_tokens=256))
        s.feed(prompt)
        runs[where] = torch.stack([s.step(int(t)).clone() for t in steps])
        hip = s.backend.retriever
        if where == "host":
            assert not hip.keys and sorted(hip.tiers) == list(range(tiny.config.n_layers))
            assert s.backend.attached == set(range(tiny.config.n_layers))
            assert len(hip._keys_of(0)) == s.stats()["tier_tokens"]["host"]  # rows added while decoding
        else:
            assert not hip.tiers and len(hip.keys[0]) == s.stats()["tier_tokens"]["host"]
    assert torch.equal(runs["device"], runs["host"])
    # a tier chunked in a size HiP's stage 1 cannot split is copied instead
    rcfg = RetrievalConfig(method="hip", budget=64, n_sink=8, n_window=32, options={**small, "keys_on": "host"})
    s = Session(tiny, rcfg, RuntimeConfig(prefill_chunk=128, progress=False), CacheConfig(host_chunk_tokens=100))
    s.feed(prompt)
    assert not s.backend.attached and len(s.backend.retriever.keys[0]) > 0

"""One-launch decode attention (runtime/rowspace.py) against the two-launch path and the
torch reference; HiP's stable selections and staggered refreshes."""

from __future__ import annotations

import pytest
import torch

import kvloft
from kvloft import RetrievalConfig, RuntimeConfig, Session, load_model
from kvloft.index.base import make_retriever
from kvloft.kernels import kernel_set

HIP = {"chunk_sizes": (16, 8, 4), "kept_tokens": (64, 32, 16), "refresh_steps": (4, 2, 2), "chunk_rows": 32,
       "keys_on": "host"}


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu", dtype="float32", seed=3)


def _run(model, rcfg, prompt, steps, kernels, one_launch=True, cache_selections=True, host_dtype=None):
    """Logits of prefill + decode; host tier in 3 chunks of 32 rows, 8 rows going down per
    batch (one batch during the steps, so a stable selection sees fresh rows)."""
    s = Session(model, rcfg, RuntimeConfig(prefill_chunk=64, progress=False, kernels="reference"),
                kvloft.CacheConfig(host_chunk_tokens=32, evict_batch=8, host_dtype=host_dtype))
    s.backend.one_launch, s.backend.cache_selections = one_launch, cache_selections
    s.feed(prompt)  # prefill through the reference (the interpreted merge of prefill is slow)
    if kernels == "triton":  # decode as a CUDA session's: the kernels read the chunks in place
        s.backend.ops = kernel_set("triton", "cpu")
        for t in s.backend.cache.layers:
            t._host_k.pin = t._host_v.pin = True
    out = [s.step(int(t)).clone() for t in steps]
    return torch.stack(out), s


@pytest.mark.parametrize("method,options", [("hip", HIP), ("exact", {})])
def test_one_launch_equals_two_launches_and_reference(tiny, method, options):
    """Static tier + selection (+ HiP's cached stable rows) in one launch give the logits of
    the static/retrieved launches + merge and of the torch reference, with a selective
    budget, a host tier of several chunks and rows arriving during decode. Fails if the
    table, the static ids or the cached rows point at the wrong rows."""
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, tiny.config.vocab_size, (100,), generator=gen)  # 80 host rows
    steps = torch.randint(0, tiny.config.vocab_size, (12,), generator=gen)  # +8 host rows at step 9
    rcfg = RetrievalConfig(method=method, budget=24, n_sink=4, n_window=16, options=options)
    one, s = _run(tiny, rcfg, prompt, steps, "triton")
    two, s2 = _run(tiny, rcfg, prompt, steps, "triton", one_launch=False)
    ref, _ = _run(tiny, rcfg, prompt, steps, "reference")
    assert s.backend.cache[0].n_host == 88 and len(s.backend.cache[0].host_k.chunks) == 3
    assert len(s.backend._spaces) == tiny.config.n_layers and not s2.backend._spaces
    torch.testing.assert_close(one, two, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(one, ref, rtol=1e-4, atol=1e-4)
    space = s.backend._spaces[0]
    if method == "hip":  # the cache is filled once per refresh of the last stage, not per step
        assert 1 < space.fills < len(steps)
        assert space.fills == s.backend.retriever.stats()["refreshes"][-1] // tiny.config.n_layers
    else:
        assert space.fills == 0 and space.cache_k is None  # per-head selections: no stable part, no cache


def test_stale_cache_is_not_read(tiny):
    """With the selection cache off the one-launch path reads every selected row from the
    host tier; its logits equal the cached run's (the cache holds the same rows)."""
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, tiny.config.vocab_size, (100,), generator=gen)
    steps = torch.randint(0, tiny.config.vocab_size, (6,), generator=gen)
    rcfg = RetrievalConfig(method="hip", budget=24, n_sink=4, n_window=16, options=HIP)
    cached, s = _run(tiny, rcfg, prompt, steps, "triton")
    plain, s2 = _run(tiny, rcfg, prompt, steps, "triton", cache_selections=False)
    assert s.backend._spaces[0].fills > 0 and s2.backend._spaces[0].fills == 0
    torch.testing.assert_close(cached, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("host_dtype", ["fp8", "int8"])
def test_cached_rows_of_an_8bit_tier(tiny, host_dtype):
    """An 8-bit host tier: the stable rows cached on the device (codes and scales gathered,
    dequantized there) give the logits of reading every selected row's codes in place, and
    the cache is filled once per refresh. Fails if the gathered codes or scales are the wrong
    rows, or if the dequantization differs from the kernels'."""
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, tiny.config.vocab_size, (100,), generator=gen)
    steps = torch.randint(0, tiny.config.vocab_size, (6,), generator=gen)
    rcfg = RetrievalConfig(method="hip", budget=24, n_sink=4, n_window=16, options=HIP)
    cached, s = _run(tiny, rcfg, prompt, steps, "triton", host_dtype=host_dtype)
    plain, s2 = _run(tiny, rcfg, prompt, steps, "triton", cache_selections=False, host_dtype=host_dtype)
    space = s.backend._spaces[0]
    assert space.fills > 0 and s2.backend._spaces[0].fills == 0
    rows = space.cached_src[: space.cached_n].cpu()
    host = s.backend.cache[0].host_k
    torch.testing.assert_close(space.cache_k[: space.cached_n], host.rows(rows), rtol=0, atol=0)
    torch.testing.assert_close(cached, plain, rtol=1e-5, atol=1e-5)


def _hip(layer_count=1, **options):
    cfg = kvloft.ModelConfig.from_name("tiny")
    return make_retriever(RetrievalConfig(method="hip", options={**HIP, "keys_on": "device", **options}),
                          cfg, "cpu"), cfg


def test_hip_selection_stable_part():
    """ids == cat(fresh rows, stable[:budget - fresh]); the stable tensor is the same object
    until the last stage runs again, and rows added in between come first as fresh."""
    hip, cfg = _hip(refresh_steps=(8, 4, 4))
    gen = torch.Generator().manual_seed(2)
    hip.build(0, torch.randn(cfg.n_kv_heads, 256, cfg.head_dim, generator=gen), None)
    q = torch.randn(cfg.n_heads, cfg.head_dim, generator=gen)
    prev = None
    for step in range(9):
        if step == 2:
            hip.add(0, torch.randn(cfg.n_kv_heads, 3, cfg.head_dim, generator=gen), torch.arange(3))
        sel = hip.select(0, q, 24)
        assert not sel.padded and sel.ids.shape == (24,)
        nf = sel.n_fresh
        assert torch.equal(sel.ids[nf:], sel.stable[: 24 - nf])
        refreshed = hip.state[0].refreshed[-1]
        assert refreshed == (step % 4 == 0)
        if prev is not None:
            assert (sel.stable is prev) == (not refreshed)
        assert nf == (3 if step in (2, 3) else 0)  # fresh until the next refresh (step 4)
        if nf:
            assert sel.ids[:nf].tolist() == [256, 257, 258]
        prev = sel.stable
    assert hip.stats()["selected"] == 9 * 24


def test_hip_refreshes_staggered_over_layers():
    """Layer l refreshes its stages l % refresh_steps[0] steps later in the cycle; every
    layer's first select refreshes all. Over 8 layers and refresh_steps[0] = 8 each later
    step refreshes stage 1 of exactly one layer; stagger=False refreshes all at once."""
    def flags(every, step):
        out, cascade = [], False
        for e in every:
            cascade = cascade or step % e == 0
            out.append(cascade)
        return tuple(out)

    every = (8, 4, 2)
    for stagger in (True, False):
        hip, cfg = _hip(refresh_steps=every, stagger=stagger)
        gen = torch.Generator().manual_seed(3)
        for layer in range(8):
            hip.build(layer, torch.randn(cfg.n_kv_heads, 256, cfg.head_dim, generator=gen), None)
        q = torch.randn(cfg.n_heads, cfg.head_dim, generator=gen)
        for step in range(17):
            stage1 = 0
            for layer in range(8):
                hip.select(layer, q, 24)
                got = hip.state[layer].refreshed
                want = (True,) * 3 if step == 0 else flags(every, step + (layer if stagger else 0))
                assert got == want, (stagger, step, layer)
                stage1 += got[0]
            if step:
                assert stage1 == (1 if stagger else (8 if step % 8 == 0 else 0))


def test_hip_stagger_option_is_checked():
    with pytest.raises(ValueError, match="stagger must be true or false"):
        _hip(stagger="yes")


@pytest.mark.gpu
@pytest.mark.parametrize("method,options", [("hip", {"keys_on": "host"}), ("exact", {})])
def test_gpu_one_launch_equals_split_and_dense(method, options):
    """CUDA, pinned host chunks read in place: the one-launch path (with HiP's selection
    cache) gives the two-launch path's logits; with a covering budget, dense attention's."""
    model = load_model("tiny", device="cuda", dtype="float32", seed=3)
    gen = torch.Generator().manual_seed(4)
    prompt = torch.randint(0, model.config.vocab_size, (900,), generator=gen)
    steps = torch.randint(0, model.config.vocab_size, (40,), generator=gen)

    def run(budget, one_launch=True, method=method, options=options):
        rcfg = RetrievalConfig(method=method, budget=budget, n_sink=4, n_window=32, options=options)
        s = Session(model, rcfg, RuntimeConfig(prefill_chunk=128, progress=False),
                    kvloft.CacheConfig(host_chunk_tokens=256, evict_batch=16))
        s.backend.one_launch = one_launch
        s.feed(prompt)
        out = torch.stack([s.step(int(t)).clone() for t in steps])
        return out, s

    one, s = run(64)
    two, _ = run(64, one_launch=False)
    assert s.backend._spaces and len(s.backend.cache[0].host_k.chunks) == 4
    if method == "hip":
        assert 0 < s.backend._spaces[0].fills < len(steps)
    torch.testing.assert_close(one, two, rtol=1e-4, atol=1e-4)
    dense, _ = run(0, method="dense", options={})
    cover, _ = run(10_000)
    err = (cover.double() - dense.double()).norm() / dense.double().norm()
    assert err < 1e-4, err


@pytest.mark.gpu
@pytest.mark.parametrize("host_dtype", ["fp8", "int8"])
def test_gpu_cached_rows_of_an_8bit_tier(host_dtype):
    """CUDA, pinned 8-bit host chunks: HiP's stable rows cached on the device (codes and scales
    gathered zero-copy, dequantized there) give the logits of reading every selected row's codes
    in place, and the cache holds exactly the tier's dequantized rows."""
    model = load_model("tiny", device="cuda", dtype="float32", seed=3)
    gen = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, model.config.vocab_size, (900,), generator=gen)
    steps = torch.randint(0, model.config.vocab_size, (24,), generator=gen)

    def run(cache_selections):
        rcfg = RetrievalConfig(method="hip", budget=64, n_sink=4, n_window=32, options={"keys_on": "host"})
        s = Session(model, rcfg, RuntimeConfig(prefill_chunk=128, progress=False),
                    kvloft.CacheConfig(host_chunk_tokens=256, evict_batch=16, host_dtype=host_dtype))
        s.backend.cache_selections = cache_selections
        s.feed(prompt)
        return torch.stack([s.step(int(t)).clone() for t in steps]), s

    cached, s = run(True)
    plain, s2 = run(False)
    space = s.backend._spaces[0]
    assert 0 < space.fills < len(steps) and s2.backend._spaces[0].fills == 0
    rows = space.cached_src[: space.cached_n].cpu()
    torch.testing.assert_close(space.cache_k[: space.cached_n].cpu(), s.backend.cache[0].host_k.rows(rows).cpu(),
                               rtol=0, atol=0)
    torch.testing.assert_close(cached, plain, rtol=1e-4, atol=1e-4)


def test_one_launch_waits_for_rows_in_flight(tiny):
    """The kernel reads host rows in place, so a copy of evicted rows still in flight to the
    host tier is waited for before the launch (exact: its own key copy never waits)."""

    class Event:  # stands in for the CUDA event behind a copy down
        waited = 0

        def synchronize(self):
            Event.waited += 1

    gen = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, tiny.config.vocab_size, (100,), generator=gen)
    rcfg = RetrievalConfig(method="exact", budget=24, n_sink=4, n_window=16)
    _, s = _run(tiny, rcfg, prompt, torch.tensor([1]), "triton")
    for t in s.backend.cache.layers:
        t._d2h_done = Event()
    s.step(2)
    assert Event.waited == tiny.config.n_layers
    assert all(t._d2h_done is None for t in s.backend.cache.layers)

"""Disk tier: host chunks spilled to memory-mapped files under CacheConfig.disk_dir.

Reference: the same session with no host budget (every chunk in memory). Spilling moves
bytes, not values, so decode logits must be bit-identical; with a covering exact budget
they also equal dense attention.
"""

import gc

import pytest
import torch

from kvloft import CacheConfig, RetrievalConfig, RuntimeConfig, Session, load_model
from kvloft.tiers.chunked import ChunkedRows, SpillPolicy

CHUNK = 32  # host chunk tokens: small, so a 200-token context makes several chunks


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu", dtype="float32", seed=5)


def _chunk_set_bytes(model) -> int:
    """Host bytes of one chunk of k, v and positions in every layer."""
    c = model.config
    return CHUNK * (2 * c.n_kv_heads * c.head_dim * 4 + 8) * c.n_layers


def _session(model, rcfg, budget=0, disk_dir=None, scheduler="none"):
    runtime = RuntimeConfig(prefill_chunk=64, progress=False, host_memory_budget=budget, scheduler=scheduler)
    return Session(model, rcfg, runtime, CacheConfig(host_chunk_tokens=CHUNK, disk_dir=disk_dir))


def _run(s, prompt, steps):
    s.feed(prompt)
    out = [s.last_logits.clone()]
    for t in steps:
        out.append(s.step(int(t)).clone())
    return torch.stack(out)


def _spill_files(root):
    return sorted(p for p in root.rglob("*.bin"))


def test_chunked_rows_spill_keeps_rows(tmp_path):
    """Spilled chunks read back bit-identically (bf16 keys, int64 positions), and only
    full chunks past max_resident spill."""
    for dtype, shape in ((torch.bfloat16, (3, 5)), (torch.int64, ())):
        policy = SpillPolicy(2, lambda ci, d=dtype: tmp_path / f"{d}.{ci}.bin")
        store, ref = ChunkedRows(shape, dtype, 7, spill=policy), ChunkedRows(shape, dtype, 7)
        data = (torch.randn(45, *shape) * 100).to(dtype)
        for a in range(0, 45, 11):
            store.append(data[a : a + 11])
            ref.append(data[a : a + 11])
        assert len(store.chunks) == 7 and store.n_spilled == 5  # 7 chunks, 2 in memory
        assert store.nbytes == 2 * ref.nbytes // 7 and store.disk_nbytes == 5 * ref.nbytes // 7
        assert torch.equal(store.all(), data)
        ids = torch.tensor([[0, 44, 13], [20, 6, 35]])
        assert torch.equal(store.rows(ids), data[ids])
        if shape:
            heads = torch.tensor([[0, 2, 1], [1, 1, 0]])
            assert torch.equal(store.rows(ids, heads), data[ids, heads])


@pytest.mark.parametrize("budget", [10_000, 24])
def test_spilled_session_equals_in_memory(tiny, tmp_path, budget):
    """Bit for bit against an in-memory session searching a key copy, as a spilled session
    does (the copy keeps the search off the disk); against the CPU default, which searches
    the in-memory host tier in place and reuses its logits, within fp32 rounding."""
    rcfg = RetrievalConfig(method="exact", budget=budget, n_sink=4, n_window=32)
    copy = RetrievalConfig(method="exact", budget=budget, n_sink=4, n_window=32, options={"keys_on": "device"})
    prompt = torch.randint(0, tiny.config.vocab_size, (230,))
    steps = torch.randint(0, tiny.config.vocab_size, (8,))
    want = _run(_session(tiny, copy), prompt, steps)
    in_place = _run(_session(tiny, rcfg), prompt, steps)
    host_budget = 2 * _chunk_set_bytes(tiny)
    s = _session(tiny, rcfg, host_budget, str(tmp_path))
    got = _run(s, prompt, steps)
    assert torch.equal(got, want)
    torch.testing.assert_close(got, in_place, rtol=1e-5, atol=1e-5)
    st = s.stats()
    assert 0 < st["bytes"]["host"] <= host_budget
    assert st["bytes"]["disk"] > 0 and st["tier_tokens"]["disk"] > 0
    n_host = s.backend.cache[0].n_host
    assert st["tier_tokens"]["host"] + st["tier_tokens"]["disk"] == n_host
    # one file per layer, tensor (k, v, pos) and spilled chunk
    spilled = s.backend.cache[0].host_k.n_spilled
    assert len(_spill_files(tmp_path)) == 3 * tiny.config.n_layers * spilled
    if budget > n_host:  # a covering exact budget is dense attention
        dense = _run(_session(tiny, RetrievalConfig(method="dense")), prompt, steps)
        assert ((got.double() - dense.double()).norm() / dense.double().norm()) < 1e-5


@pytest.mark.parametrize("method,scheduler", [("tokenselect", "none"), ("recycled", "none"), ("hip", "none"),
                                              ("exact", "overlap")])
def test_retrievers_work_over_spilled_host_tier(tiny, tmp_path, method, scheduler):
    """Retrievers search their own key copies; the rows they pick are read from spilled
    chunks (TieredAttention's gather, or the scheduler's host fetch)."""
    rcfg = RetrievalConfig(method=method, budget=32, n_sink=4, n_window=32)
    prompt = torch.randint(0, tiny.config.vocab_size, (200,))
    steps = torch.randint(0, tiny.config.vocab_size, (5,))
    want = _run(_session(tiny, rcfg, scheduler=scheduler), prompt, steps)
    s = _session(tiny, rcfg, _chunk_set_bytes(tiny), str(tmp_path), scheduler)
    assert torch.equal(_run(s, prompt, steps), want)
    assert s.stats()["bytes"]["disk"] > 0


def test_files_removed_on_reset_and_when_dropped(tiny, tmp_path):
    rcfg = RetrievalConfig(method="exact", budget=16, n_sink=4, n_window=32)
    s = _session(tiny, rcfg, _chunk_set_bytes(tiny), str(tmp_path))
    s.feed(torch.randint(0, tiny.config.vocab_size, (200,)))
    assert _spill_files(tmp_path)
    s.reset()
    assert not _spill_files(tmp_path) and not list(tmp_path.iterdir())
    assert s.stats()["bytes"]["disk"] == 0
    s.feed(torch.randint(0, tiny.config.vocab_size, (200,)))  # usable after reset, spills again
    assert _spill_files(tmp_path)
    del s
    gc.collect()
    assert not list(tmp_path.iterdir())


def test_without_disk_dir_the_budget_refuses(tiny):
    rcfg = RetrievalConfig(method="exact", budget=16, n_sink=4, n_window=32)
    s = _session(tiny, rcfg, 2 * _chunk_set_bytes(tiny))
    s.feed(torch.randint(0, tiny.config.vocab_size, (60,)))  # counted as 60 host tokens: 2 chunks
    with pytest.raises(ValueError, match="host_memory_budget.*disk_dir"):
        s.feed(torch.randint(0, tiny.config.vocab_size, (200,)))
    assert len(s) == 60 and s.stats()["bytes"]["disk"] == 0  # refused before anything changed
    s.step(1)


def test_bad_disk_tier_settings_refused(tiny, tmp_path):
    rcfg = RetrievalConfig(method="exact", budget=16, n_sink=4, n_window=32)
    with pytest.raises(ValueError, match="host_chunk_tokens"):  # budget below one chunk per layer
        _session(tiny, rcfg, _chunk_set_bytes(tiny) - 1, str(tmp_path))
    with pytest.raises(TypeError, match="disk_dir"):
        CacheConfig(disk_dir=3)
    with pytest.raises(TypeError, match="disk_dir"):
        CacheConfig(disk_dir=" ")
    a_file = tmp_path / "f"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="disk_dir"):
        _session(tiny, rcfg, _chunk_set_bytes(tiny), str(a_file))


def test_save_and_load_a_spilled_session(tiny, tmp_path):
    """A save holds spilled chunks like resident ones; the loaded session spills again
    under the saved budget and continues with the same logits."""
    rcfg = RetrievalConfig(method="exact", budget=24, n_sink=4, n_window=32)
    host_budget = 2 * _chunk_set_bytes(tiny)
    spill = tmp_path / "spill"
    s = _session(tiny, rcfg, host_budget, str(spill))
    s.feed(torch.randint(0, tiny.config.vocab_size, (300,)))
    s.save(tmp_path / "save")
    loaded = Session.load(tmp_path / "save", tiny)
    st = loaded.stats()
    assert st["bytes"] == s.stats()["bytes"] and 0 < st["bytes"]["host"] <= host_budget
    per_session = 3 * tiny.config.n_layers * s.backend.cache[0].host_k.n_spilled
    assert len(_spill_files(spill)) == 2 * per_session  # both sessions' files, in two subdirectories
    steps = torch.randint(0, tiny.config.vocab_size, (6,))
    got = torch.stack([loaded.step(int(t)) for t in steps])
    assert torch.equal(got, torch.stack([s.step(int(t)) for t in steps]))

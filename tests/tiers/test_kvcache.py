"""Tier round trip: every token readable from the right tier, bit-exact, with its position."""

import pytest
import torch

from kvloft.config import ModelConfig
from kvloft.tiers.chunked import ChunkedRows
from kvloft.tiers.kvcache import TieredKVCache


@pytest.mark.parametrize("n_sink,n_window,chunks", [(5, 33, [1] * 3000), (0, 7, [3, 1, 250, 1, 1, 999, 17] * 40),
                                                    (64, 512, [512] * 9 + [1] * 700)])
def test_round_trip(n_sink, n_window, chunks):
    cfg = ModelConfig.from_name("tiny")
    cache = TieredKVCache(cfg, n_sink=n_sink, n_window=n_window, host_chunk=100,
                          device=torch.device("cpu"), dtype=torch.float32)
    total = sum(chunks)
    k_all = torch.randn(total, cfg.n_kv_heads, cfg.head_dim)
    v_all = torch.randn(total, cfg.n_kv_heads, cfg.head_dim)
    evicted_rows = 0
    start = 0
    layer = cache[0]
    for n in chunks:
        ev = layer.append(k_all[start : start + n], v_all[start : start + n], torch.arange(start, start + n))
        if ev is not None:
            assert ev.first_row == evicted_rows
            assert torch.equal(ev.positions, torch.arange(n_sink + evicted_rows, n_sink + evicted_rows + len(ev.positions)))
            evicted_rows += len(ev.positions)
        start += n
    n_host = max(0, total - n_sink - n_window)
    assert layer.n_host == n_host == evicted_rows
    # host tier: tokens n_sink .. n_sink + n_host - 1, in order, bit-exact
    hpos = layer.host_pos.all()
    assert torch.equal(hpos, torch.arange(n_sink, n_sink + n_host))
    assert torch.equal(layer.host_k.all(), k_all[n_sink : n_sink + n_host])
    assert torch.equal(layer.host_v.all(), v_all[n_sink : n_sink + n_host])
    # static tier: the sink and the last n_window tokens, each with its own position
    sk, sv, sp = layer.static_kv()
    expect = torch.cat([torch.arange(min(n_sink, total)), torch.arange(n_sink + n_host, total)])
    assert torch.equal(sp.sort().values, expect)
    assert torch.equal(sk, k_all[sp]) and torch.equal(sv, v_all[sp])
    assert len(layer.host_k.chunks) == -(-n_host // 100)  # grown chunk by chunk


def test_chunked_rows_gather_per_head():
    rows = ChunkedRows((3, 4), torch.float32, chunk_rows=7)
    data = torch.randn(50, 3, 4)
    rows.append(data[:13])
    rows.append(data[13:])
    ids = torch.tensor([[49, 0, 7], [6, 13, 8], [1, 2, 48]])
    heads = torch.arange(3)[:, None].expand_as(ids)
    assert torch.equal(rows.rows(ids, heads), data[ids, heads])
    with pytest.raises(IndexError):
        rows.rows(torch.tensor([50]))


def test_bytes_reported():
    cfg = ModelConfig.from_name("tiny")
    cache = TieredKVCache(cfg, n_sink=4, n_window=8, host_chunk=16, device=torch.device("cpu"), dtype=torch.float32)
    cache[0].append(torch.randn(30, 3, 16), torch.randn(30, 3, 16), torch.arange(30))
    b = cache.bytes()
    per_token = 3 * 16 * 4
    assert b["static"] == cfg.n_layers * (2 * 12 * per_token + 12 * 8)
    assert b["host"] == 2 * (2 * 16 * per_token + 16 * 8)  # layer 0: 18 host rows in two chunks of 16


@pytest.mark.parametrize("n_sink,n_window,batch,chunks", [
    (5, 33, 8, [1] * 300),
    (0, 7, 4, [3, 1, 250, 1, 1, 999, 17] * 10 + [1] * 50),  # feeds between decode steps compact the ring
    (4, 16, 1, [40] + [1] * 40),
])
def test_batched_eviction_round_trip(n_sink, n_window, batch, chunks):
    """evict_batch = B: a decode token joins the ring until it holds n_window + B tokens, then
    the oldest B go to the host tier in one piece; a multi-token feed keeps the last n_window.
    Every token is in exactly one tier, bit-exact, the host tier in order."""
    cfg = ModelConfig.from_name("tiny")
    cache = TieredKVCache(cfg, n_sink=n_sink, n_window=n_window, host_chunk=64, device=torch.device("cpu"),
                          dtype=torch.float32, evict_batch=batch)
    layer = cache[0]
    total = sum(chunks)
    k_all, v_all = torch.randn(total, cfg.n_kv_heads, cfg.head_dim), torch.randn(total, cfg.n_kv_heads, cfg.head_dim)
    start, ring, host = 0, 0, 0  # the expected ring and host counts
    for n in chunks:
        ev = layer.append(k_all[start : start + n], v_all[start : start + n], torch.arange(start, start + n))
        sink_take = min(n, max(0, n_sink - start))
        m = n - sink_take
        if m == 1 and ring >= n_window:
            out = batch if ring == n_window + batch else 0
            ring = ring - out + 1
        else:
            out = max(0, ring + m - n_window)
            ring = ring + m - out
        assert (ev is None and out == 0) or (ev is not None and len(ev.positions) == out and ev.first_row == host)
        host += out
        start += n
        assert layer.n_host == host and layer.ring_fill == ring <= n_window + batch
    assert torch.equal(layer.host_pos.all(), torch.arange(n_sink, n_sink + host))
    assert torch.equal(layer.host_k.all(), k_all[n_sink : n_sink + host])
    assert torch.equal(layer.host_v.all(), v_all[n_sink : n_sink + host])
    sk, sv, sp = layer.static_kv()
    expect = torch.cat([torch.arange(min(n_sink, total)), torch.arange(n_sink + host, total)])
    assert torch.equal(sp, expect)  # the ring stays in age order, a prefix of the buffer
    assert torch.equal(sk, k_all[sp]) and torch.equal(sv, v_all[sp])


def _tiers_equal(a, b) -> None:
    """Two layers' tiers hold the same tokens in the same slots, bit for bit."""
    assert a.ring_state() == b.ring_state() and a.n_host == b.n_host
    filled = torch.cat([torch.arange(a.sink_fill), a.n_sink + (a.ring_head + torch.arange(a.ring_fill)) % max(1, a.ring_cap)])
    for name in ("k", "v", "pos"):
        assert torch.equal(getattr(a, name)[filled], getattr(b, name)[filled]), name
    for name in ("host_k", "host_v", "host_pos"):
        assert torch.equal(getattr(a, name).all(), getattr(b, name).all()), name


@pytest.mark.parametrize("n_sink,n_window,batch,before,after", [
    (4, 16, 0, [40, 1, 1, 1], [1] * 30),  # ring wrapped (ring_head != 0); decode steps evict one by one
    (4, 16, 0, [40, 1, 1, 1], [25, 1, 70]),  # a feed reorders the ring and evicts its tokens
    (5, 33, 8, [60] + [1] * 12, [1] * 25 + [9]),  # batched eviction shifts the ring down
    (6, 8, 0, [3], [2, 30]),  # the sink fills during the rolled-back appends
    (0, 7, 4, [], [12, 1, 1]),  # an empty tier
])
def test_rollback_returns_tiers_to_their_mark(n_sink, n_window, batch, before, after):
    """Append, mark, append more, roll back: the tier equals one that never saw the later
    tokens, slot for slot (and both continue alike); the block summary too."""
    cfg = ModelConfig.from_name("tiny")

    def make():
        return TieredKVCache(cfg, n_sink=n_sink, n_window=n_window, host_chunk=16, device=torch.device("cpu"),
                             dtype=torch.float32, evict_batch=batch)[0]

    total = sum(before) + sum(after)
    k_all, v_all = torch.randn(total, cfg.n_kv_heads, cfg.head_dim), torch.randn(total, cfg.n_kv_heads, cfg.head_dim)

    def feed(layer, chunks, start):
        for n in chunks:
            layer.append(k_all[start : start + n], v_all[start : start + n], torch.arange(start, start + n))
            start += n
        return start

    a, b = make(), make()
    mid = feed(a, before, 0)
    feed(b, before, 0)
    for t in (a, b):
        t.block_summary(4)
    mark = a.mark()
    feed(a, after, mid)
    assert a.n_static + a.n_host == total
    a.rollback(mark)
    _tiers_equal(a, b)
    assert torch.equal(a.block_summary(4).means(), b.block_summary(4).means())
    feed(a, [1, 5, 1], mid)  # and they go on alike
    feed(b, [1, 5, 1], mid)
    _tiers_equal(a, b)
    assert torch.equal(a.block_summary(4).means(), b.block_summary(4).means())


def test_truncate_reads_back_a_spilled_chunk_it_reopens(tmp_path):
    from kvloft.tiers.chunked import SpillPolicy

    rows = ChunkedRows((2,), torch.float32, chunk_rows=4, spill=SpillPolicy(1, lambda i: tmp_path / f"c{i}.bin"))
    data = torch.randn(14, 2)
    rows.append(data)
    assert rows.n_spilled == 3
    rows.truncate(6)  # row 6 falls inside chunk 1, which was spilled: back in memory, writable
    assert rows.n_spilled == 1 and len(rows) == 6 and torch.equal(rows.all(), data[:6])
    rows.append(data[6:] + 1)
    assert torch.equal(rows.all(), torch.cat([data[:6], data[6:] + 1]))
    with pytest.raises(ValueError, match="cannot truncate"):
        rows.truncate(20)


@pytest.mark.parametrize("n_sink,n_window,batch,prompt,steps", [
    (4, 16, 0, 9, 40),  # the sink is full, the ring fills on step 12, then wraps one eviction a step
    (6, 8, 0, 2, 30),  # the sink fills during decode
    (5, 12, 4, 14, 45),  # batched evictions: four rows go down every fourth step once full
    (0, 7, 0, 30, 12),  # no sink, a wrapped ring from the start
])
def test_make_room_then_put_equals_append(n_sink, n_window, batch, prompt, steps):
    """A decode token in two halves (make_room before the step: the rows that move down are
    known without the token; put: the token into the freed slot) leaves the tiers as append
    does, slot for slot, and make_room returns the rows append would have; each step's rows
    moving down equal the step plan's arithmetic (decode_append)."""
    from kvloft.runtime.step_plan import decode_append

    cfg = ModelConfig.from_name("tiny")

    def make():
        return TieredKVCache(cfg, n_sink=n_sink, n_window=n_window, host_chunk=16, device=torch.device("cpu"),
                             dtype=torch.float32, evict_batch=batch)[0]

    total = prompt + steps
    k_all, v_all = torch.randn(total, cfg.n_kv_heads, cfg.head_dim), torch.randn(total, cfg.n_kv_heads, cfg.head_dim)
    a, b = make(), make()
    for t in (a, b):
        t.append(k_all[:prompt], v_all[:prompt], torch.arange(prompt))
    moved = set()
    for i in range(prompt, total):
        want_down, want_static = decode_append(b.ring_state(), n_sink, n_window, batch)
        ev_b = b.make_room()
        assert (0 if ev_b is None else len(ev_b.positions)) == want_down
        b.put(k_all[i], v_all[i], torch.tensor(i))
        assert b.n_static == want_static
        ev_a = a.append(k_all[i : i + 1], v_all[i : i + 1], torch.tensor([i]))
        assert (ev_a is None) == (ev_b is None)
        if ev_a is not None:
            assert ev_a.first_row == ev_b.first_row and torch.equal(ev_a.positions, ev_b.positions)
            assert torch.equal(ev_a.k, ev_b.k) and torch.equal(ev_a.v, ev_b.v)
        moved.add(want_down)
        _tiers_equal(a, b)
        sk, _, sp = b.static_kv()
        assert torch.equal(sk, k_all[sp])  # the filled slots are a prefix again after put
    assert max(moved) == (batch or 1)  # rows moved down in the run (and each step as planned)


@pytest.mark.parametrize("batch", [0, 3])
def test_rollback_between_make_room_and_put(batch):
    """A step that fails after make_room (rows moved down, the token never written) rolls back
    to its mark: the tier equals one that never began the step, and both go on alike."""
    cfg = ModelConfig.from_name("tiny")

    def make():
        return TieredKVCache(cfg, n_sink=3, n_window=10, host_chunk=16, device=torch.device("cpu"),
                             dtype=torch.float32, evict_batch=batch)[0]

    k_all, v_all = torch.randn(60, cfg.n_kv_heads, cfg.head_dim), torch.randn(60, cfg.n_kv_heads, cfg.head_dim)
    a, b = make(), make()
    failed = 0
    for i in range(60):
        mark = a.mark()
        if a.make_room() is not None:  # a failed step after its rows moved down: roll back, then step
            failed += 1
            a.rollback(mark)
            _tiers_equal(a, b)
            a.make_room()
        a.put(k_all[i], v_all[i], torch.tensor(i))
        b.append(k_all[i : i + 1], v_all[i : i + 1], torch.tensor([i]))
        _tiers_equal(a, b)
    assert failed == (60 - 13 if not batch else (60 - 13) // 3)

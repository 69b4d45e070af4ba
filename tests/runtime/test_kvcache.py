"""Tier round trip: every token readable from the right tier, bit-exact, with its position."""

import pytest
import torch

from kvloft.config import ModelConfig
from kvloft.runtime.chunked import ChunkedRows
from kvloft.runtime.kvcache import TieredKVCache


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

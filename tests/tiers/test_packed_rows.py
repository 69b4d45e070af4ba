"""8-bit host tier (CacheConfig.host_dtype, tiers/packed.py): reads dequantize, bytes are
counted packed, spilled chunks read back bit for bit, bad settings are refused with the fix."""

from __future__ import annotations

import pytest
import torch

from kvloft import CacheConfig, ModelConfig, RetrievalConfig, RuntimeConfig
from kvloft.kernels.rowquant import dequantize_rows, quantize_rows
from kvloft.scheduler.budget import plan_memory
from kvloft.tiers.chunked import SpillPolicy
from kvloft.tiers.kvcache import TieredKVCache
from kvloft.tiers.packed import PackedRows

CHUNK = 16


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_packed_rows_read_as_dequantized(kind):
    """rows / all / iter_chunks / chunks[i] / per-head rows give quantize -> dequantize of the
    appended rows (bf16), appended across chunk boundaries; truncate drops rows in both parts."""
    x = torch.randn(45, 3, 8, dtype=torch.bfloat16)
    store = PackedRows((3, 8), torch.bfloat16, kind, CHUNK)
    for a in range(0, 45, 11):
        store.append(x[a : a + 11])
    want = dequantize_rows(*quantize_rows(x, kind), kind, torch.bfloat16)
    assert len(store) == 45 and len(store.chunks) == 3 and store.dtype == torch.bfloat16
    assert torch.equal(store.all(), want)
    assert torch.equal(torch.cat([c for _, c in store.iter_chunks()]), want)
    assert torch.equal(store.chunks[1], want[CHUNK : 2 * CHUNK])
    assert torch.equal(store.chunks[2][: 45 - 2 * CHUNK], want[2 * CHUNK :])  # the filled rows of the last
    ids, head = torch.tensor([[0, 44], [20, 6]]), torch.tensor([[2, 0], [1, 1]])
    assert torch.equal(store.rows(ids), want[ids])
    assert torch.equal(store.rows(ids, head), want[ids, head])
    store.truncate(20)
    assert len(store) == 20 and len(store.scales) == 20 and torch.equal(store.all(), want[:20])


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_packed_rows_spill_to_disk_and_back(kind, tmp_path):
    """Codes and scales spill to two files per chunk and read back bit for bit; disk bytes are
    the packed bytes; a truncate into a spilled chunk reads it back into memory."""
    x = torch.randn(45, 3, 8, dtype=torch.bfloat16)
    pol = SpillPolicy(1, lambda ci: tmp_path / f"codes.{ci}.bin")
    spol = SpillPolicy(1, lambda ci: tmp_path / f"scales.{ci}.bin")
    store = PackedRows((3, 8), torch.bfloat16, kind, CHUNK, spill=pol, scale_spill=spol)
    ref = PackedRows((3, 8), torch.bfloat16, kind, CHUNK)
    store.append(x)
    ref.append(x)
    assert store.n_spilled == 2 and store.scales.n_spilled == 2
    assert store.disk_nbytes == 2 * CHUNK * (3 * 8 + 3 * 4)  # codes + fp32 scales of 2 chunks
    assert (tmp_path / "codes.1.bin").stat().st_size == CHUNK * 3 * 8
    assert (tmp_path / "scales.1.bin").stat().st_size == CHUNK * 3 * 4
    assert torch.equal(store.all(), ref.all())
    ids = torch.tensor([3, 40, 17, 31])
    assert torch.equal(store.rows(ids), ref.rows(ids))
    store.truncate(20)
    ref.truncate(20)
    assert store.n_spilled == 1 and torch.equal(store.all(), ref.all())


def test_cache_counts_packed_bytes():
    """bf16 model, host_dtype int8 / fp8: host bytes per token and layer are 2 * H_kv * (D + 4)
    + 8 (codes, fp32 scales, position) against 2 * H_kv * D * 2 + 8: about half."""
    cfg = ModelConfig.from_name("tiny")
    hkv, d = cfg.n_kv_heads, cfg.head_dim
    caches = {hd: TieredKVCache(cfg, n_sink=2, n_window=4, host_chunk=CHUNK, device=torch.device("cpu"),
                                dtype=torch.bfloat16, host_dtype=hd) for hd in (None, "int8", "fp8")}
    for cache in caches.values():
        for t in cache.layers:
            t.append(torch.randn(40, hkv, d, dtype=torch.bfloat16), torch.randn(40, hkv, d, dtype=torch.bfloat16),
                     torch.arange(40))
    plain, packed = caches[None].bytes()["host"], caches["int8"].bytes()["host"]
    chunks = 3 * cfg.n_layers  # 34 host rows per layer: 3 chunks of 16
    assert plain == chunks * CHUNK * (2 * hkv * d * 2 + 8)
    assert packed == caches["fp8"].bytes()["host"] == chunks * CHUNK * (2 * hkv * (d + 4) + 8)
    assert caches["int8"].row_bytes == 2 * hkv * (d + 4) + 8
    assert caches["int8"].host_bytes_after(30) == 4 * CHUNK * caches["int8"].row_bytes * cfg.n_layers
    pos = chunks * CHUNK * 8
    assert (packed - pos) / (plain - pos) == (d + 4) / (2 * d)  # K/V: 0.625 at D = 16, 0.516 at D = 128


def test_plan_memory_counts_packed_host_bytes():
    cfg = ModelConfig.from_name("llama3-8b")
    rcfg = RetrievalConfig(method="exact", budget=2048)
    runtime = RuntimeConfig()
    plans = {hd: plan_memory(cfg, rcfg, runtime, 100_000, torch.bfloat16, cache_cfg=CacheConfig(host_dtype=hd))
             for hd in (None, "fp8")}
    hkv, d = cfg.n_kv_heads, cfg.head_dim
    assert plans[None].host_kv / plans["fp8"].host_kv == pytest.approx((4 * hkv * d + 8) / (2 * hkv * (d + 4) + 8))


@pytest.mark.parametrize("bad", ["fp16", "bf16", "e4m3", 8, "FP8"])
def test_bad_host_dtype_refused_with_the_fix(bad):
    with pytest.raises(ValueError, match="host_dtype='fp8'"):
        CacheConfig(host_dtype=bad)
    with pytest.raises(ValueError, match="'fp8' or 'int8'"):
        TieredKVCache(ModelConfig.from_name("tiny"), n_sink=1, n_window=2, host_chunk=4, device=torch.device("cpu"),
                      dtype=torch.float32, host_dtype=bad)


def test_fp8_needs_torch_float8(monkeypatch):
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(ValueError, match="float8_e4m3fn.*host_dtype='int8'"):
        CacheConfig(host_dtype="fp8")

"""index/key_scan.py: a chunked key mirror scanned in one launch through its chunks' addresses
equals one launch per chunk (scoring.py) bit for bit, and the per-chunk route (what the CPU
runs) to fp32 rounding; rows past the store's length never reach the result."""

from __future__ import annotations

import pytest
import torch

from kvloft.config import ModelConfig, RetrievalConfig
from kvloft.index import key_scan
from kvloft.index.base import make_retriever
from kvloft.index.key_scan import scan_store
from kvloft.kernels.scoring import score
from kvloft.tiers.chunked import ChunkedRows

CHUNK = 128  # two tiles of BLOCK_N


def _store(n, hkv, d, gen, dtype=torch.float32, device="cpu", chunk_rows=CHUNK):
    """A ChunkedRows of n random rows [H_kv, D]; the unwritten rows of its last chunk hold NaN,
    so a read of them that reached the result would show."""
    st = ChunkedRows((hkv, d), dtype, chunk_rows, device)
    st.append(torch.randn(n, hkv, d, generator=gen).to(device, dtype))
    st.chunks[-1][n % chunk_rows or chunk_rows :] = float("nan")
    return st


def _per_chunk_launches(q, st, reduce, scale):
    """One scoring.py launch per chunk, concatenated (score_keys' route on CUDA)."""
    return torch.cat([score(q.to(st.dtype), c, reduce=reduce, scale=scale) for _, c in st.iter_chunks()], dim=1)


@pytest.mark.parametrize("hkv,group,d", [(3, 3, 16), (2, 7, 32)])
@pytest.mark.parametrize("reduce", ["none", "max", "sum"])
def test_one_launch_equals_per_chunk_launches(monkeypatch, hkv, group, d, reduce):
    """4 chunks of 128 rows, the last holding 37 (ends mid-tile), scale 0.3."""
    gen = torch.Generator().manual_seed(hkv + group + d)
    st = _store(3 * CHUNK + 37, hkv, d, gen)
    q = torch.randn(hkv * group, d, generator=gen)
    per_chunk = scan_store(q, st, reduce=reduce, scale=0.3)  # the CPU's route
    monkeypatch.setattr(key_scan, "_one_launch", lambda q, store: True)
    monkeypatch.setattr(key_scan, "score_keys", _no_per_chunk_launch)
    got = scan_store(q, st, reduce=reduce, scale=0.3)
    assert got.shape == ((hkv * group if reduce == "none" else hkv), len(st)) and got.dtype == torch.float32
    assert bool(got.isfinite().all())
    assert torch.equal(got, _per_chunk_launches(q, st, reduce, 0.3))
    torch.testing.assert_close(got, per_chunk, rtol=1e-5, atol=1e-5)


def _no_per_chunk_launch(*args, **kwargs):
    raise AssertionError("the one-launch route scored a chunk alone")


def test_one_launch_copies_no_meta_per_call(monkeypatch):
    """Rows appended inside the last chunk reuse the launch's meta; a new chunk makes one."""
    monkeypatch.setattr(key_scan, "_one_launch", lambda q, store: True)
    gen = torch.Generator().manual_seed(1)
    st = _store(2 * CHUNK + 5, 3, 16, gen)
    q = torch.randn(9, 16, generator=gen)
    key_scan._capacity_meta.cache_clear()
    scan_store(q, st, reduce="max")
    st.append(torch.randn(50, 3, 16, generator=gen))
    scan_store(q, st, reduce="max")
    assert key_scan._capacity_meta.cache_info().misses == 1
    st.append(torch.randn(CHUNK, 3, 16, generator=gen))
    got = scan_store(q, st, reduce="max")
    assert key_scan._capacity_meta.cache_info().misses == 2
    assert torch.equal(got, _per_chunk_launches(q, st, "max", 1.0))


def test_route_taken_only_where_it_applies():
    """CPU tensors go per chunk (on CUDA: test_cuda_one_launch_equals_per_chunk_launches); an
    empty store scores to [H, 0]."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(9, 16, generator=gen)
    assert not key_scan._one_launch(q, _store(3 * CHUNK, 3, 16, gen))
    empty = ChunkedRows((3, 16), torch.float32, CHUNK)
    assert scan_store(q, empty).shape == (9, 0) and scan_store(q, empty, reduce="sum").shape == (3, 0)


@pytest.mark.parametrize("method,options", [("tokenselect", {"scale_scores": True}), ("recycled", {"scale": 0.3})])
def test_mirror_retrievers_scan_in_one_launch(monkeypatch, method, options):
    """tokenselect's criticality and recycled's probabilities (each through its logit scale) over
    a 4-chunk mirror are what their per-chunk scan gives, to fp32 rounding."""
    model = ModelConfig.from_name("tiny")  # 9 query heads over 3 KV heads, head_dim 16
    r = make_retriever(RetrievalConfig(method=method, options={**options, "chunk_rows": CHUNK}), model, "cpu")
    gen = torch.Generator().manual_seed(6)
    r.build(0, torch.randn(model.n_kv_heads, 3 * CHUNK + 37, model.head_dim, generator=gen), None)
    q = torch.randn(model.n_heads, model.head_dim, generator=gen)
    ask = r.criticality if method == "tokenselect" else r.probabilities
    per_chunk = ask(0, q)
    monkeypatch.setattr(key_scan, "_one_launch", lambda q, store: True)
    monkeypatch.setattr(key_scan, "score_keys", _no_per_chunk_launch)
    torch.testing.assert_close(ask(0, q), per_chunk, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("reduce", ["none", "max", "sum"])
def test_cuda_one_launch_equals_per_chunk_launches(reduce):
    """On CUDA (bf16 mirror, Llama-3-8B heads, 4096-row chunks, 3 chunks and a partial one): the
    route is taken and equals one launch per chunk bit for bit; one chunk or chunks of 100 rows
    go per chunk."""
    gen = torch.Generator().manual_seed(4)
    st = _store(3 * 4096 + 1000, 8, 128, gen, torch.bfloat16, "cuda", chunk_rows=4096)
    q = torch.randn(32, 128, generator=gen).to("cuda", torch.bfloat16)
    assert key_scan._one_launch(q, st)
    assert torch.equal(scan_store(q, st, reduce=reduce, scale=0.088), _per_chunk_launches(q, st, reduce, 0.088))
    assert not key_scan._one_launch(q, _store(4000, 8, 128, gen, torch.bfloat16, "cuda", chunk_rows=4096))
    assert not key_scan._one_launch(q, _store(400, 8, 128, gen, torch.bfloat16, "cuda", chunk_rows=100))

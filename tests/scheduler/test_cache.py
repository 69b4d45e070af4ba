"""The row cache, the zero-copy row gather and the transfer engine, on the CPU.

Triton runs through the interpreter (tests/conftest.py); the reference for every row
moved is plain indexing of the concatenated host store.
"""

import numpy as np
import pytest
import torch

from kvloft.config import ModelConfig
from kvloft.scheduler.cache import RowCache, token_row_bytes
from kvloft.scheduler.plan import split_fetch
from kvloft.scheduler.rowcopy import gather_rows, gather_rows_reference
from kvloft.scheduler.streams import TransferEngine, chunk_tables
from kvloft.tiers.kvcache import LayerTiers

CFG = ModelConfig.from_name("tiny")  # 9 query heads over 3 KV heads, D 16, 2 layers


def host_tiers(n_rows, chunk=37):
    t = LayerTiers(CFG, n_sink=0, n_window=1, host_chunk=chunk, device=torch.device("cpu"),
                   dtype=torch.float32, pin=False)
    shape = (n_rows, CFG.n_kv_heads, CFG.head_dim)
    t.host_k.append(torch.randn(shape))
    t.host_v.append(torch.randn(shape))
    return t


def test_capacity_from_bytes_and_stats():
    per_token = token_row_bytes(CFG, torch.float32) * CFG.n_layers
    assert per_token == 2 * 3 * 16 * 4 * 2
    c = RowCache.from_bytes(CFG, 10 * per_token + per_token - 1, torch.device("cpu"), torch.float32)
    assert c.capacity == 10 and c.nbytes == 10 * per_token
    assert c.k[0].shape == (10, 3, 16)
    c.plan(0, np.array([[1, 2], [2, 3]]))
    c.plan(1, np.array([4]))
    c.plan(0, np.array([[1, 2], [5, 3]]))
    s = c.stats()
    assert (s["hits"], s["misses"], s["steps"]) == (3, 5, 3)
    assert s["layer_hit_rate"] == [round(3 / 7, 4), 0.0]
    with pytest.raises(ValueError, match="capacity"):
        RowCache(CFG, -2, torch.device("cpu"), torch.float32)


def test_admit_places_rows_in_their_slots():
    c = RowCache(CFG, 4, torch.device("cpu"), torch.float32)
    tiers = host_tiers(50)
    host_k, host_v = tiers.host_k.all(), tiers.host_v.all()
    for ids in (np.array([[3, 40, 7], [7, 12, 3], [-1, 40, 44]]), np.array([[12, 49, 3], [1, 2, 3], [3, 3, 3]])):
        p = c.plan(0, ids)
        gk = host_k[torch.from_numpy(p.fetch_tokens)]
        gv = host_v[torch.from_numpy(p.fetch_tokens)]
        c.admit(0, gk, gv, torch.from_numpy(p.admit_slots))
        for s in range(c.capacity):  # every occupied slot holds its token's rows
            t = int(c.dirs[0].slot_token[s])
            if t >= 0:
                assert torch.equal(c.k[0][s], host_k[t]) and torch.equal(c.v[0][s], host_v[t])


@pytest.mark.parametrize("chunk", [37, 1000])
def test_gather_rows_kernel_matches_indexing(chunk):
    tiers = host_tiers(120, chunk)
    tokens = torch.tensor([119, 0, 36, 37, 74, 5, 111, 36], dtype=torch.int64)
    out = [torch.full((10, 3, 16), 7.0) for _ in range(2)]
    ref = [torch.full((10, 3, 16), 7.0) for _ in range(2)]
    gather_rows(tiers.host_k.chunks, tiers.host_v.chunks, tokens, *out)
    gather_rows_reference(tiers.host_k.chunks, tiers.host_v.chunks, tokens, *ref)
    for got, want, store in zip(out, ref, (tiers.host_k, tiers.host_v)):
        assert torch.equal(got[:8], store.all()[tokens])
        assert torch.equal(got, want)
        assert (got[8:] == 7.0).all()  # nothing written past the rows asked for


def test_gather_rows_bad_inputs():
    tiers = host_tiers(10)
    small = torch.empty(2, 3, 16)
    with pytest.raises(ValueError, match="do not fit"):
        gather_rows(tiers.host_k.chunks, tiers.host_v.chunks, torch.arange(3), small, small)
    with pytest.raises(ValueError, match="contiguous"):
        gather_rows(tiers.host_k.chunks, tiers.host_v.chunks, torch.arange(1), torch.empty(4, 16, 3).transpose(1, 2),
                    small)
    with pytest.raises(ValueError, match="one V chunk per K chunk"):
        gather_rows(tiers.host_k.chunks, [], torch.arange(1), small, small)


@pytest.mark.parametrize("mode", ["host", "zero_copy", "staged"])
def test_engine_moves_pieces(mode):
    tiers = host_tiers(200, chunk=64)
    eng = TransferEngine(mode, (3, 16), torch.float32, torch.device("cpu"), max_rows=5, regions=2,
                         stage_rows=2, stage_buffers=2)
    cache = RowCache(CFG, 3, torch.device("cpu"), torch.float32)
    plan = cache.plan(0, np.array([[150, 3, 64, 199], [3, 70, 150, 8], [-1, 63, 65, 0]]))
    pieces = split_fetch(plan, eng.max_rows)
    assert len(pieces) == 2
    for piece in pieces:
        tables = chunk_tables(tiers)
        packed = np.concatenate([piece.fetch_tokens, tables])
        r = eng.open(packed.shape[0], piece.fetch_tokens.shape[0])
        idx = eng.send_indices(r, packed)
        m = piece.fetch_tokens.shape[0]
        eng.send_rows(r, tiers, piece.fetch_tokens, idx[:m], idx[m:].view(2, -1))
        eng.wait_rows(r)
        want = torch.from_numpy(piece.fetch_tokens)
        assert torch.equal(r.k[:m], tiers.host_k.all()[want]) and torch.equal(r.v[:m], tiers.host_v.all()[want])
        eng.release(r)
    assert eng.rows_moved == plan.n_fetch == 9


def test_engine_rejects_unknown_mode():
    with pytest.raises(ValueError, match="zero_copy"):
        TransferEngine("dma", (3, 16), torch.float32, torch.device("cpu"), max_rows=4)


@pytest.mark.gpu
def test_gpu_zero_copy_and_staged_rows_from_pinned_host():
    tiers = LayerTiers(ModelConfig.from_name("llama3-8b"), 0, 1, 4096, torch.device("cuda"), torch.bfloat16, pin=True)
    data_k = torch.randn(10000, 8, 128, dtype=torch.bfloat16)
    data_v = torch.randn(10000, 8, 128, dtype=torch.bfloat16)
    tiers.host_k.append(data_k)
    tiers.host_v.append(data_v)
    tokens = np.random.default_rng(0).permutation(10000)[:3000].astype(np.int64)
    for mode in ("zero_copy", "staged"):
        eng = TransferEngine(mode, (8, 128), torch.bfloat16, torch.device("cuda"), max_rows=3000, stage_rows=512)
        packed = np.concatenate([tokens, chunk_tables(tiers)])
        r = eng.open(packed.shape[0], 3000)
        idx = eng.send_indices(r, packed)
        eng.send_rows(r, tiers, tokens, idx[:3000], idx[3000:].view(2, -1))
        eng.wait_rows(r)
        got_k, got_v = r.k[:3000].cpu(), r.v[:3000].cpu()
        eng.release(r)
        assert torch.equal(got_k, data_k[tokens]) and torch.equal(got_v, data_v[tokens]), mode

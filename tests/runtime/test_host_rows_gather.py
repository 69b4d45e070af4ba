"""runtime/host_rows.gather_rows against plain indexing of the concatenated host store."""

import pytest
import torch

from kvloft.config import ModelConfig
from kvloft.runtime.host_rows import gather_rows
from kvloft.tiers.kvcache import LayerTiers

CFG = ModelConfig.from_name("tiny")  # 3 KV heads, D 16


def _tiers(n_rows: int, chunk: int) -> LayerTiers:
    t = LayerTiers(CFG, n_sink=0, n_window=1, host_chunk=chunk, device=torch.device("cpu"),
                   dtype=torch.float32, pin=False)
    g = torch.Generator().manual_seed(n_rows)
    t.host_k.append(torch.randn((n_rows, CFG.n_kv_heads, CFG.head_dim), generator=g))
    t.host_v.append(torch.randn((n_rows, CFG.n_kv_heads, CFG.head_dim), generator=g))
    return t


@pytest.mark.parametrize("chunk", [7, 1000])
def test_per_head_rows_with_padding(chunk):
    tiers = _tiers(50, chunk)
    ids = torch.tensor([[3, 49, -1, 7, 8], [-1, -1, 0, 12, 12], [20, 21, 22, 23, 24]])
    gk, gv, valid = gather_rows(tiers, ids, torch.device("cpu"))
    hk, hv = tiers.host_k.all(), tiers.host_v.all()
    assert gk.shape == gv.shape == (5, 3, 16) and torch.equal(valid, ids >= 0)
    for h in range(3):
        for j in range(5):
            if ids[h, j] >= 0:
                assert torch.equal(gk[j, h], hk[ids[h, j], h]) and torch.equal(gv[j, h], hv[ids[h, j], h])


def test_shared_rows_and_bad_row():
    tiers = _tiers(30, 8)
    ids = torch.tensor([29, 0, 15])
    gk, gv, valid = gather_rows(tiers, ids, torch.device("cpu"))
    assert torch.equal(gk, tiers.host_k.all()[ids]) and torch.equal(gv, tiers.host_v.all()[ids]) and bool(valid.all())
    with pytest.raises(IndexError):
        gather_rows(tiers, torch.tensor([30]), torch.device("cpu"))


@pytest.mark.gpu
def test_pinned_async_gather_to_cuda_equals_the_cpu_gather():
    # CUDA: the union gathered into pinned memory, copied without blocking; read back in order
    tiers = _tiers(5000, 1024)
    ids = torch.randint(-1, 5000, (3, 700), generator=torch.Generator().manual_seed(0))
    want = gather_rows(tiers, ids, torch.device("cpu"))
    for _ in range(3):  # pinned blocks reused by the caching host allocator
        got = gather_rows(tiers, ids, torch.device("cuda"))
        assert all(torch.equal(g.cpu(), w) for g, w in zip(got[:2], want[:2])) and torch.equal(got[2], want[2])


@pytest.mark.parametrize("chunk", [7, 1000])
def test_zero_copy_gather_equals_the_cpu_gather(monkeypatch, chunk):
    # the Triton row copy reading the chunks in place (interpreted on the CPU) gives the same rows
    from kvloft.scheduler import rowcopy

    calls = []
    real = rowcopy.gather_rows
    monkeypatch.setattr(rowcopy, "gather_rows", lambda *a, **kw: calls.append(a[2].shape[0]) or real(*a, **kw))
    tiers = _tiers(50, chunk)
    ids = torch.tensor([[3, 49, -1, 7, 8], [-1, -1, 0, 12, 12], [20, 21, 22, 23, 24]])
    want = gather_rows(tiers, ids, torch.device("cpu"))
    got = gather_rows(tiers, ids, torch.device("cpu"), zero_copy=True)
    assert calls == [11]  # one launch for the union of 11 tokens, K and V together
    assert all(torch.equal(g, w) for g, w in zip(got, want))

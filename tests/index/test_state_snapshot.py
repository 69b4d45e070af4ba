"""A retriever's state_dict(host=False), what a session keeps before each call to roll a failed
one back: the same values as the saved state_dict(), in fresh tensors on the retriever's device
(nothing aliases the live state, which later steps may write in place), and restoring it
continues the selections exactly as restoring the saved one does."""

from __future__ import annotations

import pytest
import torch

from kvloft.config import ModelConfig, RetrievalConfig
from kvloft.index.base import make_retriever

MODEL = ModelConfig.from_name("tiny")
HQ, HKV, D = MODEL.n_heads, MODEL.n_kv_heads, MODEL.head_dim
N, BUDGET = 300, 24
OPTIONS = {
    "hip": {"chunk_sizes": (32, 8, 4), "kept_tokens": (128, 64, 32), "refresh_steps": (4, 2, 1), "chunk_rows": 128},
    "tokenselect": {},
    "recycled": {},
    "actqkv": {},
}


def _retriever(method: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    r = make_retriever(RetrievalConfig(method=method, options=OPTIONS[method]), MODEL, "cpu")
    for layer in range(2):
        r.build(layer, torch.randn(HKV, N, D, generator=gen), torch.randn(HQ, 16, D, generator=gen))
    return r


def _steps(r, gen: torch.Generator, n: int, start: int, add: bool = True) -> list[torch.Tensor]:
    out = []
    for i in range(n):
        for layer in range(2):
            out.append(r.select(layer, torch.randn(HQ, D, generator=gen), BUDGET).ids.clone())
            keys = torch.randn(HKV, 1, D, generator=gen)
            if add:
                r.add(layer, keys, torch.tensor([N + start + i]))
    return out


def _tensors(state: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_device_snapshot_equals_saved_state_and_restores_alike(method):
    a, b = _retriever(method, 0), _retriever(method, 0)
    gen = torch.Generator().manual_seed(1)
    _steps(a, gen, 5, 0)
    _steps(b, torch.Generator().manual_seed(1), 5, 0)
    snap, saved = a.state_dict(host=False), b.state_dict(host=True)
    assert snap.keys() == saved.keys()
    assert _tensors(snap), "the state under test holds tensors"
    for k, v in snap.items():  # a count still on the device stays a tensor there (RetrieverStats.counts)
        assert torch.equal(v, torch.as_tensor(saved[k])) if isinstance(v, torch.Tensor) else v == saved[k], k
    again = a.state_dict(host=False)  # fresh storage each time: nothing shared with the live state
    for k, v in _tensors(snap).items():
        assert v.untyped_storage().data_ptr() != again[k].untyped_storage().data_ptr(), k
    _steps(a, torch.Generator().manual_seed(2), 3, 5, add=False)  # the state moves on (not the keys): roll back
    a.load_state_dict(snap)
    b.load_state_dict(saved)
    want = _steps(b, torch.Generator().manual_seed(3), 4, 5)
    got = _steps(a, torch.Generator().manual_seed(3), 4, 5)
    assert all(torch.equal(x, y) for x, y in zip(got, want, strict=True))

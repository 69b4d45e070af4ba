"""A prefill chunk's keys and values written straight into the dense store's rows
(AttentionBackend.kv_rows, DenseKV.rows) and RoPE reading 16-bit q, k as they are (model.rotate
on a device in PROMOTE_IN_KERNEL, CUDA's route): the logits and the cached K/V of the path that
hands the backend fresh k, v to copy in (the model's path for a backend without kv_rows), bit
for bit, in fp32 and bf16, through the modules' q/k/v and through one fused GEMM's views."""

from __future__ import annotations

import pytest
import torch

from kvloft import load_model
from kvloft.config import PRESETS
from kvloft.kernels import REFERENCE
from kvloft.runtime import model as model_mod
from kvloft.runtime.dense import DenseAttention
from kvloft.tiers.dense import DenseKV

CHUNKS = (40, 40, 12, 5)  # chunks of more than 16 rows take the store's rows; 12 and 5 the few-row routes


class CopyingDense:
    """DenseAttention without kv_rows: the model hands it k, v of its own, which append copies in."""

    def __init__(self, inner: DenseAttention) -> None:
        self.inner = inner

    def attend(self, layer, q, k, v, positions):
        return self.inner.attend(layer, q, k, v, positions)


def _prefill(net, backend, ids: torch.Tensor) -> torch.Tensor:
    start, logits = 0, None
    for n in CHUNKS:
        logits = net(ids[start : start + n], torch.arange(start, start + n), backend)
        start += n
    return logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [False, True], ids=["modules", "fused-gemm"])
@pytest.mark.parametrize("promote", [False, True], ids=["cast-first", "promote-in-kernel"])
def test_prefill_into_the_store_equals_the_copying_path(dtype, fused, promote, monkeypatch):
    model = load_model("tiny", device="cpu", dtype=dtype, seed=5)
    if fused:  # q/k/v as row-strided views of one GEMM's output: v is copied from a strided view
        model.net.declare_kernels(compiled_cpu=False, fused_gpu=True)
        assert all(b.gpu is not None for b in model.net.layers)
    ids = torch.randint(1, model.config.vocab_size, (sum(CHUNKS),), generator=torch.Generator().manual_seed(4))
    want_kv = DenseAttention(model.config, REFERENCE, model.device, dtype)
    want = _prefill(model.net, CopyingDense(want_kv), ids)
    if promote:
        monkeypatch.setattr(model_mod, "PROMOTE_IN_KERNEL", ("cuda", "cpu"))
    got_kv = DenseAttention(model.config, REFERENCE, model.device, dtype)
    got = _prefill(model.net, got_kv, ids)
    assert torch.equal(got, want)
    assert got_kv.n_tokens == want_kv.n_tokens == sum(CHUNKS)
    for a, b in zip(got_kv.layers, want_kv.layers):
        assert torch.equal(a.kv()[0], b.kv()[0]) and torch.equal(a.kv()[1], b.kv()[1])


def test_rows_grow_the_store_and_append_keeps_them_in_place():
    cfg = PRESETS["tiny"]
    store, ref = DenseKV(cfg, torch.device("cpu"), torch.float32), DenseKV(cfg, torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(0)
    first = [torch.randn(1000, cfg.n_kv_heads, cfg.head_dim, generator=g) for _ in range(2)]
    store.append(*first)  # not the store's rows: copied in
    ref.append(*first)
    k, v = store.rows(100)  # past the capacity of 1024: grown, the first 1000 rows kept
    assert store.k.shape[0] == 2048 and store.n == 1000
    k.copy_(torch.randn(k.shape, generator=g))
    v.copy_(torch.randn(v.shape, generator=g))
    before = store.k.data_ptr()
    store.append(k, v)  # the rows themselves: no copy, n moves on
    ref.append(k.clone(), v.clone())
    assert store.n == 1100 and store.k.data_ptr() == before
    assert torch.equal(store.kv()[0], ref.kv()[0]) and torch.equal(store.kv()[1], ref.kv()[1])
    k2, v2 = store.rows(8)
    k2.copy_(torch.randn(k2.shape, generator=g))  # the rows past n are unwritten (any bits, NaN too)
    v2.copy_(torch.randn(v2.shape, generator=g))
    store.append(k2[:4].clone(), v2[:4].clone())  # a copy of (part of) the rows: copied, not taken as them
    assert store.n == 1104 and torch.equal(store.kv()[0][-4:], k2[:4])
    k2[4:].copy_(torch.randn(k2[4:].shape, generator=g))
    k_rows, v_new = k2[4:].clone(), torch.randn(4, cfg.n_kv_heads, cfg.head_dim, generator=g)
    store.append(k2[4:], v_new)  # k the store's next rows (n = 1104), v not: v copied in, k kept
    assert store.n == 1108 and torch.equal(store.kv()[0][-4:], k_rows) and torch.equal(store.kv()[1][-4:], v_new)

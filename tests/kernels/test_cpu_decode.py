"""kernels/cpu_decode.py: one softmax over the static tier and the selected host rows, against
the computation it replaces (decode_attend over the static tier, gather_attend over the
selection, merged by log-sum-exp), on awkward shapes, and against an fp64 oracle."""

from __future__ import annotations

import pytest
import torch

from kvloft.kernels import cpu_score, reference
from kvloft.kernels.cpu_decode import head_rows, select_attend


def _case(hq, hkv, d, n_static, n_host, chunk_rows, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(hq, d, generator=gen)
    sk, sv = torch.randn(n_static, hkv, d, generator=gen), torch.randn(n_static, hkv, d, generator=gen)
    hk, hv = torch.randn(n_host, hkv, d, generator=gen), torch.randn(n_host, hkv, d, generator=gen)
    return [t.to(dtype) for t in (q, sk, sv, hk, hv)], gen


def _chunks(rows, chunk_rows):
    """A chunked store as ChunkedRows keeps it: full chunks, the last one partly filled."""
    n = rows.shape[0]
    out = []
    for a in range(0, max(n, 1), chunk_rows):
        c = torch.full((chunk_rows, *rows.shape[1:]), float("nan"), dtype=rows.dtype)  # unfilled: never read
        c[: min(chunk_rows, n - a)] = rows[a : a + chunk_rows]
        out.append(c)
    return out


def _old(q, sk, sv, hk, hv, ids, scale):
    """The route replaced: static and selected partials apart, merged."""
    o_s, l_s = reference.decode_attend(q, sk, sv, scale=scale)
    o_r, l_r = reference.gather_attend(q, hk, hv, ids, scale=scale)
    return reference.merge([o_s, o_r], [l_s, l_r])


def _oracle(q, sk, sv, hk, hv, ids, scale):
    """fp64: per query head, softmax over the static keys and its KV head's valid selected rows."""
    hq, hkv = q.shape[0], sk.shape[1]
    g = hq // hkv
    ids = ids[None].expand(hkv, -1) if ids.dim() == 1 else ids
    out = torch.empty(hq, q.shape[1], dtype=torch.float64)
    for h in range(hq):
        kv = h // g
        rows = ids[kv][ids[kv] >= 0]
        k = torch.cat([sk[:, kv], hk[rows, kv]]).double()
        v = torch.cat([sv[:, kv], hv[rows, kv]]).double()
        out[h] = torch.softmax(k @ q[h].double() * scale, 0) @ v
    return out


def _per_head_topk(gen, hkv, n_host, k, pad_every=0):
    ids = torch.stack([torch.randperm(n_host, generator=gen)[:k] for _ in range(hkv)])
    if pad_every:
        ids[:, ::pad_every] = -1
    return ids


@pytest.mark.parametrize("hq,hkv,d,n_static,n_host,chunk_rows,k,pad_every", [
    (9, 3, 64, 97, 1025, 4096, 300, 0),  # SmolLM2's heads, one chunk
    (9, 3, 59, 33, 1025, 256, 300, 7),   # odd head dim, five chunks, pads
    (7, 7, 16, 17, 97, 32, 40, 3),       # MHA, pads in every third slot
    (12, 2, 32, 5, 250, 100, 250, 0),    # group of 6, the budget covers every host row
    (8, 4, 16, 1, 33, 8, 33, 2),         # one static key (the token itself), half the slots pads
])
@pytest.mark.parametrize("with_logits", [False, True])
@pytest.mark.parametrize("compiled", [True, False])  # static keys scanned by numba / torch bmm
def test_equals_static_gather_merge(monkeypatch, hq, hkv, d, n_static, n_host, chunk_rows, k, pad_every,
                                    with_logits, compiled):
    monkeypatch.setattr(cpu_score, "enabled", compiled)
    (q, sk, sv, hk, hv), gen = _case(hq, hkv, d, n_static, n_host, chunk_rows)
    ids = _per_head_topk(gen, hkv, n_host, k, pad_every)
    scale = d**-0.5
    logits = reference.score(q, hk) if with_logits else None  # as ExactRetriever hands them over
    got, lse = select_attend(q, sk, sv, _chunks(hk, chunk_rows), _chunks(hv, chunk_rows), chunk_rows, ids,
                             scale=scale, logits=logits, padded=pad_every > 0)
    want, want_lse = _old(q, sk, sv, hk, hv, ids, scale)
    oracle = _oracle(q, sk, sv, hk, hv, ids, scale)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)
    # no worse than the route it replaces, both held against fp64 (within fp32 rounding)
    err_new, err_old = (got.double() - oracle).abs().max(), (want.double() - oracle).abs().max()
    assert err_new <= 2 * err_old + 1e-6, (err_new, err_old)


def test_shared_ids_empty_selection_and_bf16():
    (q, sk, sv, hk, hv), gen = _case(9, 3, 16, 20, 300, 128, dtype=torch.bfloat16)
    ids = torch.randperm(300, generator=gen)[:50]  # [k] shared by every KV head
    chunks = (_chunks(hk, 128), _chunks(hv, 128))
    got, _ = select_attend(q, sk, sv, *chunks, 128, ids, scale=0.25, padded=False)
    assert got.dtype == torch.bfloat16
    want = _oracle(q.float(), sk.float(), sv.float(), hk.float(), hv.float(), ids, 0.25)
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)
    # nothing selected: the static tier alone, as decode_attend gives it
    empty = torch.empty(3, 0, dtype=torch.int64)
    got, lse = select_attend(q.float(), sk.float(), sv.float(), [], [], 128, empty, scale=0.25)
    want, want_lse = reference.decode_attend(q.float(), sk.float(), sv.float(), scale=0.25)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_rows", [7, 64, 1000])
def test_head_rows_picks_each_heads_rows(chunk_rows):
    gen = torch.Generator().manual_seed(2)
    rows = torch.randn(300, 3, 5, generator=gen)
    ids = torch.randint(0, 300, (3, 41), generator=gen)
    got = head_rows(_chunks(rows, chunk_rows), chunk_rows, ids)
    want = torch.stack([rows[ids[h], h] for h in range(3)])
    assert torch.equal(got, want)


@pytest.mark.parametrize("hkv,d,n,chunk_rows,k", [(3, 64, 1001, 256, 300), (4, 8, 97, 1000, 97), (1, 5, 13, 4, 1)])
def test_compiled_head_rows_equals_torch_route(monkeypatch, hkv, d, n, chunk_rows, k):
    """fp32 rows gathered by the compiled pass equal the torch route's index_select bit for bit,
    chunks partly filled and ids repeated; other dtypes keep the torch route."""
    from kvloft.kernels import cpu_decode

    gen = torch.Generator().manual_seed(5)
    rows = torch.randn(n, hkv, d, generator=gen)
    ids = torch.randint(0, n, (hkv, k), generator=gen)
    got = head_rows(_chunks(rows, chunk_rows), chunk_rows, ids)
    monkeypatch.setattr(cpu_decode, "compiled_gather", False)
    want = head_rows(_chunks(rows, chunk_rows), chunk_rows, ids)
    assert torch.equal(got, want)
    assert torch.equal(got, torch.stack([rows[ids[h], h] for h in range(hkv)]))
    monkeypatch.setattr(cpu_decode, "compiled_gather", True)
    half = head_rows(_chunks(rows.bfloat16(), chunk_rows), chunk_rows, ids)
    assert half.dtype == torch.bfloat16 and torch.equal(half, want.bfloat16())

"""Triton q·K scoring + top-k vs the torch reference and an fp64 oracle (CPU: interpreter, fp32)."""

from __future__ import annotations

import pytest
import torch

from kvloft.kernels import reference
from kvloft.kernels.scoring import score, score_topk

ULPS = 4


def oracle(q, k_rows, reduce, scale, ids):
    """fp64 scores [H_q, M] or [H_kv, M] over k_rows (or k_rows[ids])."""
    hq, hkv = q.shape[0], k_rows.shape[1]
    keys = (k_rows if ids is None else k_rows[ids.long()]).double()  # [M, H_kv, D]
    s = torch.einsum("hd,mhd->hm", q.double(), keys.repeat_interleave(hq // hkv, 1)) * scale
    return s if reduce == "none" else reference.reduce_group(s, hkv, reduce)


def assert_rule(got, base, exact, what, floor=None):
    if floor is None:
        floor = ULPS * torch.finfo(torch.float32).eps * max(1.0, exact.abs().max().item())
    err = (got.double() - exact).abs().max().item()
    base_err = (base.double() - exact).abs().max().item()
    assert err <= 2 * base_err + floor, (
        f"{what}: kernel error {err:.3g} > 2 x torch {base_err:.3g} + {floor:.3g}"
    )


def ref_scores(q, k_rows, reduce, scale, ids):
    s = reference.score(q, k_rows, scale=scale, ids=ids)
    return s if reduce == "none" else reference.reduce_group(s, k_rows.shape[1], reduce)


CASES = [(9, 3, 32, 97), (7, 1, 16, 1), (7, 7, 24, 97)]
ALL = [(r, *c, w) for r in ("none", "max", "sum") for c in CASES for w in (False, True)]


@pytest.mark.parametrize("reduce,hq,hkv,d,n_rows,with_ids", ALL + [("max", 9, 3, 32, 1025, True)])
def test_scores_and_topk_match_reference(reduce, hq, hkv, d, n_rows, with_ids):
    q, k = torch.randn(hq, d), torch.randn(n_rows, hkv, d)
    ids = torch.randperm(n_rows)[: max(1, n_rows * 2 // 3)] if with_ids else None
    scale = d**-0.5
    s = score(q, k, reduce=reduce, scale=scale, ids=ids)
    assert_rule(s, ref_scores(q, k, reduce, scale, ids), oracle(q, k, reduce, scale, ids), "scores")
    vals, top = score_topk(q, k, 10, reduce=reduce, scale=scale, ids=ids)
    ref_vals, ref_top = reference.score_topk(q, k, 10, reduce=reduce, scale=scale, ids=ids)
    assert top.dtype == torch.int64 and vals.dtype == torch.float32
    assert torch.equal(top, ref_top)  # random scores: no near-ties at fp32 resolution
    torch.testing.assert_close(vals, ref_vals, rtol=1e-5, atol=1e-5)


def test_int32_ids_and_topk_larger_than_keys():
    q, k = torch.randn(9, 16), torch.randn(50, 3, 16)
    ids = torch.randperm(50)[:20].int()
    vals, top = score_topk(q, k, 64, ids=ids)
    ref_vals, ref_top = reference.score_topk(q, k, 64, ids=ids.long())
    assert vals.shape == (3, 20) and torch.equal(top, ref_top)
    torch.testing.assert_close(vals, ref_vals, rtol=1e-5, atol=1e-5)


def test_no_keys():
    q = torch.randn(9, 16)
    vals, top = score_topk(q, torch.randn(0, 3, 16), 8)
    assert vals.shape == (3, 0) and top.shape == (3, 0)
    vals, top = score_topk(q, torch.randn(5, 3, 16), 8, ids=torch.empty(0, dtype=torch.long), reduce="none")
    assert vals.shape == (9, 0) and top.shape == (9, 0)


def test_bad_inputs():
    q, k = torch.randn(9, 16), torch.randn(30, 3, 16)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        score_topk(torch.randn(8, 16), k, 4)
    with pytest.raises(ValueError, match="head dim"):
        score_topk(q[:, :8], k, 4)
    with pytest.raises(ValueError, match="reduce must be"):
        score_topk(q, k, 4, reduce="mean")
    with pytest.raises(ValueError, match="topk"):
        score_topk(q, k, -1)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 29\]"):
        score_topk(q, k, 4, ids=torch.tensor([0, 30]))
    with pytest.raises(ValueError, match="ids must lie"):
        score_topk(q, k, 4, ids=torch.tensor([-1, 3]))
    with pytest.raises(ValueError, match=r"\[M\]"):
        score_topk(q, k, 4, ids=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="int32 or int64"):
        score_topk(q, k, 4, ids=torch.zeros(3))
    with pytest.raises(TypeError, match="cast"):
        score_topk(q.half(), k, 4)
    with pytest.raises(ValueError, match="move"):
        score_topk(q, k.to("meta"), 4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 80, 96, 128])
@pytest.mark.parametrize("hq,hkv", [(32, 8), (28, 4)])
@pytest.mark.parametrize("reduce", ["none", "max"])
def test_gpu_scores(dtype, d, hq, hkv, reduce):
    q = torch.randn(hq, d, dtype=dtype, device="cuda")
    k = torch.randn(20000, hkv, d, dtype=dtype, device="cuda")
    ids = torch.randperm(20000, device="cuda")[:5000]
    for cand in (None, ids):
        s = score(q, k, reduce=reduce, scale=d**-0.5, ids=cand)
        exact = oracle(q, k, reduce, d**-0.5, cand)
        keys = k if cand is None else k[cand]  # same-precision baseline: matmul in dtype
        base = torch.einsum("hd,mhd->hm", q, keys.repeat_interleave(hq // hkv, 1)) * d**-0.5
        base = base if reduce == "none" else reference.reduce_group(base.float(), hkv, reduce)
        assert_rule(s, base, exact, "scores", floor=1e-3)
        vals, top = score_topk(q, k, 256, reduce=reduce, scale=d**-0.5, ids=cand)
        # the ids must carry the scores reported for them
        cols = top if cand is None else _pos(cand, top)
        assert torch.equal(vals, s.gather(1, cols))
        assert torch.equal(vals, s.topk(256, dim=-1).values)


def _pos(cand, top):
    """Positions in cand of the row ids in top."""
    inv = torch.full((int(cand.max()) + 1,), -1, dtype=torch.long, device=cand.device)
    inv[cand] = torch.arange(cand.numel(), device=cand.device)
    return inv[top]


@pytest.mark.gpu
@pytest.mark.parametrize("reduce", ["none", "max", "sum"])
def test_gpu_score_keys_matches_reference_in_bf16(reduce):
    """kernels.score_keys on CUDA (Triton, bf16 keys read in place) == the fp32 reference."""
    from kvloft.kernels import reference, score_keys

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(32, 128, generator=gen).to("cuda", torch.bfloat16)
    k = torch.randn(5000, 8, 128, generator=gen).to("cuda", torch.bfloat16)
    got = score_keys(q, k, scale=0.088, reduce=reduce)
    want = reference.score(q, k, scale=0.088)
    if reduce != "none":
        want = reference.reduce_group(want, 8, reduce)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


@pytest.mark.gpu
def test_gpu_exact_retriever_topk_equals_reference_topk():
    """The exact retriever's CUDA scan picks the reference's top-k (bf16 keys)."""
    import kvloft
    from kvloft.config import RetrievalConfig
    from kvloft.kernels import reference

    cfg = kvloft.ModelConfig.from_name("tiny")
    r = kvloft.index.make_retriever(RetrievalConfig(method="exact"), cfg, "cuda")
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(cfg.n_kv_heads, 3000, cfg.head_dim, generator=gen).to("cuda", torch.bfloat16)
    r.build(0, keys, None)
    q = torch.randn(cfg.n_heads, cfg.head_dim, generator=gen).to("cuda", torch.bfloat16)
    ids = r.select(0, q, 64).ids
    ref = reference.reduce_group(reference.score(q, keys.transpose(0, 1)), cfg.n_kv_heads, "max")
    want = ref.topk(64, dim=-1).indices
    overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids, want)) / want.numel()
    assert overlap >= 0.98, overlap  # ties in bf16 logits may swap the last places

"""Triton sparse decode attention vs the torch reference (CPU: interpreter, fp32; GPU: bf16/fp16).

Tolerance rule (flash-attention): the kernel's error against an fp64 oracle is at most
twice the error of the plain torch implementation at the same precision, plus a tiny
absolute floor for values whose reference error happens to be ~0.
"""

from __future__ import annotations

import math

import pytest
import torch

from kvloft.kernels import checks, reference
from kvloft.kernels.sparse_decode import DecodeLaunch, decode_attend, gather_attend

ULPS = 4  # the floor: a few fp32 ulps of the largest exact value


def oracle(q, k_rows, v_rows, ids, scale):
    """fp64 attention over k_rows[ids] (ids [H_kv, n] or [n], -1 ignored; None = all rows)."""
    hq, hkv = q.shape[0], k_rows.shape[1]
    n_rows = k_rows.shape[0]
    if ids is None:
        ids = torch.arange(n_rows, device=q.device)
    ids = ids.long()
    if ids.dim() == 1:
        ids = ids[None].expand(hkv, -1)
    group = hq // hkv
    outs, lses = [], []
    for h in range(hq):
        kv = h // group
        sel = ids[kv][ids[kv] >= 0]
        if sel.numel() == 0:
            outs.append(torch.zeros(q.shape[1], dtype=torch.float64, device=q.device))
            lses.append(torch.tensor(-math.inf, dtype=torch.float64, device=q.device))
            continue
        logits = (k_rows[sel, kv].double() @ q[h].double()) * scale
        lse = torch.logsumexp(logits, 0)
        outs.append(torch.exp(logits - lse) @ v_rows[sel, kv].double())
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


def plain_lowp(q, k_rows, v_rows, ids, scale):
    """Attention computed in q's dtype with torch ops (the 'same precision' baseline on GPU)."""
    hq, hkv = q.shape[0], k_rows.shape[1]
    ids = ids.long() if ids.dim() == 2 else ids.long()[None].expand(hkv, -1)
    k = reference.gather_kv(k_rows, ids).transpose(0, 1).repeat_interleave(hq // hkv, 0)  # [H_q, n, D]
    v = reference.gather_kv(v_rows, ids).transpose(0, 1).repeat_interleave(hq // hkv, 0)
    logits = torch.einsum("hd,hnd->hn", q, k) * scale  # in q.dtype
    logits = logits.masked_fill((ids < 0).repeat_interleave(hq // hkv, 0), -math.inf)
    lse = torch.logsumexp(logits, -1)
    p = torch.softmax(logits, -1)
    return torch.einsum("hn,hnd->hd", p, v), lse


def assert_rule(got, base, exact, what, floor=None):
    """max|got - exact| <= 2 * max|base - exact| + floor (with equal infinities).

    floor defaults to ULPS fp32 ulps of max|exact|: it only matters where the torch
    baseline happens to be exact (a single key, say)."""
    exact = exact.double()
    fin = torch.isfinite(exact)
    if floor is None:
        top = exact[fin].abs().max().item() if fin.any() else 1.0
        floor = ULPS * torch.finfo(torch.float32).eps * max(1.0, top)
    assert torch.equal(torch.isfinite(got), fin), f"{what}: finiteness differs"
    assert torch.equal(got[~fin].double(), exact[~fin]), f"{what}: infinities differ"
    err = (got.double()[fin] - exact[fin]).abs().max().item() if fin.any() else 0.0
    base_err = (base.double()[fin] - exact[fin]).abs().max().item() if fin.any() else 0.0
    assert err <= 2 * base_err + floor, (
        f"{what}: kernel error {err:.3g} > 2 x torch error {base_err:.3g} + {floor}"
    )


def make(hq, hkv, d, n_rows, dtype=torch.float32, device="cpu"):
    q = torch.randn(hq, d, dtype=dtype, device=device)
    k = torch.randn(n_rows, hkv, d, dtype=dtype, device=device)
    v = torch.randn(n_rows, hkv, d, dtype=dtype, device=device)
    return q, k, v


def random_ids(hkv, n_rows, n, n_pad=0, shared=False, device="cpu"):
    """Duplicate-free ids in random order, the last n_pad of each list set to -1."""
    lists = [torch.randperm(n_rows, device=device)[:n] for _ in range(1 if shared else hkv)]
    ids = lists[0] if shared else torch.stack(lists)
    if n_pad:
        ids[..., n - n_pad :] = -1
    return ids


@pytest.mark.parametrize(
    "hq,hkv,d,t",
    [(9, 3, 32, 97), (7, 1, 16, 1), (7, 7, 20, 97), (9, 3, 32, 1025)],
)
def test_decode_matches_reference(hq, hkv, d, t):
    q, k, v = make(hq, hkv, d, t)
    scale = d**-0.5
    out, lse = decode_attend(q, k, v, scale=scale)
    ref_out, ref_lse = reference.decode_attend(q, k, v, scale=scale)
    ex_out, ex_lse = oracle(q, k, v, None, scale)
    assert out.dtype == q.dtype and out.shape == (hq, d)
    assert lse.dtype == torch.float32 and lse.shape == (hq,)
    assert_rule(out, ref_out, ex_out, "out")
    assert_rule(lse, ref_lse, ex_lse, "lse")


@pytest.mark.parametrize(
    "hq,hkv,d,n_rows,n,n_pad,shared",
    [
        (9, 3, 32, 200, 97, 5, False),
        (7, 1, 16, 50, 1, 0, False),
        (7, 7, 24, 300, 97, 30, False),
        (9, 3, 32, 150, 97, 0, True),
        (7, 1, 16, 1500, 1025, 0, False),
    ],
)
def test_gather_matches_reference(hq, hkv, d, n_rows, n, n_pad, shared):
    q, k, v = make(hq, hkv, d, n_rows)
    ids = random_ids(hkv, n_rows, n, n_pad, shared)
    scale = 0.7 * d**-0.5
    out, lse = gather_attend(q, k, v, ids, scale=scale)
    ref_out, ref_lse = reference.gather_attend(q, k, v, ids, scale=scale)
    ex_out, ex_lse = oracle(q, k, v, ids, scale)
    assert_rule(out, ref_out, ex_out, "out")
    assert_rule(lse, ref_lse, ex_lse, "lse")


@pytest.mark.parametrize("shared", [False, True])
def test_gather_empty_and_all_padding(shared):
    q, k, v = make(9, 3, 16, 20)
    for ids in (random_ids(3, 20, 0, shared=shared), torch.full((3, 4), -1)[0 if shared else slice(None)]):
        out, lse = gather_attend(q, k, v, ids, scale=0.25)
        assert torch.equal(out, torch.zeros_like(q))
        assert torch.equal(lse, torch.full((9,), -math.inf))


def test_gather_all_tokens_equals_dense():
    q, k, v = make(9, 3, 32, 97)
    ids = random_ids(3, 97, 97)  # a different permutation of every token per KV head
    out, lse = gather_attend(q, k, v, ids.int(), scale=0.2)
    dense_out, dense_lse = reference.decode_attend(q, k, v, scale=0.2)
    torch.testing.assert_close(out, dense_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, dense_lse, rtol=1e-5, atol=1e-5)


def test_split_count_does_not_change_result():
    q, k, v = make(7, 1, 16, 300)
    launch = DecodeLaunch(block_n=32)
    one = decode_attend(q, k, v, scale=0.3, num_splits=1, launch=launch)
    many = decode_attend(q, k, v, scale=0.3, num_splits=7, launch=launch)
    torch.testing.assert_close(one, many, rtol=1e-5, atol=1e-6)


def test_strided_rows():
    big = torch.randn(120, 6, 16)  # a ring buffer with 6 head slots, keys in 0..2, values 3..5
    q = torch.randn(9, 16)
    k, v = big[10:107, :3], big[10:107, 3:]
    out, lse = decode_attend(q, k, v, scale=0.25)
    ref_out, ref_lse = reference.decode_attend(q, k.contiguous(), v.contiguous(), scale=0.25)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_bad_inputs():
    q, k, v = make(8, 3, 16, 10)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        decode_attend(q, k, v, scale=1.0)
    q, k, v = make(9, 3, 16, 10)
    with pytest.raises(ValueError, match="head dim"):
        decode_attend(q[:, :8], k, v, scale=1.0)
    with pytest.raises(TypeError, match="cast"):
        decode_attend(q, k.half(), v, scale=1.0)
    with pytest.raises(ValueError, match="move"):
        decode_attend(q, k.to("meta"), v.to("meta"), scale=1.0)
    with pytest.raises(ValueError, match="contiguous"):
        decode_attend(q, k.transpose(1, 2).contiguous().transpose(1, 2), v, scale=1.0)
    ids = torch.tensor([[0, 1], [2, 3], [4, 10]])
    with pytest.raises(ValueError, match=r"ids must lie in \[-1, 9\]"):
        gather_attend(q, k, v, ids, scale=1.0)
    with pytest.raises(ValueError, match="ids must lie"):
        gather_attend(q, k, v, torch.tensor([0, -2]), scale=1.0)
    with pytest.raises(ValueError, match=r"\[H_kv=3, n\]"):
        gather_attend(q, k, v, ids[:2], scale=1.0)
    with pytest.raises(TypeError, match="int32 or int64"):
        gather_attend(q, k, v, ids.float(), scale=1.0)
    with pytest.raises(ValueError, match="move"):
        gather_attend(q, k, v, ids.to("meta"), scale=1.0)


def test_cpu_without_interpreter_names_reference():
    with pytest.raises(ValueError, match="kernels='reference'"):
        checks.require_runnable(torch.device("cpu"), object(), "decode_attend")


GPU_SHAPES = [(32, 8), (28, 4)]  # Llama-3-8B, Qwen2.5-7B


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 80, 96, 128])
@pytest.mark.parametrize("hq,hkv", GPU_SHAPES)
def test_gpu_gather_and_decode(dtype, d, hq, hkv):
    q, k, v = make(hq, hkv, d, 5000, dtype, "cuda")
    scale = d**-0.5
    for ids in (
        random_ids(hkv, 5000, 3000, 100, device="cuda"),
        random_ids(hkv, 5000, 4097, shared=True, device="cuda"),
    ):
        out, lse = gather_attend(q, k, v, ids, scale=scale, check_ids=True)
        base_out, base_lse = plain_lowp(q, k, v, ids, scale)
        ex_out, ex_lse = oracle(q, k, v, ids, scale)
        assert_rule(out, base_out, ex_out, "gather out", floor=1e-3)
        assert_rule(lse, base_lse, ex_lse, "gather lse", floor=1e-3)
    out, lse = decode_attend(q, k, v, scale=scale)
    base_out, base_lse = plain_lowp(q, k, v, torch.arange(5000, device="cuda"), scale)
    ex_out, ex_lse = oracle(q, k, v, None, scale)
    assert_rule(out, base_out, ex_out, "decode out", floor=1e-3)
    assert_rule(lse, base_lse, ex_lse, "decode lse", floor=1e-3)


@pytest.mark.gpu
def test_gpu_pinned_host_rows_zero_copy():
    q, k, v = make(32, 8, 128, 4096, torch.bfloat16, "cuda")
    ids = random_ids(8, 4096, 1000, shared=True, device="cuda")
    k_host, v_host = k.cpu().pin_memory(), v.cpu().pin_memory()
    out, lse = gather_attend(q, k_host, v_host, ids, scale=0.1)
    dev_out, dev_lse = gather_attend(q, k, v, ids, scale=0.1)
    assert torch.equal(out, dev_out) and torch.equal(lse, dev_lse)
    with pytest.raises(ValueError, match="pin it"):
        gather_attend(q, k.cpu(), v.cpu(), ids, scale=0.1)


def _split_chunks(rows, chunk_rows):
    """rows [N, H_kv, D] -> equal chunks [chunk_rows, H_kv, D] (the last one padded with garbage)."""
    n = rows.shape[0]
    n_chunks = -(-n // chunk_rows)
    padded = torch.randn(n_chunks * chunk_rows, *rows.shape[1:], dtype=rows.dtype, device=rows.device)
    padded[:n] = rows
    return list(padded.view(n_chunks, chunk_rows, *rows.shape[1:]).unbind(0))


@pytest.mark.parametrize(
    "hq,hkv,d,n_rows,chunk_rows,n,n_pad,shared",
    [
        (9, 3, 32, 200, 64, 97, 5, False),  # 4 chunks, the last partly filled
        (9, 3, 32, 150, 16, 97, 0, True),
        (7, 7, 24, 300, 300, 60, 10, False),  # one chunk
    ],
)
def test_gather_chunks_matches_gather_over_all_rows(hq, hkv, d, n_rows, chunk_rows, n, n_pad, shared):
    """Rows kept in equal chunks, found through the chunks' base addresses, give what
    gather_attend gives over the same rows in one tensor (and the fp64 oracle's rule)."""
    from kvloft.kernels.sparse_decode import gather_attend_chunks

    q, k, v = make(hq, hkv, d, n_rows)
    ids = random_ids(hkv, n_rows, n, n_pad, shared)
    scale = 0.7 * d**-0.5
    out, lse = gather_attend_chunks(q, _split_chunks(k, chunk_rows), _split_chunks(v, chunk_rows), ids, scale=scale)
    one_out, one_lse = gather_attend(q, k, v, ids, scale=scale)
    torch.testing.assert_close(out, one_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse, one_lse, rtol=1e-6, atol=1e-6)
    ex_out, ex_lse = oracle(q, k, v, ids, scale)
    ref_out, ref_lse = reference.gather_attend(q, k, v, ids, scale=scale)
    assert_rule(out, ref_out, ex_out, "out")
    assert_rule(lse, ref_lse, ex_lse, "lse")


def test_gather_chunks_rotated_matches_reference():
    from kvloft.config import ModelConfig
    from kvloft.kernels.sparse_decode import gather_attend_chunks
    from kvloft.runtime.model import rope_inv_freq

    inv = rope_inv_freq(ModelConfig.from_name("tiny"))
    d = 2 * inv.shape[0]
    q, k, v = make(8, 2, d, 90)
    ids = random_ids(2, 90, 40, 3)
    delta = torch.randint(-5000, 5000, ids.shape)
    out, lse = gather_attend_chunks(q, _split_chunks(k, 32), _split_chunks(v, 32), ids, scale=0.2,
                                    rot_delta=delta, inv_freq=inv)
    ref_out, ref_lse = reference.gather_attend(q, k, v, ids, scale=0.2, rot_delta=delta, inv_freq=inv)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-4, atol=1e-4)


def test_gather_chunks_bad_inputs():
    from kvloft.kernels.sparse_decode import gather_attend_chunks

    q, k, v = make(9, 3, 16, 64)
    ids = random_ids(3, 64, 10)
    with pytest.raises(ValueError, match="as many value chunks"):
        gather_attend_chunks(q, _split_chunks(k, 32), _split_chunks(v, 32)[:1], ids, scale=0.1)
    with pytest.raises(ValueError, match="match the first"):
        gather_attend_chunks(q, [k[:32], k[:16]], [v[:32], v[:16]], ids, scale=0.1)


@pytest.mark.gpu
def test_gpu_pinned_host_chunks_zero_copy():
    """A host tier of several pinned chunks read in place equals the rows on the GPU."""
    from kvloft.kernels.sparse_decode import gather_attend_chunks

    q, k, v = make(32, 8, 128, 4096 * 3 + 100, torch.bfloat16, "cuda")
    ids = random_ids(8, k.shape[0], 2048, 7, device="cuda")
    kc = [c.cpu().pin_memory() for c in _split_chunks(k, 4096)]
    vc = [c.cpu().pin_memory() for c in _split_chunks(v, 4096)]
    out, lse = gather_attend_chunks(q, kc, vc, ids, scale=0.1)
    dev_out, dev_lse = gather_attend(q, k, v, ids, scale=0.1)
    assert torch.equal(out, dev_out) and torch.equal(lse, dev_lse)

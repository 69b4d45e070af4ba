"""Triton lse merge vs the torch reference and an fp64 oracle (CPU: interpreter, fp32)."""

from __future__ import annotations

import math

import pytest
import torch

from kvloft.kernels import reference
from kvloft.kernels.merge import merge

ULPS = 4


def oracle(outs, lses):
    lse_all = torch.stack([x.double() for x in lses])  # [P, ...]
    lse = torch.logsumexp(lse_all, 0)
    w = torch.nan_to_num(torch.exp(lse_all - lse[None]), nan=0.0)  # all -inf -> weights 0
    return sum(wi[..., None] * o.double() for wi, o in zip(w, outs)), lse


def assert_rule(got, base, exact, what, floor=None):
    """max|got - exact| <= 2 * max|base - exact| + floor, with equal infinities."""
    fin = torch.isfinite(exact)
    assert torch.equal(torch.isfinite(got), fin), f"{what}: finiteness differs"
    assert torch.equal(got[~fin].double(), exact[~fin]), f"{what}: infinities differ"
    if not fin.any():
        return
    if floor is None:
        floor = ULPS * torch.finfo(torch.float32).eps * max(1.0, exact[fin].abs().max().item())
    err = (got.double()[fin] - exact[fin]).abs().max().item()
    base_err = (base.double()[fin] - exact[fin]).abs().max().item()
    assert err <= 2 * base_err + floor, (
        f"{what}: kernel error {err:.3g} > 2 x torch {base_err:.3g} + {floor:.3g}"
    )


def parts(n_parts, shape, dtype=torch.float32, device="cpu", n_empty=0):
    outs = [torch.randn(*shape, dtype=dtype, device=device) for _ in range(n_parts)]
    lses = [3 * torch.randn(*shape[:-1], device=device) for _ in range(n_parts)]
    for i in range(n_empty):  # empty parts: out 0, lse -inf
        outs[i] = torch.zeros_like(outs[i])
        lses[i] = torch.full_like(lses[i], -math.inf)
    return outs, lses


@pytest.mark.parametrize(
    "n_parts,shape,n_empty",
    [
        (2, (7, 16), 0),
        (3, (3, 9, 20), 1),
        (1, (9, 32), 0),
        (5, (4, 7, 80), 2),
        (4, (1, 5), 3),
        (40, (3, 200), 33),
    ],  # more parts than one trip reads, several column chunks, empty slots
)
def test_merge_matches_reference(n_parts, shape, n_empty):
    outs, lses = parts(n_parts, shape, n_empty=n_empty)
    lses[-1].view(-1)[0] = -math.inf  # one row empty in one more part
    out, lse = merge(outs, lses)
    ref_out, ref_lse = reference.merge(outs, lses)
    ex_out, ex_lse = oracle(outs, lses)
    assert out.shape == shape and lse.shape == shape[:-1] and lse.dtype == torch.float32
    assert_rule(out, ref_out, ex_out, "out")
    assert_rule(lse, ref_lse, ex_lse, "lse")


def test_all_parts_empty():
    outs, lses = parts(3, (9, 16), n_empty=3)
    out, lse = merge(outs, lses)
    assert torch.equal(out, torch.zeros(9, 16))
    assert torch.equal(lse, torch.full((9,), -math.inf))


def test_merge_of_key_halves_is_dense_attention():
    q, k, v = torch.randn(9, 32), torch.randn(97, 3, 32), torch.randn(97, 3, 32)
    a = reference.decode_attend(q, k[:40], v[:40], scale=0.2)
    b = reference.decode_attend(q, k[40:], v[40:], scale=0.2)
    empty = reference.decode_attend(q, k[:0], v[:0], scale=0.2)
    out, lse = merge([a[0], empty[0], b[0]], [a[1], empty[1], b[1]])
    dense_out, dense_lse = reference.decode_attend(q, k, v, scale=0.2)
    torch.testing.assert_close(out, dense_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, dense_lse, rtol=1e-5, atol=1e-5)


def test_mixed_dtypes_take_first_dtype():
    outs, lses = parts(2, (7, 16))
    out, lse = merge([outs[0].bfloat16(), outs[1]], lses)
    ref_out, ref_lse = reference.merge([outs[0].bfloat16(), outs[1]], lses)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref_out, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(lse, ref_lse)


def test_bad_inputs():
    outs, lses = parts(2, (7, 16))
    with pytest.raises(ValueError, match="one lse per output"):
        merge(outs, lses[:1])
    with pytest.raises(ValueError, match="one lse per output"):
        merge([], [])
    with pytest.raises(ValueError, match="shape"):
        merge([outs[0], outs[1][:5]], lses)
    with pytest.raises(ValueError, match="out without D"):
        merge(outs, [lses[0], lses[1][:5]])
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        merge([outs[0].long(), outs[1]], lses)
    with pytest.raises(ValueError, match="move"):
        merge([outs[0], outs[1].to("meta")], lses)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 80, 96, 128])
def test_gpu_merge(dtype, d):
    outs, lses = parts(3, (32, d), dtype=dtype, device="cuda", n_empty=1)
    out, lse = merge(outs, lses)
    ex_out, ex_lse = oracle(outs, lses)
    # same-precision torch baseline: the weighted sum in the input dtype
    w = torch.softmax(torch.stack(lses), 0).to(dtype)
    base = sum(wi[..., None] * o for wi, o in zip(w, outs))
    assert_rule(out, base, ex_out, "out", floor=1e-3)
    assert_rule(lse, torch.logsumexp(torch.stack(lses), 0), ex_lse, "lse")

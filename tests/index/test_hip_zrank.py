"""HiP's rank="z" option: the search kernel's per-head bias, the running key statistics, the
invariances z-scoring buys, a planted needle under a logit offset, and the paths that decline it."""

from __future__ import annotations

import pytest
import torch

from kvloft.kernels.hip_stage import hip_stage, hip_stage1, hip_stage1_reference, hip_stage_reference


def _assert_close(got: torch.Tensor, want: torch.Tensor, atol: float) -> None:
    err = (got.float() - want.float()).abs()
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite)
    assert bool((err[finite] <= atol + 1e-5 * want[finite].abs()).all()), f"max error {err[finite].max():.3g}"


@pytest.mark.parametrize("chunk,probe", [(4, "first"), (8, "middle")])
def test_stage1_kernel_bias_matches_reference(chunk, probe):
    gen = torch.Generator().manual_seed(chunk)
    keys = torch.randn(97, 3, 59, generator=gen)  # D 59, 9 query heads over 3 KV heads, a partial chunk
    q = torch.randn(9, 59, generator=gen)
    bias = 5.0 * torch.randn(9, generator=gen)
    rep, score = hip_stage1(keys, q, chunk, probe, bias=bias)
    rep_ref, score_ref = hip_stage1_reference(keys, q, chunk, probe, bias=bias)
    assert torch.equal(rep, rep_ref)
    _assert_close(score, score_ref, 1e-4)
    # the bias changes what is searched: against the unbiased scores, not all equal
    assert not torch.equal(score_ref, hip_stage1_reference(keys, q, chunk, probe)[1])


@pytest.mark.parametrize("chunk,probe", [(4, "middle"), (8, "first")])
def test_gathered_stage_kernel_bias_matches_reference(chunk, probe):
    gen = torch.Generator().manual_seed(10 + chunk)
    chunks = [torch.randn(16, 3, 59, generator=gen) for _ in range(3)]
    q = torch.randn(9, 59, generator=gen)
    bias = 5.0 * torch.randn(9, generator=gen)
    cand = torch.full((-(-37 // chunk) * chunk,), -1, dtype=torch.long)  # a padded last chunk
    cand[:37] = torch.randperm(48, generator=gen)[:37]
    cand = cand.view(-1, chunk)
    rep, score = hip_stage(chunks, cand, q, probe, bias=bias)
    rep_ref, score_ref = hip_stage_reference(chunks, cand, q, probe, bias=bias)
    assert torch.equal(rep, rep_ref)
    _assert_close(score, score_ref, 1e-4)


def test_bias_off_is_bit_identical_to_no_bias():
    # a zero bias through the reference equals no bias; the kernel without a bias equals the
    # reference without one exactly where the bias path is off (HAS_BIAS constexpr)
    gen = torch.Generator().manual_seed(3)
    keys = torch.randn(64, 3, 59, generator=gen)
    q = torch.randn(9, 59, generator=gen)
    rep, score = hip_stage1(keys, q, 8, "first")
    rep0, score0 = hip_stage1(keys, q, 8, "first", bias=torch.zeros(9))
    assert torch.equal(rep, rep0) and torch.equal(score, score0)
    ref = hip_stage1_reference(keys, q, 8, "first")
    assert torch.equal(ref[1], hip_stage1_reference(keys, q, 8, "first", bias=torch.zeros(9))[1])


def test_bias_of_wrong_shape_is_rejected():
    with pytest.raises(ValueError, match="bias must be"):
        hip_stage1(torch.randn(16, 3, 8), torch.randn(9, 8), 4, bias=torch.zeros(3))

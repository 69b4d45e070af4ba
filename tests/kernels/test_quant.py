"""Packed int4/int8 weights: quantizer error bounds, the packing layout, and the Triton
dequantizing GEMV / dequantize kernels against the torch reference (CPU: interpreter).

Kernel rule (flash-attention's): the kernel's error against an fp64 product of x and the
dequantized weight is at most 2x the error of plain torch at x's precision (dequantize
to x's dtype, matmul), plus a floor of a few fp32 ulps of the result.
"""

from __future__ import annotations

import pytest
import torch

from kvloft.kernels.quant import (
    PackedWeight,
    dequantize,
    pack_nibbles,
    quantize_int4,
    quantize_int8,
    unpack_nibbles,
)
from kvloft.kernels.quant.ops import QmmConfig, dequantize_dense, quant_matmul
from kvloft.kernels.quant.packed import reference_matmul

ULPS = 8


def weight(n, k, scale=0.05):
    # a few outliers per row, as real weights have
    w = torch.randn(n, k) * scale
    w[:, ::37] *= 6
    return w


def schemes(w):
    return {
        "int4-asym-g32": quantize_int4(w, 32),
        "int4-asym-g128": quantize_int4(w, 128),
        "int4-sym-g64": quantize_int4(w, 64, symmetric=True),
        "int8-channel": quantize_int8(w),
        "int8-g32": quantize_int8(w, 32),
    }


def group_view(t, pw):
    """[N, K] -> [N, K_pad / group, group] with zero padding (to compare per group)."""
    n, k = t.shape
    return torch.nn.functional.pad(t, (0, pw.k_pad - k)).reshape(n, -1, pw.group)


@pytest.mark.parametrize("n,k", [(33, 100), (8, 256), (5, 576)])
def test_quantize_dequantize_error_is_within_half_a_step(n, k):
    w = weight(n, k)
    for name, pw in schemes(w).items():
        pw.validate()
        err = group_view((dequantize(pw) - w).abs(), pw)
        step = pw.scales.float().abs().unsqueeze(-1)
        if pw.bits == 4 and pw.mins is None:
            bound = step * 1.001  # ggml Q4_0: the group's far side reaches +8 steps, clamped to +7
        else:  # half a step, plus the fp16 rounding of the min (one half-ulp)
            mins = 0 if pw.mins is None else pw.mins.float().abs().unsqueeze(-1)
            bound = step * 0.5005 + mins * 2.0**-11
        assert (err <= bound + 1e-7).all(), f"{name}: max excess {(err - bound).max().item():.3g}"


def test_int4_error_shrinks_with_group_and_int8_is_finer():
    w = weight(64, 512)
    rel = {name: ((dequantize(pw) - w).norm() / w.norm()).item() for name, pw in schemes(w).items()}
    assert rel["int4-asym-g32"] < rel["int4-asym-g128"] < 0.25  # outliers widen the groups
    assert rel["int8-g32"] < 0.01 and rel["int8-g32"] <= rel["int8-channel"] < 0.03


def test_pack_layout_is_ggml_q4_block():
    q = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    packed = pack_nibbles(q)
    assert packed.shape == (3, 32)
    # byte j of block b: input 32b + j low, input 32b + 16 + j high
    assert torch.equal(packed[:, 5] & 15, q[:, 5]) and torch.equal(packed[:, 5] >> 4, q[:, 21])
    assert torch.equal(packed[:, 16 + 3] & 15, q[:, 32 + 3]) and torch.equal(packed[:, 19] >> 4, q[:, 51])
    assert torch.equal(unpack_nibbles(packed), q)


def test_constant_and_zero_groups_dequantize_exactly():
    w = torch.zeros(4, 64)
    for pw in schemes(w).values():
        assert torch.equal(dequantize(pw), w)
    w[1] = 0.25  # int4 hits a constant exactly (asymmetric: the min; symmetric: -8 steps)
    for pw in (quantize_int4(w, 32), quantize_int4(w, 64, symmetric=True)):
        assert torch.equal(dequantize(pw), w)


def test_validation_names_the_problem():
    pw = quantize_int4(weight(8, 64), 32)
    bad = PackedWeight(pw.qweight[:, :-1], pw.scales, pw.mins, pw.shape, 4, 32)
    with pytest.raises(ValueError, match="qweight must be"):
        bad.validate()
    with pytest.raises(ValueError, match="group must be"):
        quantize_int4(weight(8, 64), 48)
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        quantize_int8(torch.randn(4))
    with pytest.raises(ValueError, match="takes 64"):
        quant_matmul(torch.randn(1, 63), pw)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        quant_matmul(torch.ones(1, 64, dtype=torch.int32), pw)


# ---- the Triton kernels (interpreter on the CPU) -------------------------------------------


def assert_rule(got, x, pw, what):
    exact = x.double() @ dequantize(pw).double().t()
    base = reference_matmul(x, pw)
    err = (got.double() - exact).abs().max().item()
    base_err = (base.double() - exact).abs().max().item()
    floor = ULPS * torch.finfo(torch.float32).eps * max(1.0, exact.abs().max().item())
    assert got.dtype == x.dtype and got.shape == base.shape
    assert err <= 2 * base_err + floor, f"{what}: kernel error {err:.3g} > 2 x torch {base_err:.3g} + {floor:.3g}"


# awkward: N odd / below the block, K not a multiple of 128 (padded groups), T 1, 3, 16
SHAPES = [(33, 100, 1), (7, 200, 3), (65, 96, 16), (1, 32, 1)]


@pytest.mark.parametrize("n,k,t", SHAPES)
def test_qmm_matches_reference(n, k, t):
    w, x = weight(n, k), torch.randn(t, k)
    for name, pw in schemes(w).items():
        assert_rule(quant_matmul(x, pw), x, pw, f"{name} [{t}x{k}]x[{n}x{k}]")


@pytest.mark.parametrize("split_k", [1, 3])
def test_qmm_split_k_and_tiles(split_k):
    w, x = weight(40, 352), torch.randn(2, 352)
    for name, pw in schemes(w).items():
        for cfg in (QmmConfig(block_n=16, block_k=64, split_k=split_k), QmmConfig(block_n=32, block_k=256, split_k=split_k)):
            assert_rule(quant_matmul(x, pw, cfg), x, pw, f"{name} {cfg}")
            assert_rule(quant_matmul(x[:1], pw, cfg), x[:1], pw, f"{name} T=1 {cfg}")


@pytest.mark.parametrize("dtype,t", [(torch.bfloat16, 1), (torch.float16, 1), (torch.float16, 3)])
def test_qmm_half_inputs(dtype, t):
    # bf16 with T > 1 (the tensor-core dot) runs only on the GPU: Triton 3.9's interpreter
    # returns garbage for any bf16 tl.dot (test_qmm_on_gpu covers it)
    w, x = weight(24, 160), torch.randn(t, 160).to(dtype)
    for name, pw in schemes(w).items():
        assert_rule(quant_matmul(x, pw), x, pw, f"{name} {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,t", SHAPES + [(4096, 4096, 1), (1024, 14336, 4), (14336, 4096, 16)])
def test_qmm_on_gpu(dtype, n, k, t):
    w, x = weight(n, k).cuda(), torch.randn(t, k, device="cuda").to(dtype)
    for name, pw in schemes(w).items():
        assert_rule(quant_matmul(x, pw), x, pw, f"{name} {dtype} [{t}x{k}]x[{n}x{k}]")
        assert torch.equal(dequantize_dense(pw, torch.float32), dequantize(pw)), name


def test_prefill_path_and_dequantize_kernel_are_exact():
    w = weight(19, 136)
    for name, pw in schemes(w).items():
        assert torch.equal(dequantize_dense(pw, torch.float32), dequantize(pw)), name
        x = torch.randn(20, 136)  # T > 16: dequantize + matmul
        assert torch.allclose(quant_matmul(x, pw), reference_matmul(x, pw), rtol=1e-5, atol=1e-5), name


def test_empty_rows():
    pw = quantize_int4(weight(8, 64), 32)
    assert quant_matmul(torch.randn(0, 64), pw).shape == (0, 8)

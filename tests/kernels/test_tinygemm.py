"""Packed int4 weights through PyTorch's tinygemm ops (kernels/quant/tinygemm.py): the
layout conversion and the scale/zero mapping, checked on the CPU op (same
scales_and_zeros semantics as the CUDA one), the CUDA layout's unpacking, the capability
check, and QuantLinear's choice of form; the CUDA op itself under the `gpu` mark.

Rule (flash-attention's): error against an fp64 product of x and the dequantized weight
at most 2x the error of plain torch at x's precision (dequantize to x's dtype, matmul),
plus a floor of a few fp32 ulps of the result. fp32 activations (the CPU op, fp32 scales
and zeros): against our dequantized weight. bf16 activations: the ops take bf16 scales
and zeros, so our fp16 scales and the zero m + 8 s are rounded once at conversion; the
kernel is held to the rule against the weight those parameters give (`tiny_dense`), and
the conversion to one bf16 rounding of each parameter (`test_conversion_rounds_...`).
End to end on random weights that costs about 2x torch's bf16 error with mins (the zero's
rounding is shared by a group) and nothing measurable for Q4_0-style symmetric weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_quant import assert_rule  # the rule against our dequantized weight, shared with the Triton kernels

from kvloft.kernels.quant import dequantize, quantize_int4, quantize_int8
from kvloft.kernels.quant import tinygemm as tg
from kvloft.kernels.quant.packed import reference_matmul, unpack_nibbles
from kvloft.runtime.quant_gguf import repack
from kvloft.runtime.quant_linear import QuantLinear, set_kernels

ULPS = 8


def weight(n, k, scale=0.05):
    w = torch.randn(n, k) * scale
    w[:, ::37] *= 6  # a few outliers per row, as real weights have
    return w


def gguf_q4(n, k, qtype):
    gguf = pytest.importorskip("gguf")
    a = (np.random.default_rng(n + k).standard_normal((n, k)) * 0.1).astype(np.float32)
    raw = gguf.quants.quantize(a, gguf.GGMLQuantizationType[qtype])
    return repack(torch.from_numpy(raw.reshape(-1).copy()), qtype, (n, k))


def tiny_dense(tw, pw):
    """The weight tinygemm's parameters give: (q - 8) * scale + zero in fp64 -> [N, K]."""
    n, k = pw.shape
    q = unpack_nibbles(pw.qweight).double()
    sz = tw.scales_zeros.double()[:, :n].repeat_interleave(pw.group, 0)  # [K_pad, N, 2]
    return ((q - 8) * sz[..., 0].t() + sz[..., 1].t())[:, :k]


def assert_tiny_rule(got, x, tw, pw, what):
    """The rule for bf16 activations, against the weight the op's own bf16 parameters give."""
    w = tiny_dense(tw, pw)
    exact = x.double() @ w.t()
    err = (got.double() - exact).abs().max().item()
    base_err = ((x @ w.to(x.dtype).t()).double() - exact).abs().max().item()
    floor = ULPS * torch.finfo(torch.float32).eps * max(1.0, exact.abs().max().item())
    assert err <= 2 * base_err + floor, f"{what}: tinygemm error {err:.3g} > 2 x torch {base_err:.3g} + {floor:.3g}"


def check(x, tw, pw, what):
    if x.dtype == torch.float32:
        assert_rule(tg.matmul(x, tw), x, pw, what)
    else:
        assert_tiny_rule(tg.matmul(x, tw), x, tw, pw, what)


# awkward: N not a multiple of 8 or 16, K not a multiple of the group (padded), one row
SHAPES = [(33, 100), (7, 200), (65, 96), (130, 520), (1, 64)]


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_cpu_op_matches_the_reference_from_float(n, k, group):
    w = weight(n, k)
    for sym in (False, True):
        pw = quantize_int4(w, group, symmetric=sym)
        for dtype in (torch.float32, torch.bfloat16):
            assert tg.supported_reasons(pw, dtype) == []
            tw = tg.convert(pw, dtype)
            assert tw.k_pad == pw.k_pad and tw.n_pad % 16 == 0 and tw.n_pad - n < 16
            for t in (1, 3, 17):
                x = torch.randn(t, k).to(dtype)
                check(x, tw, pw, f"g{group} sym={sym} {dtype} [{t}x{k}]x[{n}x{k}]")


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
@pytest.mark.parametrize("n,k", [(7, 64), (33, 160), (48, 96)])
def test_cpu_op_matches_the_reference_from_gguf(qtype, n, k):
    pw = gguf_q4(n, k, qtype)
    assert (pw.mins is None) == (qtype == "Q4_0") and pw.group == 32
    for dtype in (torch.float32, torch.bfloat16):
        tw = tg.convert(pw, dtype)
        for t in (1, 3, 17):
            x = torch.randn(t, k).to(dtype)
            check(x, tw, pw, f"{qtype} {dtype} [{t}x{k}]x[{n}x{k}]")


def test_scales_and_zeros_follow_the_tinygemm_convention():
    # tinygemm: w = (q - 8) * scale + zero; ours: q * s + m (asymmetric), (q - 8) * s (Q4_0)
    w = weight(16, 64)
    for sym in (False, True):
        pw = quantize_int4(w, 32, symmetric=sym)
        sz = tg.convert(pw, torch.float32).scales_zeros  # [K_pad / group, N_pad, 2]
        q = unpack_nibbles(pw.qweight).float().reshape(16, 2, 32)
        rebuilt = (q - 8) * sz[..., 0].t().unsqueeze(-1) + sz[..., 1].t().unsqueeze(-1)
        torch.testing.assert_close(rebuilt.reshape(16, 64), dequantize(pw), rtol=0, atol=1e-6)
        if sym:
            assert (sz[..., 1] == 0).all()


def test_conversion_rounds_each_bf16_parameter_once():
    w = weight(48, 256)
    for pw in (quantize_int4(w, 64), quantize_int4(w, 128, symmetric=True), gguf_q4(48, 256, "Q4_1")):
        tw = tg.convert(pw, torch.bfloat16)
        s = pw.scales.double().repeat_interleave(pw.group, 1)
        z = s * 8 + (0 if pw.mins is None else pw.mins.double().repeat_interleave(pw.group, 1))
        bound = 2.0**-8 * (8 * s.abs() + z.abs())  # a half-ulp of bf16 (2^-9) on scale x 8 and zero, doubled
        assert ((tiny_dense(tw, pw) - dequantize(pw).double()).abs() <= bound + 1e-12).all()
        x = torch.randn(64, 256).bfloat16()
        exact = x.double() @ dequantize(pw).double().t()
        rel = lambda y, exact=exact: ((y.double() - exact).norm() / exact.norm()).item()
        assert rel(tg.matmul(x, tw)) < 3 * rel(reference_matmul(x, pw))  # end to end: about 2x with mins


@pytest.mark.parametrize("inner", [2, 4, 8])
def test_cuda_layout_round_trip_and_tile_positions(inner):
    q = torch.randint(0, 16, (24, 16 * inner * 3), dtype=torch.uint8)
    packed = tg.pack_cuda_layout(q, inner)
    assert packed.dtype == torch.int32 and tuple(packed.shape) == (3, 3, 32, inner // 2)
    assert torch.equal(tg.unpack_cuda_layout(packed), q)
    # lane 5 of tile (0, 0) is row 1, inputs 2 + {0, 1} (nibbles 0, 4) and 2 + {8, 16} (nibbles 1, 2)
    word = packed[0, 0, 5, 0].item() & 0xFFFFFFFF
    nib = [(word >> (4 * s)) & 15 for s in range(8)]
    assert nib[0] == q[1, 2] and nib[4] == q[1, 3] and nib[1] == q[1, 10] and nib[2] == q[1, 18]
    assert nib[3] == q[1, 26] and nib[7] == q[1, 27]


def test_packed_weight_comes_back_from_the_cuda_layout():
    for pw in (quantize_int4(weight(33, 200), 64), gguf_q4(7, 64, "Q4_0")):
        q = torch.nn.functional.pad(unpack_nibbles(pw.qweight), (0, 0, 0, -pw.shape[0] % 8))
        tw = tg.TinyGemmWeight(tg.pack_cuda_layout(q, tg.inner_k_tiles(pw.k_pad)),
                               torch.zeros(pw.k_pad // pw.group, q.shape[0], 2), pw.shape, pw.group, torch.bfloat16)
        back = tg.packed_from_cuda(tw, pw.scales, pw.mins)
        back.validate()
        assert torch.equal(back.qweight, pw.qweight) and torch.equal(dequantize(back), dequantize(pw))


@pytest.mark.parametrize("n,k,group,sym", [(9, 96, 32, False), (7, 64, 32, True), (33, 100, 64, False),
                                           (20, 520, 256, True), (130, 384, 128, False)])
def test_dequantize_from_the_cuda_layout_is_exact(n, k, group, sym):
    # the prefill path of a layer holding only the layout (Triton; the interpreter here):
    # inner k-tiles 2 (K_pad 96), 4 (64) and 8, N padded to 8
    from kvloft.kernels.quant.ops import dequantize_tiny

    pw = quantize_int4(weight(n, k), group, symmetric=sym)
    q = torch.nn.functional.pad(unpack_nibbles(pw.qweight), (0, 0, 0, -n % 8))
    tw = tg.TinyGemmWeight(tg.pack_cuda_layout(q, tg.inner_k_tiles(pw.k_pad)),
                           torch.zeros(pw.k_pad // group, q.shape[0], 2), pw.shape, group, torch.bfloat16)
    assert torch.equal(dequantize_tiny(tw, pw.scales, pw.mins, torch.float32), dequantize(pw))
    with pytest.raises(ValueError, match="scales/mins must be"):
        dequantize_tiny(tw, pw.scales[:, :1], None, torch.float32)


def test_capability_check_names_every_reason():
    assert any("int4 only" in r for r in tg.supported_reasons(quantize_int8(weight(16, 64)), torch.float32))
    reasons = tg.supported_reasons(quantize_int4(weight(16, 192), 96), torch.int32)
    assert any("groups" in r for r in reasons) and any("fp32/bf16/fp16" in r for r in reasons)
    pw = quantize_int4(weight(16, 64), 32)
    with pytest.raises(ValueError, match=r"x must be \[T, 64\]"):
        tg.matmul(torch.randn(2, 63), tg.convert(pw, torch.float32))
    with pytest.raises(ValueError, match="convert it again"):
        tg.matmul(torch.randn(2, 64, dtype=torch.bfloat16), tg.convert(pw, torch.float32))


def test_quant_linear_picks_its_form():
    w, b = weight(33, 100), torch.randn(33)
    cpu = QuantLinear(quantize_int4(w, 32), b, dtype=torch.float32)
    assert cpu.backend == "reference" and cpu.tg_weight is None  # the CPU: opt-in
    ql = QuantLinear(quantize_int4(w, 32), b, kernels="tinygemm", dtype=torch.float32)
    assert ql.backend == "tinygemm" and ql.qweight is not None  # the CPU keeps both forms
    assert ql.packed_bytes > cpu.packed_bytes
    for t in (1, 3, 17):  # 17 > MAX_T for the CPU in fp32: the reference path
        x = torch.randn(t, 100)
        assert_rule(ql(x) - b, x, ql.packed, f"QuantLinear T={t}")
    with pytest.raises(ValueError, match="int4 only"):
        QuantLinear(quantize_int8(w), kernels="tinygemm", dtype=torch.float32)
    with pytest.raises(ValueError, match="dtype is not known"):
        QuantLinear(quantize_int4(w, 32), kernels="tinygemm")
    ql.set_kernels("reference")
    assert ql.backend == "reference"


def test_tiny_model_with_tinygemm_on_the_cpu_matches_the_reference():
    import kvloft

    m = kvloft.load_model("tiny", device="cpu", dtype="float32", weights="int4", quant_group=64)
    dense = kvloft.RetrievalConfig(method="dense")
    ids = list(range(3, 20))

    def run():
        s = kvloft.Session(m, dense, kvloft.RuntimeConfig(progress=False))
        s.feed(ids)
        return [s.step(t).double() for t in (4, 5)]

    ref = run()
    set_kernels(m.net, "tinygemm")
    assert {q.backend for q in m.net.modules() if isinstance(q, QuantLinear)} == {"tinygemm"}
    got = run()  # Session keeps kernels="auto": the layout stays in use
    assert {q.backend for q in m.net.modules() if isinstance(q, QuantLinear)} == {"tinygemm"}
    for a, r in zip(got, ref):
        assert ((a - r).norm() / r.norm()).item() < 1e-5


# ---- the CUDA op ---------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_op_layout_is_the_one_unpacked_here():
    q = torch.randint(0, 16, (40, 384), dtype=torch.uint8, device="cuda")
    for inner in (2, 4, 8):
        op = torch.ops.aten._convert_weight_to_int4pack(tg._hi_lo_bytes(q), inner)
        assert torch.equal(op, tg.pack_cuda_layout(q, inner))
        assert torch.equal(tg.unpack_cuda_layout(op), q)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", SHAPES + [(4096, 4096), (14336, 4096), (4096, 14336)])
@pytest.mark.parametrize("t", [1, 3, 17, 64])
def test_cuda_op_matches_the_reference(n, k, t):
    w, x = weight(n, k).cuda(), torch.randn(t, k, device="cuda").to(torch.bfloat16)
    for group in (32, 128, 256):
        for pw in (quantize_int4(w, group), quantize_int4(w, group, symmetric=True)):
            assert tg.supported_reasons(pw, torch.bfloat16) == []
            check(x, tg.convert(pw, torch.bfloat16), pw, f"g{group} [{t}x{k}]x[{n}x{k}]")


@pytest.mark.gpu
def test_cuda_quant_linear_holds_only_the_layout():
    pw = quantize_int4(weight(4104, 1000).cuda(), 128)
    ql = QuantLinear(pw, dtype=torch.bfloat16)
    assert ql.backend == "tinygemm" and ql.qweight is None, ql.tinygemm_off
    assert ql.packed_bytes < 1.1 * pw.nbytes  # one copy of the values on the GPU
    assert torch.equal(ql.packed.qweight, pw.qweight)
    for t in (1, tg.MAX_T[("cuda", torch.bfloat16)]):  # rows tinygemm takes: its own bf16 parameters
        x = torch.randn(t, 1000, device="cuda", dtype=torch.bfloat16)
        assert_tiny_rule(ql(x), x, ql.tiny, pw, f"QuantLinear T={t}")
    t = tg.MAX_T[("cuda", torch.bfloat16)] + 8  # above: dequantized from the layout, cuBLAS
    x = torch.randn(t, 1000, device="cuda", dtype=torch.bfloat16)
    assert_rule(ql(x), x, pw, f"QuantLinear T={t}")
    from kvloft.kernels.quant.ops import dequantize_dense, dequantize_tiny

    assert torch.equal(dequantize_tiny(ql.tiny, ql.scales, ql.mins, torch.bfloat16),
                       dequantize_dense(pw, torch.bfloat16))
    fp16 = QuantLinear(pw, dtype=torch.float16)
    assert fp16.backend == "triton" and "bf16" in fp16.tinygemm_off

"""Triton kernels for packed weights (kernels/quant/packed.py): a dequantizing GEMV/skinny
GEMM for decode (T <= 16 rows) and a dequantize-to-dense kernel for prefill chunks.

qmm: grid (cdiv(N, BLOCK_N), SPLIT_K). Program (n, s) dequantizes BLOCK_N weight rows over
its K range once, in registers, and multiplies them with all T rows of x: for T == 1
products accumulate per column and are reduced across the tile once at the end, a tensor-core dot with T padded to 16 otherwise. Accumulates in
fp32. With SPLIT_K > 1 each split writes an fp32 partial [SPLIT_K, T, N] summed after.
Memory traffic: read N*K/2 (int4) or N*K (int8) bytes + 2 (or 4) bytes per group and row
of scales, read T*K x elements per N block (cached), write T*N.

dequant: grid (cdiv(N, BLOCK_N), cdiv(K_pad, BLOCK_K)), writes W [N, K] in the compute
dtype (read N*K/2, write 2*N*K bytes); the caller then runs a cuBLAS matmul.

A K tile lies inside one scale group (the launcher halves BLOCK_K until it divides the
group), so scales are one load per row and tile. The tile loader works on the packing
block's two halves: column c of a tile is byte
(k0 / 2 + c); its low nibble is input k0 + 32 * (c // 16) + c % 16 and its high nibble
that input + 16. For int8 the same two inputs are read as two int8 loads.
Reference: kernels/quant/packed.py `reference_matmul` and `dequantize`.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_tile(qweight, scales, mins, rows, row_ok, k0, k_end, stride_q, stride_s,
               BITS: tl.constexpr, HAS_MIN: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """-> w_lo, w_hi [BLOCK_N, BLOCK_K // 2] fp32 and their input indices lo_k, hi_k [BLOCK_K // 2].
    The tile lies inside one group (GROUP % BLOCK_K == 0): one scale (and min) per row."""
    tl.static_assert(BLOCK_K % 32 == 0)
    tl.static_assert(GROUP % BLOCK_K == 0)
    c = tl.arange(0, BLOCK_K // 2)
    lo_k = k0 + (c // 16) * 32 + (c % 16)
    hi_k = lo_k + 16
    ok = row_ok[:, None] & (lo_k < k_end)[None, :]
    r64 = rows.to(tl.int64)
    s = tl.load(scales + r64 * stride_s + k0 // GROUP, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    if BITS == 4:
        b = tl.load(qweight + r64[:, None] * stride_q + (k0 // 2 + c)[None, :], mask=ok, other=0)
        q_lo = (b & 15).to(tl.float32)
        q_hi = (b >> 4).to(tl.float32)
        if HAS_MIN:
            m = tl.load(mins + r64 * stride_s + k0 // GROUP, mask=row_ok, other=0.0).to(tl.float32)[:, None]
            w_lo = q_lo * s + m
            w_hi = q_hi * s + m
        else:
            w_lo = (q_lo - 8.0) * s
            w_hi = (q_hi - 8.0) * s
    else:
        w_lo = tl.load(qweight + r64[:, None] * stride_q + lo_k[None, :], mask=ok, other=0).to(tl.float32) * s
        w_hi = tl.load(qweight + r64[:, None] * stride_q + hi_k[None, :], mask=ok, other=0).to(tl.float32) * s
    return w_lo, w_hi, lo_k, hi_k


@triton.jit(do_not_specialize=["n_rows", "n_out", "k_in", "k_pad", "k_split"])
def _qmm_kernel(
    x,  # [T, K] float, last dim contiguous
    qweight,  # int4: uint8 [N, K_pad // 2]; int8: int8 [N, K_pad]; contiguous
    scales,  # fp16 [N, K_pad // GROUP]
    mins,  # fp16 [N, K_pad // GROUP] (read only when HAS_MIN)
    out,  # [SPLIT_K, T, N]: fp32 partials, or x's dtype when SPLIT_K == 1
    n_rows,  # T
    n_out,  # N
    k_in,  # K (x beyond K is zero)
    k_pad,  # K_pad
    k_split,  # inputs per split, a multiple of BLOCK_K
    stride_xt,
    stride_q,
    stride_s,
    stride_os,
    stride_ot,
    BITS: tl.constexpr,
    HAS_MIN: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,  # T > 1: tensor-core dot over BLOCK_T >= 16 rows
    IEEE: tl.constexpr,  # fp32 x: exact fp32 dot (no tf32)
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_out
    t = tl.arange(0, BLOCK_T)
    t_ok = t < n_rows
    k_start = split * k_split
    k_end = tl.minimum(k_start + k_split, k_pad)
    if USE_DOT:
        acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    else:  # T == 1: products summed per column in registers, reduced across the tile once at the end
        acc = tl.zeros([BLOCK_N, BLOCK_K // 2], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        w_lo, w_hi, lo_k, hi_k = _load_tile(qweight, scales, mins, rows, row_ok, k0, k_end, stride_q, stride_s,
                                            BITS, HAS_MIN, GROUP, BLOCK_K)
        x_lo = tl.load(x + t[:, None] * stride_xt + lo_k[None, :], mask=t_ok[:, None] & (lo_k < k_in)[None, :],
                       other=0.0)
        x_hi = tl.load(x + t[:, None] * stride_xt + hi_k[None, :], mask=t_ok[:, None] & (hi_k < k_in)[None, :],
                       other=0.0)
        if USE_DOT:
            if IEEE:
                acc += tl.dot(x_lo, tl.trans(w_lo), input_precision="ieee")
                acc += tl.dot(x_hi, tl.trans(w_hi), input_precision="ieee")
            else:
                acc += tl.dot(x_lo, tl.trans(w_lo.to(x_lo.dtype)))
                acc += tl.dot(x_hi, tl.trans(w_hi.to(x_hi.dtype)))
        else:
            acc += w_lo * x_lo.to(tl.float32) + w_hi * x_hi.to(tl.float32)
    dst = out + split.to(tl.int64) * stride_os
    if USE_DOT:
        ptrs = dst + t[:, None] * stride_ot + rows[None, :]
        tl.store(ptrs, acc.to(out.dtype.element_ty), mask=t_ok[:, None] & row_ok[None, :])
    else:
        tl.store(dst + rows, tl.sum(acc, axis=1).to(out.dtype.element_ty), mask=row_ok)


@triton.jit(do_not_specialize=["n_out", "k_in", "k_pad"])
def _dequant_kernel(
    qweight, scales, mins,  # as in _qmm_kernel
    w,  # [N, K] out, contiguous, the compute dtype
    n_out, k_in, k_pad, stride_q, stride_s,
    BITS: tl.constexpr,
    HAS_MIN: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_out
    k0 = tl.program_id(1) * BLOCK_K
    w_lo, w_hi, lo_k, hi_k = _load_tile(qweight, scales, mins, rows, row_ok, k0, k_pad, stride_q, stride_s,
                                        BITS, HAS_MIN, GROUP, BLOCK_K)
    base = w + rows.to(tl.int64)[:, None] * k_in
    tl.store(base + lo_k[None, :], w_lo.to(w.dtype.element_ty), mask=row_ok[:, None] & (lo_k < k_in)[None, :])
    tl.store(base + hi_k[None, :], w_hi.to(w.dtype.element_ty), mask=row_ok[:, None] & (hi_k < k_in)[None, :])


@triton.jit(do_not_specialize=["n_out", "k_in", "k_outer"])
def _dequant_tiny_kernel(
    packed,  # int32 [N_pad / 8, K_pad / (16 INNER), 32, INNER / 2]: PyTorch's CUDA int4pack layout
    scales, mins,  # fp16 [N, K_pad // GROUP]: ours (w = q * s + m, or (q - 8) * s without mins)
    w,  # [N, K] out, contiguous, the compute dtype
    n_out, k_in, k_outer, stride_s,
    INNER: tl.constexpr,  # inner k-tiles of the layout (2, 4, 8)
    HAS_MIN: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dequant from the tinygemm layout (kernels/quant/tinygemm.py unpack_cuda_layout is the
    reference): W[n, k] sits in int32 ((n // 8 * k_outer + k // (16 INNER)) * 32 + 4 (n % 8) +
    (k // 2) % 4) * (INNER / 2) + (k % (16 INNER)) // 32, nibble 4 (k % 2) + 2 ((k // 16) % 2) +
    (k // 8) % 2. Each int32 is gathered by the 8 outputs it holds (from cache): read N*K/2,
    write 2*N*K bytes, as _dequant_kernel."""
    tl.static_assert(GROUP % BLOCK_K == 0)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_out
    k0 = tl.program_id(1) * BLOCK_K
    ks = k0 + tl.arange(0, BLOCK_K)
    k_ok = ks < k_in
    r64 = rows.to(tl.int64)
    rem = ks % (16 * INNER)
    lane = 4 * (r64 % 8)[:, None] + ((rem // 2) % 4)[None, :]
    tile = (r64 // 8)[:, None] * k_outer + (ks // (16 * INNER))[None, :]
    word = (tile * 32 + lane) * (INNER // 2) + (rem // 32)[None, :]
    v = tl.load(packed + word, mask=row_ok[:, None] & k_ok[None, :], other=0)
    nib = 4 * (rem % 2) + 2 * ((rem // 16) % 2) + (rem // 8) % 2
    q = ((v >> (4 * nib)[None, :]) & 15).to(tl.float32)
    s = tl.load(scales + r64 * stride_s + k0 // GROUP, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    if HAS_MIN:
        m = tl.load(mins + r64 * stride_s + k0 // GROUP, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        out = q * s + m
    else:
        out = (q - 8.0) * s
    ptrs = w + r64[:, None] * k_in + ks[None, :]
    tl.store(ptrs, out.to(w.dtype.element_ty), mask=row_ok[:, None] & k_ok[None, :])

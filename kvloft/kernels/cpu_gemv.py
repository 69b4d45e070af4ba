"""A linear layer over a few rows on the CPU, fp32, compiled (numba): the decode step's GEMV.

    out[t, o] = sum_i x[t, i] * w[o, i] (+ b[o])      x [T, I], w [O, I], b [O] -> [T, O]

A decode token's linears are reads of their weights: SmolLM2-135M's 540 MB of fp32 once a
token. torch's fp32 GEMV (F.linear / torch.mv at one row) read them at ~8 GB/s on the 2-core
AVX2 development machine, ~6 GB/s under load; this loop, each output row's weights read once in
order, reads them at ~10 GB/s on one thread and, split over 2 threads by output on a quiet
machine, at ~21-26 GB/s (318 MB: 12-15 ms against 38.7 ms); see PARALLEL_MIN_BYTES for why
one thread is the default.
With T > 1 each weight row is dotted with all T inputs while it sits in L1 (four inputs a pass,
four sums in flight), so up to `MAX_ROWS` rows cost about one read of the weights plus their
arithmetic; past that, a real GEMM (F.linear) wins.

fp32 only; the sum of each dot product is reordered (fastmath: vector lanes), so results
differ from F.linear by fp32 summation order (tests/kernels/test_cpu_gemv.py bounds it).
Compiled once per machine (numba's on-disk cache) and loaded off the decode path
(kernels/cpu_warmup.py).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from kvloft.kernels.numba_flags import ERROR_MODEL, FASTMATH

# rows per call through the compiled loop; more go to F.linear (a GEMM). 16: a batched decode step
# of 16 sessions stays here; F.linear's OpenMP GEMM of 16 rows waited on a descheduled thread under
# load (a SmolLM2 layer's projections and MLP: ~225 ms against ~4 ms here, load ~4).
MAX_ROWS = 16
# Weights of at least this many bytes are split over numba's threads, in one OpenMP parallel
# region a call; None (the default): every call on the caller's thread. A region waits for every
# thread to be scheduled: on this shared 2-core machine under load (load average 4-8), a region
# per linear of >= 1 MB and per layer's attention (181 a SmolLM2 token) made dense decode 7x
# slower than no region at all (1451 vs 204 ms/token), and even one per layer's attention plus
# one for the lm_head cost 1.9x (381); in a quieter spell splitting everything was ~25% faster
# than not (98 vs 133 ms).
# On dedicated idle cores, set 1 << 20 here and in cpu_attend (docs/performance.md).
PARALLEL_MIN_BYTES: int | None = None


# inlined into its callers (numba IR, compiled with their flags: all FASTMATH): called once per weight
# row, a call cost ~35 us per 1536-row GEMV at T = 1 here (+40%)
@njit(fastmath=FASTMATH, error_model=ERROR_MODEL, nogil=True, cache=True, inline="always")
def dot_rows(x, w, o, bias, out, col):  # out[t, col] = x[t] . w[o] + bias for every row t of x [T, I]
    # w [O, I]: row o read once, dotted with four rows of x a pass while in L1
    wr = w[o]
    t_n, i_n = x.shape
    t = 0
    while t + 4 <= t_n:  # four rows a pass: four sums in flight, each load of wr used four times
        x0, x1, x2, x3 = x[t], x[t + 1], x[t + 2], x[t + 3]
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for i in range(i_n):
            wi = wr[i]
            a0 += x0[i] * wi
            a1 += x1[i] * wi
            a2 += x2[i] * wi
            a3 += x3[i] * wi
        out[t, col], out[t + 1, col], out[t + 2, col], out[t + 3, col] = a0 + bias, a1 + bias, a2 + bias, a3 + bias
        t += 4
    for r in range(t, t_n):
        xr = x[r]
        acc = np.float32(0.0)
        for i in range(i_n):
            acc += xr[i] * wr[i]
        out[r, col] = acc + bias


@njit(fastmath=FASTMATH, error_model=ERROR_MODEL, nogil=True, cache=True)
def _rows(x, w, b, has_bias, out, o):  # output o of every row: w[o] read once, dotted with each x[t]
    dot_rows(x, w, o, b[o] if has_bias else np.float32(0.0), out, o)


@njit(parallel=True, fastmath=FASTMATH, error_model=ERROR_MODEL, nogil=True, cache=True)
def _linear_parallel(x, w, b, has_bias, out):  # x [T, I], w [O, I], b [O] or [1], out [T, O]; float32
    for o in prange(w.shape[0]):
        _rows(x, w, b, has_bias, out, o)


@njit(fastmath=FASTMATH, error_model=ERROR_MODEL, nogil=True, cache=True)
def _linear_serial(x, w, b, has_bias, out):  # the same on the caller's thread: no parallel region
    for o in range(w.shape[0]):
        _rows(x, w, b, has_bias, out, o)


_NO_BIAS = np.zeros(1, dtype=np.float32)


def applies(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> bool:
    """The compiled loop takes these: fp32 CPU tensors, weight [O, I] contiguous, at most
    MAX_ROWS rows of x [..., I], bias [O] contiguous or None."""
    return (x.device.type == "cpu" and weight.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and weight.dim() == 2 and weight.is_contiguous() and x.shape[-1] == weight.shape[1]
            and x.numel() <= MAX_ROWS * weight.shape[1]
            and (bias is None or (bias.dtype == torch.float32 and bias.shape == weight.shape[:1]
                                  and bias.is_contiguous() and bias.device.type == "cpu")))


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear for few fp32 CPU rows: x [..., I] (any strides; rows of the leading dims at most
    MAX_ROWS), weight [O, I] contiguous, bias [O] or None -> [..., O] fp32. Equal to F.linear
    up to fp32 summation order. Raises ValueError for inputs `applies` refuses."""
    if not applies(x, weight, bias):
        raise ValueError(
            f"cpu_gemv.linear takes fp32 CPU tensors, x [..., I] of at most {MAX_ROWS} rows, weight [O, I] "
            f"contiguous, bias [O] or None; got x {tuple(x.shape)} {x.dtype} on {x.device}, weight "
            f"{tuple(weight.shape)} {weight.dtype} (contiguous={weight.is_contiguous()}), bias "
            f"{None if bias is None else tuple(bias.shape)}; use F.linear for the others")
    return linear_unchecked(x, weight, bias)


def linear_unchecked(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """`linear` without the checks, for callers that declared `applies` once (runtime/model.py)."""
    n_in = weight.shape[1]
    x2 = x.reshape(-1, n_in)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    out = torch.empty((x2.shape[0], weight.shape[0]), dtype=torch.float32)
    if x2.shape[0] and weight.shape[0]:
        b = _NO_BIAS if bias is None else bias.detach().numpy()
        split = PARALLEL_MIN_BYTES is not None and weight.numel() * 4 >= PARALLEL_MIN_BYTES
        kernel = _linear_parallel if split else _linear_serial
        kernel(x2.detach().numpy(), weight.detach().numpy(), b, bias is not None, out.numpy())
    return out.view(*x.shape[:-1], weight.shape[0])


def warm() -> None:
    """Compile (or load from numba's cache) the loop for both bias cases: a few ms from cache."""
    x, w = np.ones((1, 3), np.float32), np.ones((2, 3), np.float32)
    out = np.empty((1, 2), np.float32)
    for kernel in (_linear_serial, _linear_parallel):
        kernel(x, w, _NO_BIAS, False, out)
        kernel(x, w, np.ones(2, np.float32), True, out)

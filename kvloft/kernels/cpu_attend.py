"""One decode query over token-major keys on the CPU, fp32, compiled (numba): dense decode.

    s[h, t] = scale * q[h] . k[t, h // g]       q [H_q, D], k, v [T, H_kv, D] (token-major)
    out[h]  = softmax_t(s[h]) @ v[:, h // g],   lse[h] = logsumexp_t s[h]

ATen's CPU flash attention takes the token-major cache as a strided view ([H_kv, 1, T, D],
rows H_kv * D apart) and reads each KV head's 256 B of every 768 B row in a pass of its own:
2.85 ms per SmolLM2 layer at 6K tokens in a decode step, where the same math over head-major
copies takes ~1 ms. Here each block of rows is read once, in order, every head of a row at
once: the block's logits [H_q, B] are written from its K rows, softened within the block, and
its V rows summed into the block's partial output; one pass merges the blocks by log-sum-exp.
The blocks can run split over T across numba's threads (PARALLEL_MIN_BYTES; off by default).
K and V are read once (9.2 MB per layer at 6K), never copied; DenseKV's layout is untouched.

fp32 only, contiguous K and V; everything else goes through reference.decode_attend's ATen /
torch routes. Compiled once per machine (numba's on-disk cache), loaded off the decode path
(kernels/cpu_warmup.py). Tested against the fp64 oracle (tests/kernels/test_cpu_attend_decode.py).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from kvloft.kernels import cpu_split
from kvloft.kernels.cpu_score import row_logits
from kvloft.kernels.cpu_split import CALLER, claim, commit, done, settle
from kvloft.kernels.numba_flags import ERROR_MODEL, FASTMATH_FINITE

enabled = True  # False: reference.decode_attend takes ATen's flash attention instead
BLOCK = 256  # rows per block: a block's logits [H_q, B] fp32 stay in L1/L2 (9 KB for 9 heads)
MAX_HEAD_DIM = 512
# K and V of at least this many bytes are split over numba's threads (one OpenMP parallel region
# a call); None (the default): on the caller's thread (cpu_gemv.PARALLEL_MIN_BYTES says why).
PARALLEL_MIN_BYTES: int | None = None
# The helper thread the blocks are shared with (kernels/cpu_split.py: the caller never waits on a
# descheduled thread), set where a CPU model is declared (runtime/model.py); None: as above.
SPLIT: cpu_split.Helper | None = None


@njit(fastmath=FASTMATH_FINITE, error_model=ERROR_MODEL, nogil=True, cache=True)
def _block(q, k, v, scale, r0, r1, o, stat, bi):  # one block of rows -> o [H_q, D], stat[bi] = (m, l) per head
    hkv, d = k.shape[1], k.shape[2]
    hq = q.shape[0]
    g = hq // hkv
    n = r1 - r0
    s = np.empty((hq, n), np.float32)
    row_logits(q, k, r0, r1, scale, s)  # the block's K rows, in order, every head at once
    for hh in range(hq):  # softmax within the block; m and l kept for the merge
        m = s[hh, 0]
        for c in range(1, n):
            m = max(m, s[hh, c])
        lsum = np.float32(0.0)
        for c in range(n):
            p = np.exp(s[hh, c] - m)
            s[hh, c] = p
            lsum += p
        stat[bi, hh, 0] = m
        stat[bi, hh, 1] = lsum
    o[:] = 0.0
    for r in range(n):  # the block's V rows, in order
        for h in range(hkv):
            vr = v[r0 + r, h]
            for i in range(g):
                hh = h * g + i
                p = s[hh, r]
                for j in range(d):
                    o[hh, j] += p * vr[j]


@njit(fastmath=FASTMATH_FINITE, error_model=ERROR_MODEL, nogil=True, cache=True)
def _merge(parts, stat, out, lse):  # blocks' parts [nb, H_q, D], stat [nb, H_q, 2] -> out [H_q, D], lse [H_q]
    nb, hq, d = parts.shape
    for hh in range(hq):  # log-sum-exp merge of the blocks (exact)
        m = stat[0, hh, 0]
        for bi in range(1, nb):
            m = max(m, stat[bi, hh, 0])
        total = np.float32(0.0)
        for j in range(d):
            out[hh, j] = 0.0
        for bi in range(nb):
            w = np.exp(stat[bi, hh, 0] - m)
            total += w * stat[bi, hh, 1]
            for j in range(d):
                out[hh, j] += w * parts[bi, hh, j]
        for j in range(d):
            out[hh, j] /= total
        lse[hh] = m + np.log(total)


@njit(parallel=True, fastmath=FASTMATH_FINITE, error_model=ERROR_MODEL, nogil=True, cache=True)
def _decode_parallel(q, k, v, scale, block, out, lse):  # q [H_q, D], k, v [T, H_kv, D], out [H_q, D], lse [H_q]
    t_n = k.shape[0]
    nb = (t_n + block - 1) // block
    parts = np.empty((nb, q.shape[0], q.shape[1]), np.float32)
    stat = np.empty((nb, q.shape[0], 2), np.float32)
    for bi in prange(nb):
        _block(q, k, v, scale, bi * block, min(bi * block + block, t_n), parts[bi], stat, bi)
    _merge(parts, stat, out, lse)


@njit(fastmath=FASTMATH_FINITE, error_model=ERROR_MODEL, nogil=True, cache=True)
def _decode_serial(q, k, v, scale, block, out, lse):  # the same on the caller's thread
    t_n = k.shape[0]
    nb = (t_n + block - 1) // block
    parts = np.empty((nb, q.shape[0], q.shape[1]), np.float32)
    stat = np.empty((nb, q.shape[0], 2), np.float32)
    for bi in range(nb):
        _block(q, k, v, scale, bi * block, min(bi * block + block, t_n), parts[bi], stat, bi)
    _merge(parts, stat, out, lse)


@njit(fastmath=FASTMATH_FINITE, error_model=ERROR_MODEL, nogil=True, cache=True)
def _decode_split(role, q, k, v, scale, block, parts, stat, out, lse, ctl):
    # _decode_serial's blocks shared by the caller and the helper thread (kernels/cpu_split.py);
    # parts [nb, H_q, D], stat [nb, H_q, 2] of this call; the caller merges them into out, lse
    t_n = k.shape[0]
    o = np.empty((q.shape[0], q.shape[1]), np.float32)
    st = np.empty((1, q.shape[0], 2), np.float32)
    while True:
        bi = claim(ctl, role)
        if bi < 0:
            break
        _block(q, k, v, scale, bi * block, min(bi * block + block, t_n), o, st, 0)
        if commit(ctl, bi, role):
            parts[bi] = o
            stat[bi] = st[0]
            done(ctl, bi, role)
    settle(ctl, role)
    if role == CALLER:
        _merge(parts, stat, out, lse)


def applies(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """The compiled kernel takes these: fp32 CPU tensors, q [H_q, D], k and v [T, H_kv, D]
    contiguous (each row's H_kv * D together), H_kv dividing H_q, D at most MAX_HEAD_DIM."""
    return (q.device.type == k.device.type == v.device.type == "cpu"
            and q.dtype == k.dtype == v.dtype == torch.float32 and q.dim() == 2 and k.dim() == 3
            and k.shape == v.shape and q.shape[1] == k.shape[2] <= MAX_HEAD_DIM and k.shape[1] > 0
            and q.shape[0] % k.shape[1] == 0 and k.is_contiguous() and v.is_contiguous())


def decode_attend(q: Tensor, k: Tensor, v: Tensor, *, scale: float) -> tuple[Tensor, Tensor]:
    """reference.decode_attend for fp32 CPU tensors (see `applies`): q [H_q, D]; k, v [T, H_kv, D]
    -> (out [H_q, D] fp32, lse [H_q] fp32). No keys: out 0, lse -inf. Raises ValueError for
    inputs `applies` refuses."""
    if not applies(q, k, v):
        raise ValueError(
            f"cpu_attend.decode_attend takes fp32 CPU tensors q [H_q, D], k and v [T, H_kv, D] contiguous "
            f"with H_kv dividing H_q and D <= {MAX_HEAD_DIM}; got q {tuple(q.shape)} {q.dtype}, k "
            f"{tuple(k.shape)} {k.dtype} (contiguous={k.is_contiguous()}), v {tuple(v.shape)} {v.dtype}; "
            "use reference.decode_attend for the others")
    return decode_attend_unchecked(q, k, v, scale)


def decode_attend_unchecked(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """`decode_attend` without the checks, for callers that asked `applies` (reference.decode_attend)."""
    hq, d = q.shape
    out = torch.empty((hq, d), dtype=torch.float32)
    if k.shape[0] == 0:
        return out.zero_(), torch.full((hq,), -math.inf, dtype=torch.float32)
    lse = torch.empty(hq, dtype=torch.float32)
    if SPLIT is not None:
        nb = -(-k.shape[0] // BLOCK)
        parts, stat = np.empty((nb, hq, d), np.float32), np.empty((nb, hq, 2), np.float32)
        cpu_split.run(_decode_split, (q.contiguous().numpy(), k.numpy(), v.numpy(), np.float32(scale), BLOCK, parts,
                                      stat, out.numpy(), lse.numpy(), cpu_split.new_ctl(nb)), SPLIT)
        return out, lse
    split = PARALLEL_MIN_BYTES is not None and 8 * k.numel() >= PARALLEL_MIN_BYTES
    kernel = _decode_parallel if split else _decode_serial
    kernel(q.contiguous().numpy(), k.numpy(), v.numpy(), np.float32(scale), BLOCK, out.numpy(), lse.numpy())
    return out, lse


def warm() -> None:
    """Compile (or load from numba's cache) the kernel: a few ms from cache."""
    q, k = np.ones((2, 4), np.float32), np.ones((3, 1, 4), np.float32)
    for kernel in (_decode_serial, _decode_parallel):
        kernel(q, k, k, np.float32(0.5), BLOCK, np.empty((2, 4), np.float32), np.empty(2, np.float32))
    _decode_split(CALLER, q, k, k, np.float32(0.5), BLOCK, np.empty((1, 2, 4), np.float32),
                  np.empty((1, 2, 2), np.float32), np.empty((2, 4), np.float32), np.empty(2, np.float32),
                  cpu_split.new_ctl(1))

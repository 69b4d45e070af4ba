"""q·K of every row of a key chunk on the CPU: the scan of an exact search, compiled (numba).

    out[h, n] = sum_d q[h, d] * k[n, h // g, d]        q [H_q, D], k [N, H_kv, D] -> [H_q, N]

torch's bmm over the token-major chunk (reference.score: [H_kv, g, D] x [H_kv, D, N], the keys
strided by H_kv * D) packs the keys before multiplying three rows by them: on SmolLM2's 4096 x
3 x 64 fp32 chunk (3 MB, out of cache) ~850 us on one core, where one sum over the same bytes
takes ~210 us. This loop reads each key row once, in order, and keeps the group's queries in
cache: ~320 us. One thread (the caller's; the GIL is released), fp32 only; everything else
goes through reference.score. Compiled once per machine (numba's on-disk cache) and loaded
off the decode path (kernels/cpu_warmup.py); a cold first call costs ~0.4-1 s.
The CPU decode step (kernels/cpu_decode.py) scans its static tier's keys through it too.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit
from torch import Tensor

from kvloft.kernels.numba_flags import ERROR_MODEL, FASTMATH

enabled = True  # False: every scan through reference.score (torch bmm)


@njit(nogil=True, fastmath=FASTMATH, error_model=ERROR_MODEL, cache=True)
def row_logits(q, k, r0, r1, scale, out):  # out[h, r - r0] = scale * q[h] . k[r, h // g], r0 <= r < r1
    # q [H_q, D], k [N, H_kv, D], out [H_q, >= r1 - r0]; float32. Each key row read once, in order,
    # every head at once: the scan here, and the logits pass of cpu_attend, cpu_decode, cpu_rows.
    hkv, d = k.shape[1], k.shape[2]
    g = q.shape[0] // hkv
    for r in range(r1 - r0):
        for h in range(hkv):
            kr = k[r0 + r, h]
            for i in range(g):
                qi = q[h * g + i]
                acc = np.float32(0.0)
                for j in range(d):
                    acc += qi[j] * kr[j]
                out[h * g + i, r] = acc * scale


def applies(q: Tensor, k_rows: Tensor) -> bool:
    """The compiled scan takes these: fp32 CPU tensors, keys contiguous, GQA heads dividing."""
    return (enabled and q.device.type == "cpu" and k_rows.device.type == "cpu"
            and q.dtype == k_rows.dtype == torch.float32 and k_rows.is_contiguous()
            and q.shape[0] % k_rows.shape[1] == 0 and q.shape[1] == k_rows.shape[2])


def score_rows(q: Tensor, k_rows: Tensor) -> Tensor:
    """q [H_q, D] fp32 · k_rows [N, H_kv, D] fp32 (contiguous, CPU) -> logits [H_q, N] fp32,
    unscaled (see `applies`); equal to reference.score up to fp32 summation order."""
    out = torch.empty((q.shape[0], k_rows.shape[0]), dtype=torch.float32)
    if k_rows.shape[0]:
        n = k_rows.shape[0]
        row_logits(q.contiguous().numpy(), k_rows.numpy(), 0, n, np.float32(1.0), out.numpy())
    return out


def warm() -> None:
    """Compile (or load from numba's cache) the scan: a few ms from cache once numba is up."""
    q, k = np.ones((2, 4), np.float32), np.ones((3, 1, 4), np.float32)
    row_logits(q, k, 0, 3, np.float32(1.0), np.empty((2, 3), np.float32))

"""Exact's CPU ranking, compiled (numba): each KV head's group max of the logits, then its top-k.

    s[h, n] = max_i logits[h * g + i, n]          logits [H_q, N] fp32 -> s [H_kv, N]
    ids[h]  = the `budget` largest s[h, :]        -> ids [H_kv, budget] int64, in no order

The torch route (index/exact.py: reference.reduce_group's amax, torch.topk) is two small ops a
layer, and under load each waits on torch's OpenMP threads; here both are one pass on the
caller's thread (the GIL released). The max is exact (no arithmetic), so the scores equal
torch's bit for bit; the budget-th largest is found by a histogram of the scores' top 11 bits
(as order-preserving unsigned keys) and a partition of its bucket alone (np.partition of all N
scores took ~50 us a head here, about torch's whole route), then every score above it is
taken, and the ties at it in index order (torch.topk leaves which tied ids it takes
unspecified: the two agree on every id but those exactly tied at the boundary). A NaN score
falls back to torch (topk counts NaN as the largest; partition does not). fp32 only.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit
from torch import Tensor

enabled = True  # False: exact's CPU ranking through torch (reduce_group, topk)


@njit(nogil=True, fastmath=False, cache=True)
def _group_max_topk(logits, hkv, budget, ids):  # logits [H_q, N] f32, ids [H_kv, budget] i64 -> ok
    hq, n = logits.shape
    g = hq // hkv
    s = np.empty(n, np.float32)
    key = np.empty(n, np.uint32)
    hist = np.empty(1 << 11, np.int64)
    for h in range(hkv):
        for c in range(n):
            s[c] = logits[h * g, c]
        for i in range(1, g):  # the group max; NaN propagates, as in torch.amax
            for c in range(n):
                v = logits[h * g + i, c]
                m = s[c]
                s[c] = v if (v > m or np.isnan(v)) else m
        bad = 0
        for c in range(n):
            bad += np.isnan(s[c])
            s[c] = s[c] + np.float32(0.0)  # -0.0 -> +0.0: ranks as torch's 0.0 tie
        if bad:  # NaN: torch decides
            return False
        bits = s.view(np.uint32)
        hist[:] = 0
        for c in range(n):  # order-preserving unsigned keys, histogram of their top 11 bits
            b = bits[c]
            key[c] = b ^ ((np.uint32(0) - (b >> np.uint32(31))) | np.uint32(0x80000000))  # stored as u32
            hist[key[c] >> np.uint32(21)] += 1
        above, top = 0, (1 << 11) - 1  # the bucket holding the budget-th largest
        while above + hist[top] < budget:
            above += hist[top]
            top -= 1
        cand = np.empty(hist[top], np.uint32)
        at = 0
        for c in range(n):
            if (key[c] >> np.uint32(21)) == top:
                cand[at] = key[c]
                at += 1
        pick = cand.shape[0] - (budget - above)
        cand = np.partition(cand, pick)
        kth = cand[pick]  # the budget-th largest key
        ties = budget - above - (cand.shape[0] - pick)  # rows equal to kth to take, lowest ids first
        for j in range(pick, cand.shape[0]):
            ties += cand[j] == kth
        at = 0
        for c in range(n):  # every row above kth, the first `ties` rows at it
            kc = key[c]
            if kc > kth:
                ids[h, at] = c
                at += 1
            elif kc == kth and ties > 0:
                ids[h, at] = c
                at += 1
                ties -= 1
    return True


def applies(logits: Tensor, n_kv_heads: int, budget: int) -> bool:
    """The compiled ranking takes these: fp32 CPU logits [H_q, N], H_kv dividing H_q, 0 < budget < N."""
    return (enabled and logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2
            and logits.shape[0] % n_kv_heads == 0 and 0 < budget < logits.shape[1])


def group_max_topk(logits: Tensor, n_kv_heads: int, budget: int) -> Tensor | None:
    """logits [H_q, N] fp32 CPU (see `applies`) -> ids [H_kv, budget] int64 of each KV head's
    `budget` rows of largest group-max logit, in no order; None where a score is NaN (rank
    through torch then)."""
    ids = torch.empty((n_kv_heads, budget), dtype=torch.int64)
    ok = _group_max_topk(logits.contiguous().numpy(), n_kv_heads, budget, ids.numpy())
    return ids if ok else None


def warm() -> None:
    """Compile (or load from numba's cache) the ranking."""
    _group_max_topk(np.arange(8, dtype=np.float32).reshape(2, 4), 1, 2, np.empty((1, 2), np.int64))

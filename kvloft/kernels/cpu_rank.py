"""Exact's CPU ranking, compiled (numba): each KV head's group max of the logits, then its top-k.

    s[h, n] = max_i logits[h * g + i, n]          logits [H_q, N] fp32 -> s [H_kv, N]
    ids[h]  = the `budget` largest s[h, :]        -> ids [H_kv, budget] int64, in no order

The torch route (index/exact.py: reference.reduce_group's amax, torch.topk) is two small ops a
layer, and under load each waits on torch's OpenMP threads; here both are one pass on the
caller's thread (the GIL released). The max is exact (no arithmetic), so the scores equal
torch's bit for bit; np.partition finds the budget-th largest score, then every score above it
is taken, and the ties at it in index order (torch.topk leaves which tied ids it takes
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
    for h in range(hkv):
        for c in range(n):
            m = logits[h * g, c]
            for i in range(1, g):
                v = logits[h * g + i, c]
                if v > m or v != v:  # NaN propagates, as in torch.amax
                    m = v
            if m != m:  # NaN: torch decides
                return False
            s[c] = m
        kth = np.partition(s.copy(), n - budget)[n - budget]  # the budget-th largest
        at = 0
        for c in range(n):
            if s[c] > kth:
                ids[h, at] = c
                at += 1
        for c in range(n):
            if at == budget:
                break
            if s[c] == kth:
                ids[h, at] = c
                at += 1
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

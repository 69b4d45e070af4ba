"""Numba search of the attention-aware graph (layout in kvloft/index/graph_kernels.py): the
beam search, the group search a decode step runs per KV head, and the similarity and
sorting helpers construction shares with them. Same compile rules as graph_kernels.py:
`@njit(nogil=True, cache=False)`, plain loops, no CPython wrapper on helpers only compiled
code calls."""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["beam_search", "dot", "search_group", "sim", "sort_desc"]


@njit(nogil=True, cache=False, no_cpython_wrapper=True, fastmath=True)
def dot(a, b):
    s = np.float32(0.0)
    for d in range(a.shape[0]):
        s += a[d] * b[d]
    return s


@njit(nogil=True, cache=False, no_cpython_wrapper=True, fastmath=True)
def sim(a, b, l2):
    """<a, b>, or -|a - b|^2 when l2."""
    s = np.float32(0.0)
    if l2:
        for d in range(a.shape[0]):
            x = a[d] - b[d]
            s -= x * x
    else:
        for d in range(a.shape[0]):
            s += a[d] * b[d]
    return s


@njit(nogil=True, cache=False, no_cpython_wrapper=True)
def _sift(sc, ids, root, n):
    """Heap sift for _sort_desc; 'later' = lower score, then higher id."""
    while True:
        c = 2 * root + 1
        if c >= n:
            return
        if c + 1 < n and (sc[c + 1] < sc[c] or (sc[c + 1] == sc[c] and ids[c + 1] > ids[c])):
            c += 1
        if not (sc[c] < sc[root] or (sc[c] == sc[root] and ids[c] > ids[root])):
            return
        sc[root], sc[c] = sc[c], sc[root]
        ids[root], ids[c] = ids[c], ids[root]
        root = c


@njit(nogil=True, cache=False, no_cpython_wrapper=True)
def sort_desc(sc, ids, n):
    """In-place heapsort of (sc[:n], ids[:n]) by score descending, id ascending (so equal
    ids are adjacent)."""
    for start in range(n // 2 - 1, -1, -1):
        _sift(sc, ids, start, n)
    root = n - n  # a typed 0 (a literal would compile _sift a second time)
    for end in range(n - 1, 0, -1):
        sc[0], sc[end] = sc[end], sc[0]
        ids[0], ids[end] = ids[end], ids[0]
        _sift(sc, ids, root, end)


@njit(nogil=True, cache=False, no_cpython_wrapper=True)
def beam_search(keys, bias, adj, deg, entry, q, pool_size, stamp, tag):
    """Best-first search for max <q, k> + bias[k] (bias = 0: inner product; bias =
    -|k|^2 / 2: L2 nearest of q) with a pool of pool_size candidates. stamp [n] int32
    marks scored nodes with `tag` (> 0); searches sharing one stamp array with distinct
    tags count their union.

    Returns (pool ids [pool_size] int32, scores [pool_size] float32 descending, filled
    size, keys scored, keys scored that no earlier search on this stamp array scored).
    """
    pool_id = np.empty(pool_size, np.int32)
    pool_sc = np.empty(pool_size, np.float32)
    done = np.zeros(pool_size, np.bool_)
    fresh = 1 if stamp[entry] == 0 else 0
    stamp[entry] = tag
    pool_id[0] = entry
    pool_sc[0] = dot(q, keys[entry]) + bias[entry]
    size, scored, cur = 1, 1, 0
    while cur < size:
        if done[cur]:
            cur += 1
            continue
        done[cur] = True
        node = pool_id[cur]
        for j in range(deg[node]):
            v = adj[node, j]
            if stamp[v] == tag:
                continue
            fresh += stamp[v] == 0
            stamp[v] = tag
            scored += 1
            s = dot(q, keys[v]) + bias[v]
            if size == pool_size and s <= pool_sc[size - 1]:
                continue
            pos = size if size < pool_size else pool_size - 1  # insert, dropping the last
            while pos > 0 and pool_sc[pos - 1] < s:
                pool_id[pos] = pool_id[pos - 1]
                pool_sc[pos] = pool_sc[pos - 1]
                done[pos] = done[pos - 1]
                pos -= 1
            pool_id[pos], pool_sc[pos], done[pos] = v, s, False
            size = min(size + 1, pool_size)
            cur = min(cur, pos)
    return pool_id, pool_sc, size, scored, fresh


@njit(nogil=True, cache=False)
def search_group(keys, adj, deg, entry, qs, pool_size, k, use_mean, reduce_max):
    """Top-k keys of one KV head for its group's queries qs [g, D] (C-contiguous).

    One beam search per query (or one with the group's mean query); the pooled candidates
    are ranked by the group-reduced score (max or sum of <q_h, k> over the group).
    Returns (ids [k] int64, -1 padded; distinct keys scored; query-key products).
    """
    n = keys.shape[0]
    g, dim = qs.shape
    searches = np.zeros((1 if use_mean else g, dim), np.float32)
    for h in range(g):
        for d in range(dim):
            if use_mean:
                searches[0, d] += qs[h, d] / g
            else:
                searches[h, d] = qs[h, d]
    zero = np.zeros(n, np.float32)
    stamp = np.zeros(n, np.int32)
    taken = np.zeros(n, np.bool_)
    cand = np.empty(searches.shape[0] * pool_size, np.int32)
    nc, scanned, dots = 0, 0, 0
    for s in range(searches.shape[0]):
        ids, _, size, scored, fresh = beam_search(keys, zero, adj, deg, entry, searches[s], pool_size,
                                                   stamp, s + 1)
        dots += scored
        scanned += fresh
        for i in range(size):
            if not taken[ids[i]]:
                taken[ids[i]] = True
                cand[nc] = ids[i]
                nc += 1
    sc = np.empty(nc, np.float32)
    for i in range(nc):
        best = np.float32(-np.inf) if reduce_max else np.float32(0.0)
        for h in range(g):
            x = dot(qs[h], keys[cand[i]])
            best = max(best, x) if reduce_max else best + x
        sc[i] = best
    dots += nc * g
    sort_desc(sc, cand, nc)
    out = np.empty(k, np.int64)
    for i in range(k):
        out[i] = cand[i] if i < nc else -1
    return out, scanned, dots

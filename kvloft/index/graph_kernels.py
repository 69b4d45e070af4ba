"""Numba kernels of the attention-aware graph (kvloft/index/attention_graph.py).

Layout of one graph (one KV head of one layer): keys [n, D] float32, adj [n, M] int32
(-1 = free slot), deg [n] int32 (out-degree), bias [n] float32 added to <q, k> by a
search (0: inner product; -|k|^2 / 2: L2 nearest of q). Only rows < n are live.

Every function is `@njit(nogil=True, cache=False)`: callers run them from worker threads
that release the GIL. They use plain loops only: numba compiles np.argsort, np.unique and
slice assignments slowly (seconds each), and compile time is paid once per process.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["bfs", "connect", "insert", "project", "search_group"]


@njit(nogil=True, cache=False, fastmath=True)
def _dot(a, b):
    s = np.float32(0.0)
    for d in range(a.shape[0]):
        s += a[d] * b[d]
    return s


@njit(nogil=True, cache=False, fastmath=True)
def _sim(a, b, l2):
    """Key-to-key similarity: -|a - b|^2 (l2) or <a, b>."""
    if not l2:
        return _dot(a, b)
    s = np.float32(0.0)
    for d in range(a.shape[0]):
        x = a[d] - b[d]
        s += x * x
    return -s


@njit(nogil=True, cache=False)
def _pool_insert(pool_id, pool_sc, pool_done, size, node, score):
    """Insert into the descending pool; drops the last entry when full. Returns (pos, size)."""
    cap = pool_id.shape[0]
    if size == cap and score <= pool_sc[size - 1]:
        return cap, size
    pos = size if size < cap else cap - 1
    while pos > 0 and pool_sc[pos - 1] < score:
        pos -= 1
    end = size if size < cap else cap - 1
    for j in range(end, pos, -1):
        pool_id[j] = pool_id[j - 1]
        pool_sc[j] = pool_sc[j - 1]
        pool_done[j] = pool_done[j - 1]
    pool_id[pos] = node
    pool_sc[pos] = score
    pool_done[pos] = False
    return pos, min(size + 1, cap)


@njit(nogil=True, cache=False)
def _after(sa, ia, sb, ib):
    """Order of candidate lists: higher score first, then lower id (duplicates adjacent)."""
    return sa < sb or (sa == sb and ia > ib)


@njit(nogil=True, cache=False)
def _sift(sc, ids, root, n):
    while True:
        child = 2 * root + 1
        if child >= n:
            return
        if child + 1 < n and _after(sc[child + 1], ids[child + 1], sc[child], ids[child]):
            child += 1
        if not _after(sc[child], ids[child], sc[root], ids[root]):
            return
        sc[root], sc[child] = sc[child], sc[root]
        ids[root], ids[child] = ids[child], ids[root]
        root = child


@njit(nogil=True, cache=False)
def _sort_desc(sc, ids):
    """In-place heapsort of (sc, ids) by score descending, id ascending. A hand-written
    sort: numba's np.argsort/np.unique cost seconds of compile time each."""
    n = sc.shape[0]
    for start in range(n // 2 - 1, -1, -1):
        _sift(sc, ids, start, n)
    for end in range(n - 1, 0, -1):
        sc[0], sc[end] = sc[end], sc[0]
        ids[0], ids[end] = ids[end], ids[0]
        _sift(sc, ids, 0, end)


@njit(nogil=True, cache=False)
def _beam_search(keys, bias, adj, deg, entry, q, pool_size, stamp, tag):
    """Best-first search for max <q, k> + bias[k] (bias = 0: inner product; bias =
    -|k|^2 / 2: L2 nearest of q). stamp [n] int32 marks scored nodes with `tag` (> 0);
    searches sharing one stamp array with distinct tags count their union.

    Returns (pool ids [size] int32, pool scores [size] float32 descending, keys scored,
    keys scored that no earlier search of this stamp array had scored).
    """
    pool_id = np.empty(pool_size, np.int32)
    pool_sc = np.empty(pool_size, np.float32)
    pool_done = np.zeros(pool_size, np.bool_)
    fresh = 1 if stamp[entry] == 0 else 0
    stamp[entry] = tag
    pool_id[0] = entry
    pool_sc[0] = _dot(q, keys[entry]) + bias[entry]
    size = 1
    scored = 1
    cur = 0
    while cur < size:
        if pool_done[cur]:
            cur += 1
            continue
        pool_done[cur] = True
        node = pool_id[cur]
        lowest = size
        for j in range(deg[node]):
            v = adj[node, j]
            if stamp[v] == tag:
                continue
            if stamp[v] == 0:
                fresh += 1
            stamp[v] = tag
            scored += 1
            sc = _dot(q, keys[v]) + bias[v]
            pos, size = _pool_insert(pool_id, pool_sc, pool_done, size, v, sc)
            lowest = min(lowest, pos)
        cur = min(cur, lowest)
    return pool_id[:size], pool_sc[:size], scored, fresh


@njit(nogil=True, cache=False)
def _prune(keys, center, cand, cand_sc, max_degree, l2, fill, out):
    """Occlusion (RNG) pruning.

    cand [c] int32 sorted by cand_sc = sim(center, cand) descending, no duplicates.
    Keeps c unless a kept s has sim(s, c) > sim(center, c); with `fill`, tops the list
    up with the best occluded candidates. Writes up to max_degree ids to out; returns
    how many.
    """
    kept = 0
    for i in range(cand.shape[0]):
        c = cand[i]
        if c == center:
            continue
        occluded = False
        for j in range(kept):
            if _sim(keys[out[j]], keys[c], l2) > cand_sc[i]:
                occluded = True
                break
        if not occluded:
            out[kept] = c
            kept += 1
            if kept == max_degree:
                return kept
    if fill:
        for i in range(cand.shape[0]):
            if kept == max_degree:
                break
            c = cand[i]
            dup = c == center
            for j in range(kept):
                dup = dup or out[j] == c
            if not dup:
                out[kept] = c
                kept += 1
    return kept


@njit(nogil=True, cache=False)
def _set_pruned(keys, adj, deg, node, cand, l2, fill, cap):
    """adj[node] <- prune(cand), at most cap edges; cand [c] int32 may hold duplicates
    and node itself."""
    sc = np.empty(cand.shape[0], np.float32)
    ids = np.empty(cand.shape[0], np.int32)
    for i in range(ids.shape[0]):
        ids[i] = cand[i]
        sc[i] = _sim(keys[node], keys[ids[i]], l2)
    _sort_desc(sc, ids)
    m = 0
    for i in range(ids.shape[0]):  # drop node itself and duplicates (adjacent once sorted)
        if ids[i] != node and (m == 0 or ids[i] != ids[m - 1]):
            ids[m] = ids[i]
            sc[m] = sc[i]
            m += 1
    row = np.empty(adj.shape[1], np.int32)
    kept = _prune(keys, node, ids[:m], sc[:m], cap, l2, fill, row)
    for j in range(adj.shape[1]):  # (a slice assignment costs seconds of numba compile)
        adj[node, j] = row[j] if j < kept else -1
    deg[node] = kept


@njit(nogil=True, cache=False)
def project(keys, adj, deg, knn_ids, order, l2, fill):
    """Steps 2-3: pivot projection of the queries' kNN lists, then reverse edges.

    knn_ids [Mq, K] int32: each query's K nearest keys, nearest first; order [Mq]: the
    queries sorted by pivot (knn_ids[:, 0]).
    """
    mq, kk = knn_ids.shape
    i = 0
    while i < mq:
        pivot = knn_ids[order[i], 0]
        j = i
        while j < mq and knn_ids[order[j], 0] == pivot:
            j += 1
        cand = np.empty((j - i) * (kk - 1), np.int32)
        for r in range(i, j):
            for t in range(1, kk):
                cand[(r - i) * (kk - 1) + t - 1] = knn_ids[order[r], t]
        _set_pruned(keys, adj, deg, pivot, cand, l2, fill, adj.shape[1])
        i = j
    _add_reverse(keys, adj, deg, deg.shape[0], l2, fill)


@njit(nogil=True, cache=False)
def _add_reverse(keys, adj, deg, n, l2, fill):
    """Every edge u -> v offers v -> u; lists over max_degree are pruned again."""
    starts = np.zeros(n + 1, np.int64)
    for u in range(n):
        for j in range(deg[u]):
            starts[adj[u, j] + 1] += 1
    for v in range(n):
        starts[v + 1] += starts[v]
    rev = np.empty(starts[n], np.int32)
    fill_at = np.empty(n, np.int64)
    for v in range(n):
        fill_at[v] = starts[v]
    for u in range(n):
        for j in range(deg[u]):
            v = adj[u, j]
            rev[fill_at[v]] = u
            fill_at[v] += 1
    m = adj.shape[1]
    for v in range(n):
        nr = starts[v + 1] - starts[v]
        if nr == 0:
            continue
        if deg[v] + nr <= m:  # room for all: keep every edge
            for t in range(starts[v], starts[v + 1]):
                _append_unique(adj, deg, v, rev[t])
            continue
        cand = np.empty(deg[v] + nr, np.int32)
        for t in range(deg[v]):
            cand[t] = adj[v, t]
        for t in range(nr):
            cand[deg[v] + t] = rev[starts[v] + t]
        _set_pruned(keys, adj, deg, v, cand, l2, fill, m)


@njit(nogil=True, cache=False)
def _append_unique(adj, deg, v, c):
    """adj[v] += c unless present, v itself, or full. Returns True when c is in adj[v]."""
    for j in range(deg[v]):
        if adj[v, j] == c:
            return True
    if c == v or deg[v] >= adj.shape[1]:
        return False
    adj[v, deg[v]] = c
    deg[v] += 1
    return True


@njit(nogil=True, cache=False)
def bfs(adj, deg, start, reached, queue):
    """Marks in `reached` every node reachable from start (queue: scratch [n] int32)."""
    if reached[start]:
        return
    reached[start] = True
    queue[0] = start
    head, tail = 0, 1
    while head < tail:
        u = queue[head]
        head += 1
        for j in range(deg[u]):
            v = adj[u, j]
            if not reached[v]:
                reached[v] = True
                queue[tail] = v
                tail += 1


@njit(nogil=True, cache=False)
def _link_from(adj, deg, cand, target, reached):
    """Adds an edge to target from the first candidate with a free slot, else from any
    reached node with one (a linear scan, rare), else replaces the last edge of cand[0]
    (can orphan that edge's target: the caller checks reachability again)."""
    for i in range(cand.shape[0]):
        if cand[i] != target and _append_unique(adj, deg, cand[i], target):
            return
    for v in range(deg.shape[0]):
        if reached[v] and v != target and _append_unique(adj, deg, v, target):
            return
    adj[cand[0], adj.shape[1] - 1] = target


@njit(nogil=True, cache=False)
def _key_search(keys, bias, adj, deg, entry, u, ef, stamp, tag):
    """Neighbour candidates of key u among the linked keys: max <u, k> + bias[k] (the L2
    nearest when bias = -|k|^2 / 2)."""
    ids, _, _, _ = _beam_search(keys, bias, adj, deg, entry, keys[u], ef, stamp, tag)
    return ids


@njit(nogil=True, cache=False)
def connect(keys, bias, adj, deg, n, entry, ef, l2, fill):
    """Step 4: make every node reachable from entry. Attached nodes keep at most half the
    degree as out-edges, so free slots stay for later attachments. Returns the number of
    attachments."""
    reached = np.zeros(n, np.bool_)
    queue = np.empty(n, np.int32)
    stamp = np.zeros(n, np.int32)
    attached = 0
    while True:  # a forced replacement (no free slot anywhere) may orphan a node: recheck
        bfs(adj, deg, entry, reached, queue)
        missing = 0
        for u in range(n):
            if reached[u]:
                continue
            missing += 1
            attached += 1
            ids = _key_search(keys, bias, adj, deg, entry, u, ef, stamp, attached)
            _link_from(adj, deg, ids, u, reached)
            if deg[u] == 0:
                _set_pruned(keys, adj, deg, u, ids, l2, fill, max(1, adj.shape[1] // 2))
            bfs(adj, deg, u, reached, queue)
        if missing == 0 or attached > 4 * n:
            return attached
        for u in range(n):
            reached[u] = False


@njit(nogil=True, cache=False)
def insert(keys, bias, adj, deg, start, stop, entry, ef, l2, fill):
    """Links rows start..stop-1 (already in keys) one by one into the graph of rows < start."""
    stamp = np.zeros(stop, np.int32)
    reached = np.zeros(stop, np.bool_)
    for v in range(start):
        reached[v] = True
    m = adj.shape[1]
    for u in range(start, stop):
        reached[u] = True
        ids = _key_search(keys, bias, adj, deg, entry, u, ef, stamp, u - start + 1)
        _set_pruned(keys, adj, deg, u, ids, l2, fill, m)
        linked = False
        for j in range(deg[u]):
            v = adj[u, j]
            if _append_unique(adj, deg, v, u):
                linked = True
                continue
            cand = np.empty(deg[v] + 1, np.int32)
            for t in range(deg[v]):
                cand[t] = adj[v, t]
            cand[deg[v]] = u
            _set_pruned(keys, adj, deg, v, cand, l2, fill, m)
            for t in range(deg[v]):
                linked = linked or adj[v, t] == u
        if not linked:
            _link_from(adj, deg, ids, u, reached)


@njit(nogil=True, cache=False)
def search_group(keys, adj, deg, n, entry, qs, pool_size, k, use_mean, reduce_max):
    """Top-k keys of one KV head for its group's queries qs [g, D] (C-contiguous).

    Returns (ids [k] int64, -1 padded; distinct keys scored; query-key products).
    """
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
    nc = 0
    scanned = 0
    dots = 0
    for s in range(searches.shape[0]):
        ids, _, scored, fresh = _beam_search(
            keys, zero, adj, deg, entry, searches[s], pool_size, stamp, s + 1
        )
        dots += scored
        scanned += fresh
        for i in range(ids.shape[0]):
            if not taken[ids[i]]:
                taken[ids[i]] = True
                cand[nc] = ids[i]
                nc += 1
    sc = np.empty(nc, np.float32)
    for i in range(nc):  # re-rank the pooled candidates by the group-reduced score
        best = np.float32(-np.inf) if reduce_max else np.float32(0.0)
        for h in range(g):
            x = _dot(qs[h], keys[cand[i]])
            best = max(best, x) if reduce_max else best + x
        sc[i] = best
    dots += nc * g
    cand = cand[:nc]
    _sort_desc(sc, cand)
    out = np.empty(k, np.int64)
    for i in range(k):
        out[i] = cand[i] if i < nc else -1
    return out, scanned, dots

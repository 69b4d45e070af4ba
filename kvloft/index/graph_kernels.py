"""Numba kernels of the attention-aware graph (kvloft/index/attention_graph.py).

Layout of one graph (one KV head of one layer): keys [n, D] float32, adj [n, M] int32
(-1 = free slot), deg [n] int32 (out-degree), bias [n] float32 added to <q, k> by a
search (0: inner product; -|k|^2 / 2: L2 nearest of q), parent [n] int32: a spanning
tree from the entry (-1: none yet). Only rows < n are live.

Reachability invariant: after `build_graph` (or each `extend_graph`), parent[w] = v implies w in adj[v], and every
edit keeps tree edges (pruning keeps a node's tree children; a forced link gives up a
non-tree edge). So every key stays reachable from the entry through inserts, and a search
whose pool holds all n keys scores every key: it is exact.

Every function is `@njit(nogil=True, cache=False)`: callers run them from worker threads
that release the GIL. Compile time is paid once per process, so the code keeps it low:
plain loops (numba compiles np.argsort, np.unique or a slice assignment in seconds each),
one signature per helper (node ids passed as int64, candidate lists as a full int32 array
plus a count), and no CPython wrapper on helpers only compiled code calls.

Here: construction (build, extend, insert) and the reachability walk. The search and the
helpers it shares with construction are in graph_search.py (search_group re-exported here).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from kvloft.index.graph_search import beam_search, search_group, sim, sort_desc

__all__ = ["bfs", "build_graph", "extend_graph", "insert", "search_group"]


@njit(nogil=True, cache=False, no_cpython_wrapper=True)
def _set_pruned(keys, adj, deg, parent, node, cand, nc, l2, fill, cap):
    """adj[node] <- its tree children (always kept) + occlusion-pruned cand[:nc].

    Candidates are sorted by sim(node, c); c is kept unless a kept s has
    sim(s, c) > sim(node, c) (the RNG rule); with `fill`, the list is topped up with the
    best occluded candidates. At most max(cap, tree children) edges. cand may hold
    duplicates and node itself.
    """
    row = np.empty(adj.shape[1], np.int32)
    kept = 0
    for j in range(deg[node]):
        w = adj[node, j]
        if parent[w] == node:
            row[kept] = w
            kept += 1
    cap = max(cap, kept)
    sc = np.empty(nc, np.float32)
    ids = np.empty(nc, np.int32)
    for i in range(nc):
        ids[i] = cand[i]
        sc[i] = sim(keys[node], keys[cand[i]], l2)
    sort_desc(sc, ids, nc)
    m = 0
    for i in range(nc):  # drop node itself and duplicates (adjacent once sorted)
        if ids[i] != node and (m == 0 or ids[i] != ids[m - 1]):
            ids[m], sc[m] = ids[i], sc[i]
            m += 1
    for i in range(m):
        if kept >= cap:
            break
        occluded = False
        for j in range(kept):
            if row[j] == ids[i] or sim(keys[row[j]], keys[ids[i]], l2) > sc[i]:
                occluded = True
                break
        if not occluded:
            row[kept] = ids[i]
            kept += 1
    for i in range(m):
        if not fill or kept >= cap:
            break
        dup = False
        for j in range(kept):
            dup = dup or row[j] == ids[i]
        if not dup:
            row[kept] = ids[i]
            kept += 1
    for j in range(adj.shape[1]):  # (a slice assignment costs seconds of numba compile)
        adj[node, j] = row[j] if j < kept else -1
    deg[node] = kept


@njit(nogil=True, cache=False, no_cpython_wrapper=True)
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


@njit(nogil=True, cache=False, no_cpython_wrapper=True)
def _pool_knn(knn_ids, order, i, j, stamp, turn, cand, nc):
    """Append to cand[nc:] the other kNN keys (columns 1..) of queries order[i:j], each key
    once per pivot turn (stamp[c] == turn: already in); returns the new count."""
    for r in range(i, j):
        for t in range(1, knn_ids.shape[1]):
            c = knn_ids[order[r], t]
            if stamp[c] != turn:
                stamp[c] = turn
                cand[nc] = c
                nc += 1
    return nc


@njit(nogil=True, cache=False, no_cpython_wrapper=True)
def _pivot_run_end(knn_ids, order, i):
    """End (exclusive) of the run of queries order[i..] whose nearest key is knn_ids[order[i], 0]."""
    mq = knn_ids.shape[0]
    pivot = knn_ids[order[i], 0]
    j = i
    while j < mq and knn_ids[order[j], 0] == pivot:
        j += 1
    return j


@njit(nogil=True, cache=False, no_cpython_wrapper=True)
def _project(keys, adj, deg, parent, knn_ids, order, l2, fill):
    """Pivot projection: the queries whose nearest key is p pool their other kNN keys as
    p's candidates. knn_ids [Mq, K] int32 nearest first; order [Mq]: queries by pivot."""
    mq, kk = knn_ids.shape
    # A pivot shared by many queries (a sink-like key is the top-1 of thousands) gets the same
    # candidates many times over; each is kept once (stamp = pivot's turn), so _set_pruned
    # scores and sorts at most n distinct keys instead of (queries x knn) entries. The
    # result is the same: _set_pruned drops duplicates after sorting anyway.
    stamp = np.zeros(keys.shape[0], np.int32)
    turn = 0
    i = 0
    while i < mq:
        pivot = np.int64(knn_ids[order[i], 0])
        j = _pivot_run_end(knn_ids, order, i)
        turn += 1
        cand = np.empty(min((j - i) * (kk - 1), keys.shape[0]), np.int32)
        nc = 0
        nc = _pool_knn(knn_ids, order, i, j, stamp, turn, cand, nc)
        _set_pruned(keys, adj, deg, parent, pivot, cand, nc, l2, fill, adj.shape[1])
        i = j


@njit(nogil=True, cache=False, no_cpython_wrapper=True)
def _add_reverse(keys, adj, deg, parent, l2, fill):
    """Every edge u -> v offers v -> u; lists over max_degree are pruned again."""
    n = adj.shape[0]
    ne = 0
    for u in range(n):
        ne += deg[u]
    src = np.empty(ne, np.int32)
    dst = np.empty(ne, np.int32)
    e = 0
    for u in range(n):
        for j in range(deg[u]):
            src[e], dst[e] = u, adj[u, j]
            e += 1
    _offer_reverse(keys, adj, deg, parent, src, dst, ne, l2, fill)


@njit(nogil=True, cache=False, no_cpython_wrapper=True)
def _offer_reverse(keys, adj, deg, parent, src, dst, ne, l2, fill):
    """Each edge src[i] -> dst[i] (i < ne) offers dst -> src, all at once: a node with room
    for every offer keeps them; a node that would pass max_degree is pruned once over its
    edges and its offers together (one prune per node, not one per offer)."""
    n, m = adj.shape
    starts = np.zeros(n + 1, np.int64)  # CSR of the offers by receiving node
    for i in range(ne):
        starts[dst[i] + 1] += 1
    for v in range(n):
        starts[v + 1] += starts[v]
    rev = np.empty(ne, np.int32)
    at = np.empty(n, np.int64)
    for v in range(n):
        at[v] = starts[v]
    for i in range(ne):
        v = dst[i]
        rev[at[v]] = src[i]
        at[v] += 1
    for v in range(n):
        nr = starts[v + 1] - starts[v]
        if nr == 0:
            continue
        if deg[v] + nr <= m:  # room for all: keep every edge
            for t in range(starts[v], starts[v + 1]):
                _append_unique(adj, deg, v, np.int64(rev[t]))
            continue
        cand = np.empty(deg[v] + nr, np.int32)
        for t in range(deg[v]):
            cand[t] = adj[v, t]
        for t in range(nr):
            cand[deg[v] + t] = rev[starts[v] + t]
        _set_pruned(keys, adj, deg, parent, np.int64(v), cand, cand.shape[0], l2, fill, m)


@njit(nogil=True, cache=False)
def bfs(adj, deg, start, reached, queue, parent):
    """Marks in `reached` every node reachable from start (queue: scratch [n] int32); a
    node reached for the first time with no parent gets its BFS predecessor."""
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
                if parent[v] < 0:
                    parent[v] = u
                queue[tail] = v
                tail += 1


@njit(nogil=True, cache=False, no_cpython_wrapper=True)
def _take_slot(adj, deg, parent, c, target, free_only):
    """c -> target into a free slot of c, else (unless free_only) over c's last non-tree
    edge: safe, every node keeps its tree path. Makes c target's tree parent."""
    if deg[c] < adj.shape[1] or free_only:
        if not _append_unique(adj, deg, c, target):
            return False
        parent[target] = c
        return True
    for j in range(deg[c] - 1, -1, -1):
        if parent[adj[c, j]] != c:
            adj[c, j] = target
            parent[target] = c
            return True
    return False


@njit(nogil=True, cache=False, no_cpython_wrapper=True)
def _link_from(adj, deg, parent, cand, nc, target, reached):
    """Links target from a reached node: the first of cand[:nc] with a free slot, else one
    with a non-tree edge to give up, else any reached node (a scan; one exists, since a
    tree has leaves and leaves have no tree children)."""
    free_only = True
    for _ in range(2):
        for i in range(nc):
            c = np.int64(cand[i])
            if c != target and reached[c] and _take_slot(adj, deg, parent, c, target, free_only):
                return
        free_only = False
    for c in range(deg.shape[0]):
        if c != target and reached[c] and _take_slot(adj, deg, parent, np.int64(c), target, free_only):
            return


@njit(nogil=True, cache=False)
def build_graph(keys, bias, adj, deg, parent, knn_ids, order, entry, ef, l2, fill):
    """The graph of one KV head from its keys and its queries' kNN lists (all rows live).

    1. projection (_project) and reverse edges (_add_reverse);
    2. connectivity (_connect). Returns the number of attached keys.
    """
    if knn_ids.shape[0] > 0 and knn_ids.shape[1] > 1:
        _project(keys, adj, deg, parent, knn_ids, order, l2, fill)
        _add_reverse(keys, adj, deg, parent, l2, fill)
    return _connect(keys, bias, adj, deg, parent, entry, ef, l2, fill, 0)


@njit(nogil=True, cache=False, no_cpython_wrapper=True)
def _swap_in(keys, adj, deg, parent, v, u, l2):
    """v -> u into a free slot of v, else over v's farthest non-tree edge when u is closer
    (no prune: one pass over v's edges)."""
    if _append_unique(adj, deg, v, u):
        return
    s = sim(keys[v], keys[u], l2)
    worst, at = s, -1
    for j in range(deg[v]):
        w = adj[v, j]
        if w == u:
            return
        if parent[w] != v:
            sw = sim(keys[v], keys[w], l2)
            if sw < worst:
                worst, at = sw, j
    if at >= 0:
        adj[v, at] = u


@njit(nogil=True, cache=False, no_cpython_wrapper=True)
def _connect(keys, bias, adj, deg, parent, entry, ef, l2, fill, offer):
    """A BFS from entry records a spanning tree; each unreached key is looked up by a greedy
    L2/IP search (pool ef) among the reached keys, linked from the best candidate with a
    free slot (it becomes its tree parent) and, when it had no out-edges, given at most half
    the degree from that search (free slots stay for later links); a BFS from it then marks
    what it reaches. offer > 0 (a growing graph): each such key's nearest `offer` out-
    neighbours then link back to it (_swap_in: a free slot or the farthest non-tree edge,
    no prune; with full prunes the graph work grew ~40% at 16K keys for the same recall).
    Returns the number of attached keys."""
    n = keys.shape[0]
    reached = np.zeros(n, np.bool_)
    queue = np.empty(n, np.int32)
    stamp = np.zeros(n, np.int32)
    attached = 0
    bfs(adj, deg, entry, reached, queue, parent)
    src = np.empty(n * min(offer, adj.shape[1]), np.int32)  # the offers, made once all are attached
    dst = np.empty_like(src)
    ne = 0
    for u in range(n):
        if reached[u]:
            continue
        attached += 1
        ids, _, size, _, _ = beam_search(keys, bias, adj, deg, entry, keys[u], ef, stamp, attached)
        _link_from(adj, deg, parent, ids, size, np.int64(u), reached)
        if deg[u] == 0:
            _set_pruned(keys, adj, deg, parent, np.int64(u), ids, size, l2, fill, max(1, adj.shape[1] // 2))
            for j in range(min(deg[u], offer)):
                src[ne], dst[ne] = u, adj[u, j]
                ne += 1
        bfs(adj, deg, u, reached, queue, parent)
    for i in range(ne):
        _swap_in(keys, adj, deg, parent, np.int64(dst[i]), np.int64(src[i]), l2)
    return attached


@njit(nogil=True, cache=False)
def extend_graph(keys, bias, adj, deg, parent, knn_ids, order, entry, ef, l2, fill, offer):
    """The build's steps over a graph that grows: rows appended since the last call have no
    edges yet; knn_ids [Mq, K] int32 are the kNN lists (over every row) of the queries that
    arrived with them (order [Mq]: queries by pivot).

    1. projection merged with the pivots' current edges (_project_merge), the new edges'
       reverse offers in one batch (_offer_reverse);
    2. connectivity (_connect): the new rows no query linked are attached as the build
       attaches its cold keys, each linked back from its nearest `offer` out-neighbours
       (later queries link a row only if they come after it: these are its other ways in).
    Tree edges are kept by every prune, so every row stays reachable. Returns the number of
    attached keys.
    """
    if knn_ids.shape[0] > 0 and knn_ids.shape[1] > 1:
        src, dst, ne = _project_merge(keys, adj, deg, parent, knn_ids, order, l2, fill)
        _offer_reverse(keys, adj, deg, parent, src, dst, ne, l2, fill)
    return _connect(keys, bias, adj, deg, parent, entry, ef, l2, fill, offer)


@njit(nogil=True, cache=False, no_cpython_wrapper=True)
def _project_merge(keys, adj, deg, parent, knn_ids, order, l2, fill):
    """_project for a graph that has edges: each pivot's candidates are its queries' other
    kNN keys and its current edges, pruned together. Returns the edges p -> c that are new
    (src [E], dst [E] int32, count) for _offer_reverse."""
    mq, kk = knn_ids.shape
    m = adj.shape[1]
    stamp = np.zeros(keys.shape[0], np.int32)  # as in _project: each candidate once per pivot
    src = np.empty(mq * m, np.int32)  # at most m new edges per pivot, at most mq pivots
    dst = np.empty(mq * m, np.int32)
    ne, turn, i = 0, 0, 0
    while i < mq:
        pivot = np.int64(knn_ids[order[i], 0])
        j = _pivot_run_end(knn_ids, order, i)
        turn += 1
        cand = np.empty(min((j - i) * (kk - 1), keys.shape[0]) + m, np.int32)
        nc = 0
        for t in range(deg[pivot]):
            stamp[adj[pivot, t]] = turn
            cand[nc] = adj[pivot, t]
            nc += 1
        old = nc
        nc = _pool_knn(knn_ids, order, i, j, stamp, turn, cand, nc)
        if nc > old:
            _set_pruned(keys, adj, deg, parent, pivot, cand, nc, l2, fill, m)
            for t in range(deg[pivot]):
                c = adj[pivot, t]
                new = True
                for s in range(old):
                    new = new and cand[s] != c
                for s in range(deg[c]):  # c -> pivot already there: nothing to offer
                    new = new and adj[c, s] != pivot
                if new:
                    src[ne], dst[ne] = pivot, c
                    ne += 1
        i = j
    return src, dst, ne


@njit(nogil=True, cache=False)
def insert(keys, bias, adj, deg, parent, start, stop, entry, ef, l2, fill):
    """Links rows start..stop-1 (already in keys) one by one into the graph of rows < start:
    pruned out-edges from a greedy search (pool ef), a reverse edge from each neighbour
    (its list re-pruned when full), and a tree parent so the row stays reachable."""
    stamp = np.zeros(stop, np.int32)
    reached = np.zeros(stop, np.bool_)
    for v in range(start):
        reached[v] = True
    m = adj.shape[1]
    for u in range(start, stop):
        ids, _, size, _, _ = beam_search(keys, bias, adj, deg, entry, keys[u], ef, stamp, u - start + 1)
        _set_pruned(keys, adj, deg, parent, np.int64(u), ids, size, l2, fill, m)
        for j in range(deg[u]):
            v = np.int64(adj[u, j])
            if not _append_unique(adj, deg, v, np.int64(u)):
                cand = np.empty(deg[v] + 1, np.int32)
                for t in range(deg[v]):
                    cand[t] = adj[v, t]
                cand[deg[v]] = u
                _set_pruned(keys, adj, deg, parent, v, cand, cand.shape[0], l2, fill, m)
            for t in range(deg[v]):
                if adj[v, t] == u and parent[u] < 0:
                    parent[u] = v
        if parent[u] < 0:
            _link_from(adj, deg, parent, ids, size, np.int64(u), reached)
        reached[u] = True

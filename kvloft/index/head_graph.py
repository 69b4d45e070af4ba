"""One attention-aware graph per (layer, KV head) and the exact kNN its build starts from
(kvloft/index/attention_graph.py holds the method's description; graph_kernels.py the loops)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from kvloft.index import graph_kernels as gk
from kvloft.index import graph_search

__all__ = ["HeadGraph", "exact_knn"]


class HeadGraph:
    """The graph of one KV head (layout in graph_kernels): keys [cap, D] float32,
    adj [cap, M] int32, deg [cap] int32, bias [cap] float32, parent [cap] int32."""

    def __init__(self, dim: int, max_degree: int, l2: bool, fill: bool, capacity: int = 1024) -> None:
        self.keys = np.zeros((capacity, dim), np.float32)
        self.adj = np.full((capacity, max_degree), -1, np.int32)
        self.deg = np.zeros(capacity, np.int32)
        self.bias = np.zeros(capacity, np.float32)
        self.parent = np.full(capacity, -1, np.int32)
        self.l2, self.fill = l2, fill
        self.n = 0
        self.entry = 0

    def _reserve(self, n: int) -> None:
        cap = self.keys.shape[0]
        if n <= cap:
            return
        new = max(n, 2 * cap)  # amortized growth: the index copy, not the host tier
        keys = np.zeros((new, self.keys.shape[1]), np.float32)
        adj = np.full((new, self.adj.shape[1]), -1, np.int32)
        deg = np.zeros(new, np.int32)
        bias = np.zeros(new, np.float32)
        parent = np.full(new, -1, np.int32)
        keys[:cap], adj[:cap], deg[:cap], bias[:cap], parent[:cap] = (
            self.keys, self.adj, self.deg, self.bias, self.parent)
        self.keys, self.adj, self.deg, self.bias, self.parent = keys, adj, deg, bias, parent

    def _put_keys(self, start: int, keys: np.ndarray) -> None:
        stop = start + keys.shape[0]
        self._reserve(stop)
        self.keys[start:stop] = keys
        if self.l2:
            self.bias[start:stop] = -0.5 * (keys.astype(np.float32) ** 2).sum(axis=1)
        self.n = stop

    def _views(self, n: int):
        return self.keys[:n], self.bias[:n], self.adj[:n], self.deg[:n], self.parent[:n]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.keys, self.adj, self.deg, self.bias, self.parent))

    def build(self, keys: np.ndarray, knn_ids: np.ndarray, ef_connect: int, entry: int = -1) -> int:
        """keys [N, D] float32; knn_ids [Mq, K] int32 (nearest first); entry: the search
        start (-1: the key nearest the centroid). Returns the number of attached keys."""
        self.n = 0
        self.adj[:] = -1
        self.deg[:] = 0
        self.parent[:] = -1
        self._put_keys(0, keys)
        n = self.n
        if n == 0:
            return 0
        self.entry = entry if entry >= 0 else _central(keys)
        k, b, adj, deg, parent = self._views(n)
        knn_ids = np.ascontiguousarray(knn_ids, np.int32).reshape(-1, max(1, knn_ids.shape[-1]))
        order = np.argsort(knn_ids[:, 0], kind="stable")  # queries grouped by pivot
        return int(gk.build_graph(k, b, adj, deg, parent, knn_ids, order, self.entry, ef_connect,
                                  self.l2, self.fill))

    def insert(self, keys: np.ndarray, ef_insert: int) -> None:
        """keys [n, D] float32 appended and linked."""
        start = self.n
        self._put_keys(start, keys)
        if start == 0:  # empty graph: the first key is the entry (the tree's root)
            self.entry = 0
            start = 1
        if start < self.n:
            k, b, adj, deg, parent = self._views(self.n)
            gk.insert(k, b, adj, deg, parent, start, self.n, self.entry, ef_insert, self.l2, self.fill)

    def put(self, keys: np.ndarray) -> None:
        """keys [n, D] float32 appended as the next rows, not linked yet (extend() links them)."""
        start = self.n
        self._put_keys(start, keys)
        if start == 0 and self.n:
            self.entry = _central(keys)

    def extend(self, knn_ids: np.ndarray, ef_connect: int, attach_reverse: int) -> int:
        """Links the rows put() since the last call as build() links its keys: knn_ids [Mq, K]
        int32 (nearest first, over every row) of the queries that came with them project onto
        their pivots' current edges, then the rows no query reached are attached, each linked
        back from its nearest `attach_reverse` out-neighbours. Returns the number of attached rows."""
        if self.n == 0:
            return 0
        k, b, adj, deg, parent = self._views(self.n)
        knn_ids = np.ascontiguousarray(knn_ids, np.int32).reshape(-1, max(1, knn_ids.shape[-1]))
        order = np.argsort(knn_ids[:, 0], kind="stable")  # queries grouped by pivot
        return int(gk.extend_graph(k, b, adj, deg, parent, knn_ids, order, self.entry, ef_connect,
                                   self.l2, self.fill, attach_reverse))

    def search(self, qs: np.ndarray, k: int, pool_size: int, use_mean: bool, reduce_max: bool):
        """qs [g, D] float32 C-contiguous -> (ids [k] int64, scanned, dots)."""
        if self.n == 0 or k == 0:
            return np.full(k, -1, np.int64), 0, 0
        keys, _, adj, deg, _ = self._views(self.n)
        return graph_search.search_group(keys, adj, deg, self.entry, qs, pool_size, k, use_mean, reduce_max)

    def reachable(self) -> int:
        """Nodes reachable from the entry (== n after build/insert)."""
        if self.n == 0:
            return 0
        reached = np.zeros(self.n, np.bool_)
        scratch = np.full(self.n, -1, np.int32)
        gk.bfs(self.adj[: self.n], self.deg[: self.n], self.entry, reached, np.empty(self.n, np.int32), scratch)
        return int(reached.sum())


def exact_knn(queries: Tensor, keys: Tensor, k: int, chunk: int) -> np.ndarray:
    """Top-k keys by inner product of each query, on the tensors' device (the GPU when the
    retriever lives there): queries [M, D], keys [N, D] -> [M, min(k, N)] int32 (CPU)."""
    k = min(k, keys.shape[0])
    out = np.empty((queries.shape[0], k), np.int32)
    kt = keys.float().T.contiguous()  # [D, N]
    chunk = max(1, min(chunk, (1 << 26) // max(1, keys.shape[0])))  # logits block <= 256 MiB
    for s in range(0, queries.shape[0], chunk):
        logits = queries[s : s + chunk].float() @ kt  # [c, N]: c * N * 4 bytes
        out[s : s + chunk] = torch.topk(logits, k, dim=1).indices.cpu().numpy()
    return out


def _central(keys: np.ndarray) -> int:
    """The row of keys [n, D] nearest their centroid (the search entry)."""
    centroid = keys.mean(axis=0)
    return int(np.argmin(((keys - centroid) ** 2).sum(axis=1)))

"""RetrievalAttention's attention-aware graph index (arXiv 2409.10516; RoarGraph, VLDB 2024).

Why: decode queries and keys come from different distributions, so an ANN graph built
on keys alone routes a query poorly and must score a large part of the keys to find its
top keys. Building the graph with the help of prefill queries links the keys that the
same query likes, so a beam search reaches a query's top keys scoring a few percent.

Build, per layer and per KV head, from keys [N, D] and the prefill queries of the head's
GQA group (query head h reads KV head h // group, all its heads' queries pooled):
  1. exact kNN (`knn` keys, inner product) of every query: chunked torch matmul + topk,
     on the retriever's device.
  2. projection: the queries whose nearest key is the same key p (the pivot) pool their
     other kNN keys; p links to them, pruned by occlusion (RNG rule: c is dropped when a
     kept s is closer to c than p is) to at most `max_degree` edges, topped up with the
     nearest occluded ones (`fill`).
  3. reverse edges: every edge p -> c offers c -> p; lists over `max_degree` are pruned
     again by the same rule.
  4. connectivity: the entry is the key nearest the key centroid; a BFS from it records a
     spanning tree; every unreached key is looked up by a greedy search among the reached
     keys, linked from the best candidate with a free slot (its tree parent) and, if it had
     no out-edges, given up to max_degree / 2 from that search.
Key-to-key closeness (pruning, attach and insert searches) is L2 by default
(`key_metric`): keys share a large common offset that dominates inner products between
keys but cancels in L2, and a key's L2 neighbours score alike for any query
(|<q, a> - <q, b>| <= |q| |a - b|). On the OOD synthetic data (N = 20K, 10K prefill
queries, top-100, L = 100) L2 pruning with fill reached recall 0.91 at 5.6% scanned;
inner-product pruning with fill 0.89 at 5.7%, without fill 0.83 at 5.3% (L2 without fill:
0.74 at 2.9%, 0.83 at 4.6%).
Tree edges are never pruned later, so every key stays reachable through inserts, and a
search whose pool holds all N keys scores all of them: it is exact.
Without prefill queries (`build(..., queries=None)`), the keys themselves (or a seeded
sample of `fallback_queries` of them) act as queries: a kNN graph on keys alone, with the
OOD weakness described above. It is the fallback, not the method.

Search: best-first beam search from the entry with a pool of L = max(k, ef or
ef_scale * k) candidates, scoring <q, k>. GQA: `gqa_search="heads"` (default) runs one
search per query head of the group, pools their candidates and ranks them by the
group-reduced score (RetrievalConfig.gqa_reduce, as ExactRetriever does); "mean" runs
one search with the group's mean query and re-ranks its pool the same way. Measured on
SmolLM2 traces (groups of 3, 3.5K host keys, top-100; docs/index_recall.md): "heads" at
L = 100 has recall 0.95-0.96 scanning 35-41% of the keys; "mean" needs L = 500 (52-54%
scanned) for 0.91-0.94, so "heads" is the default.
`scanned` counts distinct keys whose score was computed, summed over KV heads (keys
scored by several searches of one group count once; `stats()["dots"]` counts every
query-key product).

Insert (`add`, tokens leaving the window): a greedy L2 search finds the new key's
neighbours; it gets pruned out-edges, each neighbour a reverse edge (its list re-pruned
when full, tree edges kept), and a tree parent (a neighbour that kept the edge, else the
best candidate with a free slot or a non-tree edge to give up), so it stays reachable.

The hot loops are numba kernels (kvloft/index/graph_kernels.py, `nogil`); KV heads are
built and searched in a thread pool. `cpu_partial_attention` attends to retrieved rows
straight from the host tier.
"""

from __future__ import annotations

import math
import os
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kvloft.config import ModelConfig, RetrievalConfig
from kvloft.index import graph_kernels as gk
from kvloft.index.base import RetrieverStats, Selection, check_select, params_from_options, register
from kvloft.tiers.chunked import ChunkedRows

__all__ = ["AttentionGraphRetriever", "GraphParams", "HeadGraph", "cpu_partial_attention"]


@dataclass(frozen=True)
class GraphParams:
    """Parameters of the attention-aware graph (RetrievalConfig.options, same names).

    max_degree: M, out-edges per key (paper: 32).
    knn: keys per prefill query used for the projection (paper: 100).
    ef: search pool size L; 0 -> ceil(ef_scale * k). L < k is raised to k.
    ef_scale: L as a multiple of the top-k (paper: L ~ 1.5-2x k).
    ef_connect: pool of the greedy searches that attach unreached keys at build time
        (only connectivity rides on them: kept small, the build does one per cold key).
    ef_insert: pool of the greedy search that finds an inserted key's neighbours.
    gqa_search: "heads" (one search per query head, candidates merged) or "mean".
    key_metric: "l2" (default) or "ip": closeness between keys for pruning and for the
        attach / insert searches (queries always score keys by inner product).
    fill: top pruned lists up to max_degree with the nearest occluded candidates.
    fallback_queries: without prefill queries, this many keys (seeded sample) act as
        queries; 0 = all keys.
    knn_chunk: query rows per matmul block of the exact kNN (fewer when the block of
        logits would pass 256 MiB).
    n_threads: worker threads for per-head search; 0 -> min(H_kv, cpu count).
    build_threads: worker threads for graph builds, which run in the background across
        layers and heads (a layer's first select/add waits for its own); 0 -> cpu count.
    seed: seed of the fallback sample.
    """

    max_degree: int = 32
    knn: int = 100
    ef: int = 0
    ef_scale: float = 1.5
    ef_connect: int = 16
    ef_insert: int = 64
    gqa_search: str = "heads"
    key_metric: str = "l2"
    fill: bool = True
    fallback_queries: int = 32768
    knn_chunk: int = 1024
    n_threads: int = 0
    build_threads: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("max_degree", "knn", "ef_connect", "ef_insert", "knn_chunk"):
            _check_int(name, getattr(self, name), 1)
        for name in ("ef", "fallback_queries", "n_threads", "build_threads", "seed"):
            _check_int(name, getattr(self, name), 0)
        if self.max_degree < 2:
            raise ValueError(f"max_degree must be >= 2, got {self.max_degree}")
        if isinstance(self.ef_scale, bool) or not isinstance(self.ef_scale, (int, float)):
            raise TypeError(f"ef_scale must be a number, got {self.ef_scale!r}")
        if not self.ef_scale >= 1.0:
            raise ValueError(f"ef_scale must be >= 1 (the pool holds at least k), got {self.ef_scale}")
        if self.key_metric not in ("l2", "ip"):
            raise ValueError(f"key_metric must be 'l2' or 'ip', got {self.key_metric!r}")
        if not isinstance(self.fill, bool):
            raise TypeError(f"fill must be a bool, got {self.fill!r}")
        if self.gqa_search not in ("heads", "mean"):
            raise ValueError(f"gqa_search must be 'heads' or 'mean', got {self.gqa_search!r}")

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> GraphParams:
        return params_from_options(cls, options, "attention_graph")

    def pool_size(self, k: int) -> int:
        """L for a top-k search."""
        base = self.ef if self.ef > 0 else math.ceil(self.ef_scale * k)
        return max(k, base)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


# ----------------------------------------------------------------------------------------
# one graph per (layer, KV head)
# ----------------------------------------------------------------------------------------


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
        if entry < 0:
            centroid = keys.mean(axis=0)
            entry = int(np.argmin(((keys - centroid) ** 2).sum(axis=1)))
        self.entry = entry
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

    def project(self, knn_ids: np.ndarray) -> None:
        """Query-guided edges of one chunk of queries: knn_ids [Mq, K] int32 over rows < n."""
        if self.n == 0 or knn_ids.shape[0] == 0 or knn_ids.shape[1] < 2:
            return
        k, _, adj, deg, parent = self._views(self.n)
        knn_ids = np.ascontiguousarray(knn_ids, np.int32)
        order = np.argsort(knn_ids[:, 0], kind="stable")
        gk.project_chunk(k, adj, deg, parent, knn_ids, order, self.l2, self.fill)

    def search(self, qs: np.ndarray, k: int, pool_size: int, use_mean: bool, reduce_max: bool):
        """qs [g, D] float32 C-contiguous -> (ids [k] int64, scanned, dots)."""
        if self.n == 0 or k == 0:
            return np.full(k, -1, np.int64), 0, 0
        keys, _, adj, deg, _ = self._views(self.n)
        return gk.search_group(keys, adj, deg, self.entry, qs, pool_size, k, use_mean, reduce_max)

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


# ----------------------------------------------------------------------------------------
# the retriever
# ----------------------------------------------------------------------------------------


@register("attention_graph")
class AttentionGraphRetriever:
    """Retriever protocol over one HeadGraph per (layer, KV head); see the module doc.

    The graphs and their key copies live in host memory (numpy, float32); the exact kNN
    of the build runs on `device`. select() is thread-safe across layers, not for
    concurrent add() and select() on the same layer.

    build() returns once the layer's kNN lists are computed (on the GPU where the retriever
    lives there; on a CPU retriever the kNN runs in the background too) and leaves the
    graph construction to a pool of `build_threads`: the runtime builds layer after layer,
    so every layer's and head's graph builds at once, and a layer's first select() or add()
    waits only for its own. stats()["build_s"] counts the time build() held the caller,
    stats()["build_wait_s"] the time select/add/state_dict later waited for a graph.
    """

    # On CUDA the runtime computes attention over the selected rows on the CPU next to the
    # host tier (cpu_partial_attention) and ships back only (out, lse), as the paper does.
    attend_on_host = True

    def __init__(self, cfg: RetrievalConfig, model_cfg: ModelConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.device = torch.device(device)
        self.params = GraphParams.from_options(dict(cfg.options))
        self._graphs: dict[int, list[HeadGraph]] = {}
        self._pending: dict[int, list[Future]] = {}  # layer -> its heads' background builds
        self._stats = RetrieverStats(extra={"dots": 0, "build_s": 0.0, "build_wait_s": 0.0, "attached": 0})
        n = self.params.n_threads or min(model_cfg.n_kv_heads, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(max_workers=max(1, n - 1), thread_name_prefix="kvloft-graph")
        self._parallel = n > 1
        nb = self.params.build_threads or os.cpu_count() or 1
        self._build_pool = ThreadPoolExecutor(max_workers=nb, thread_name_prefix="kvloft-graph-build")

    @property
    def graphs(self) -> dict[int, list[HeadGraph]]:
        """Every layer's graphs [H_kv], background builds finished."""
        self._wait_all()
        return self._graphs

    def _wait_all(self) -> None:
        for layer in list(self._pending):
            self._ready(layer)

    def _ready(self, layer: int) -> list[HeadGraph] | None:
        """The layer's graphs once its background builds are done (None: no such layer)."""
        jobs = self._pending.pop(layer, None)
        if jobs:
            t0 = time.perf_counter()
            self._stats.extra["attached"] += sum(j.result() for j in jobs)
            self._stats.extra["build_wait_s"] += time.perf_counter() - t0
        return self._graphs.get(layer)

    def _per_head(self, calls: list[tuple[Any, ...]]) -> list[Any]:
        """Runs calls [(fn, *args)], one per KV head: the first in this thread, the rest on
        the pool (the kernels release the GIL); a lone head never pays a thread hop."""
        if not self._parallel or len(calls) < 2:
            return [fn(*args) for fn, *args in calls]
        jobs = [self._pool.submit(fn, *args) for fn, *args in calls[1:]]
        first = calls[0][0](*calls[0][1:])
        return [first] + [j.result() for j in jobs]

    def _check(self, name: str, x: Any, heads: int) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        want = (heads, self.model_cfg.head_dim)
        if x.dim() != 3 or (x.shape[0], x.shape[2]) != want:
            raise ValueError(f"{name} must be [{want[0]}, N, {want[1]}], got {list(x.shape)}")

    def _new_graphs(self) -> list[HeadGraph]:
        d, m = self.model_cfg.head_dim, self.params.max_degree
        l2, fill = self.params.key_metric == "l2", self.params.fill
        return [HeadGraph(d, m, l2, fill) for _ in range(self.model_cfg.n_kv_heads)]

    def build(self, layer: int, keys: Tensor, queries: Tensor | None) -> None:
        """keys [H_kv, N, D]; queries [H_q, M, D] prefill sample, or None (kNN graph on keys)."""
        hkv, hq, d = self.model_cfg.n_kv_heads, self.model_cfg.n_heads, self.model_cfg.head_dim
        self._check("keys", keys, hkv)
        if queries is not None:
            self._check("queries", queries, hq)
        t0 = time.perf_counter()
        self._ready(layer)  # a rebuild replaces a graph only once its earlier build is done
        group = self.model_cfg.group_size
        graphs = self._new_graphs()
        jobs = []
        for h in range(hkv):
            k_h = keys[h].detach().to(self.device, torch.float32)  # [N, D]
            if queries is not None:  # the group's query heads pooled: [g * M, D]
                q_h = queries[h * group : (h + 1) * group].detach().reshape(-1, d).to(self.device)
            else:
                q_h = self._fallback_queries(k_h)
            if self.device.type == "cpu":  # the kNN is most of a CPU build: it goes to the pool too
                # (own copies: the caller's tensors may change once build() returns)
                jobs.append(self._build_pool.submit(self._build_head, graphs[h], k_h.clone(), q_h.float().clone()))
            else:
                knn = self._knn(k_h, q_h)
                k_np = np.ascontiguousarray(k_h.cpu().numpy())
                jobs.append(self._build_pool.submit(graphs[h].build, k_np, knn, self.params.ef_connect))
        self._graphs[layer] = graphs
        self._pending[layer] = jobs
        self._stats.extra["build_s"] += time.perf_counter() - t0

    def _knn(self, k_h: Tensor, q_h: Tensor) -> np.ndarray:
        """kNN lists [M, knn] int32 of the queries q_h [M, D] over keys k_h [N, D]."""
        if k_h.shape[0] and q_h.shape[0]:
            return exact_knn(q_h, k_h, self.params.knn, self.params.knn_chunk)
        return np.empty((0, 0), np.int32)

    def _build_head(self, graph: HeadGraph, k_h: Tensor, q_h: Tensor) -> int:
        knn = self._knn(k_h, q_h)
        return graph.build(np.ascontiguousarray(k_h.numpy()), knn, self.params.ef_connect)

    def _fallback_queries(self, keys: Tensor) -> Tensor:
        n, cap = keys.shape[0], self.params.fallback_queries
        if cap == 0 or n <= cap:
            return keys
        gen = torch.Generator().manual_seed(self.params.seed)
        return keys[torch.randperm(n, generator=gen)[:cap].to(keys.device)]

    def add(self, layer: int, keys: Tensor, positions: Tensor) -> None:
        """keys [H_kv, n, D] of tokens leaving the window, appended as the next host rows;
        positions [n] (unused: ids are host rows)."""
        self._check("keys", keys, self.model_cfg.n_kv_heads)
        if positions is not None and positions.numel() != keys.shape[1]:
            raise ValueError(f"positions must hold {keys.shape[1]} entries, got {positions.numel()}")
        graphs = self._ready(layer) or self._graphs.setdefault(layer, self._new_graphs())
        k = keys.detach().float().cpu().numpy()
        self._per_head([(g.insert, np.ascontiguousarray(k[h]), self.params.ef_insert)
                        for h, g in enumerate(graphs)])

    def extend(self, layer: int, keys: Tensor, queries: Tensor | None) -> None:
        """Incremental build, one prefill chunk at a time: keys [H_kv, n, D] of the rows the
        chunk moved to the host tier are inserted (as add() does), then the chunk's queries
        [H_q, m, D] (or None) link the keys they like, with their kNN over every row so far.
        Built this way from the first chunk on, the index is ready when prefill ends; search
        recall stays within a few points of build() on all keys and queries at once
        (tests/index/test_attention_graph.py). The runtime builds once after prefill today."""
        hkv, hq, d = self.model_cfg.n_kv_heads, self.model_cfg.n_heads, self.model_cfg.head_dim
        self._check("keys", keys, hkv)
        if queries is not None:
            self._check("queries", queries, hq)
        t0 = time.perf_counter()
        graphs = self._ready(layer) or self._graphs.setdefault(layer, self._new_graphs())
        k = keys.detach().float().cpu().numpy()
        self._per_head([(g.insert, np.ascontiguousarray(k[h]), self.params.ef_insert) for h, g in enumerate(graphs)])
        if queries is not None and queries.shape[1]:
            group = self.model_cfg.group_size
            for h, g in enumerate(graphs):
                q_h = queries[h * group : (h + 1) * group].detach().reshape(-1, d).to(self.device)
                g.project(self._knn(torch.from_numpy(g.keys[: g.n]).to(self.device), q_h))
        self._stats.extra["build_s"] += time.perf_counter() - t0

    def select(self, layer: int, q: Tensor, budget: int) -> Selection:
        """q [H_q, D] -> Selection(ids [H_kv, k] int64, k = min(budget, N); scanned =
        distinct keys scored, summed over KV heads)."""
        check_select(q, budget, self.model_cfg)
        hkv, hq, d = self.model_cfg.n_kv_heads, self.model_cfg.n_heads, self.model_cfg.head_dim
        graphs = self._ready(layer)
        n = graphs[0].n if graphs else 0
        k = min(budget, n)
        if k == n:  # the budget covers the host tier: everything, nothing to search
            ids = torch.arange(n, dtype=torch.int64)[None].expand(hkv, -1).contiguous()
            return self._record(Selection(ids=ids.to(self.device), scanned=n * hkv), 0)
        qs = q.detach().float().cpu().numpy().reshape(hkv, hq // hkv, d)  # [H_kv, g, D]
        pool = self.params.pool_size(k)
        use_mean = self.params.gqa_search == "mean"
        reduce_max = self.cfg.gqa_reduce == "max"
        res = self._per_head([(g.search, np.ascontiguousarray(qs[h]), k, pool, use_mean, reduce_max)
                              for h, g in enumerate(graphs)])
        ids = torch.from_numpy(np.stack([r[0] for r in res]))  # [H_kv, k]
        sel = Selection(ids=ids.to(self.device), scanned=int(sum(r[1] for r in res)))
        return self._record(sel, int(sum(r[2] for r in res)))

    def _record(self, sel: Selection, dots: int) -> Selection:
        self._stats.record(sel)
        self._stats.extra["dots"] += dots
        return sel

    def stats(self) -> dict[str, Any]:
        return self._stats.as_dict()

    def state_dict(self) -> dict[str, Any]:
        """Each layer's graphs (edges, degrees, biases, parents, entry) and the counters; the
        keys are not written: build() puts them back from the host tier on load, and
        load_state_dict then replaces the graph that build() made from keys alone by the one
        learned from prefill queries and grown by decode."""
        s = self._stats
        out: dict[str, Any] = {"calls": s.calls, "scanned": s.scanned, "selected": s.selected,
                               "dots": s.extra["dots"], "build_s": s.extra["build_s"],
                               "build_wait_s": s.extra["build_wait_s"],
                               "attached": s.extra["attached"]}
        for layer, graphs in self.graphs.items():
            for h, g in enumerate(graphs):
                p, n = f"layer{layer}.head{h}.", g.n
                out.update({p + "n": n, p + "entry": g.entry})
                for name in ("adj", "deg", "bias", "parent"):
                    out[p + name] = torch.from_numpy(getattr(g, name)[:n].copy())
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state_dict() (after build() of every layer it names, with the same keys)."""
        self._wait_all()  # background builds finish first: their waits and counts are not the saved ones
        s = self._stats
        s.calls, s.scanned, s.selected = int(state["calls"]), int(state["scanned"]), int(state["selected"])
        s.extra.update(dots=int(state["dots"]), build_s=float(state["build_s"]), attached=int(state["attached"]),
                       build_wait_s=float(state.get("build_wait_s", 0.0)))
        for key in state:
            if not key.endswith(".entry"):
                continue
            layer, head = (int(x) for x in re.fullmatch(r"layer(\d+)\.head(\d+)\.entry", key).groups())
            g, p = self.graphs[layer][head], key.removesuffix("entry")
            n = int(state[p + "n"])
            if g.n != n:
                raise ValueError(f"attention_graph state of layer {layer} head {head} holds {n} keys, "
                                 f"the rebuilt graph {g.n}")
            for name in ("adj", "deg", "bias", "parent"):
                getattr(g, name)[:n] = state[p + name].numpy()
            g.entry = int(state[p + "entry"])

    def close(self) -> None:
        """Stops the worker threads (also done at interpreter exit)."""
        self._pool.shutdown(wait=True)
        self._build_pool.shutdown(wait=True)


# ----------------------------------------------------------------------------------------
# CPU partial attention next to the host tier
# ----------------------------------------------------------------------------------------


def cpu_partial_attention(
    q: Tensor, host_k: ChunkedRows, host_v: ChunkedRows, ids: Tensor, *, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """Attention of one decode query over per-head retrieved host rows, on the CPU.

    q [H_q, D]; host_k, host_v: ChunkedRows of rows [H_kv, D]; ids [H_kv, k] int64
    (-1 = padding) or [k] shared. Rows are gathered chunk by chunk from the store (no
    copy of the tier). Returns (out [H_q, D] in q.dtype, lse [H_q] fp32), equal to
    kernels.reference.gather_attend on the same rows. scale defaults to 1/sqrt(D).
    """
    hq, d = q.shape
    hkv = host_k.row_shape[0]
    if host_k.row_shape != (hkv, d) or host_v.row_shape[0] != hkv or len(host_v) != len(host_k):
        raise ValueError(
            f"host_k rows must be [H_kv, {d}] and host_v hold as many rows; got "
            f"{host_k.row_shape} ({len(host_k)} rows) and {host_v.row_shape} ({len(host_v)} rows)"
        )
    if hq % hkv:
        raise ValueError(f"H_q ({hq}) must be a multiple of H_kv ({hkv})")
    if ids.dim() == 1:
        ids = ids[None].expand(hkv, -1)
    if ids.shape[0] != hkv:
        raise ValueError(f"ids must be [H_kv={hkv}, k] or [k], got {list(ids.shape)}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if ids.shape[1] == 0:
        return q.new_zeros(q.shape), torch.full((hq,), float("-inf"), dtype=torch.float32, device=q.device)
    acc = torch.promote_types(host_k.dtype, torch.float32)  # fp32 (fp64 for fp64 rows), as the reference
    g = hq // hkv
    ids = ids.to(host_k.device)
    valid = ids >= 0  # [H_kv, k]
    safe = ids.clamp_min(0)
    head = torch.arange(hkv, device=ids.device)[:, None].expand_as(ids)
    k = host_k.rows(safe, head).to(acc)  # [H_kv, k, D], gathered chunk by chunk
    v = host_v.rows(safe, head).to(acc)
    qg = q.to(host_k.device, acc).view(hkv, g, d)  # [H_kv, g, D]
    logits = torch.bmm(qg, k.transpose(1, 2)).mul_(scale)  # [H_kv, g, k]
    logits.masked_fill_(~valid[:, None, :], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [H_kv, g]
    p = logits.sub_(lse.clamp_min(torch.finfo(acc).min)[..., None]).exp_()
    out = torch.bmm(p, v)  # [H_kv, g, D]
    return out.reshape(hq, d).to(q.dtype), lse.reshape(hq).float()

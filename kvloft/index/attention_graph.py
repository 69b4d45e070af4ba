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

Incremental build (`extend`, one prefill chunk at a time; the runtime's default, option
`incremental`): the chunk's host rows are appended, the chunk's sampled queries' exact kNN
over every row so far is projected onto their pivots' current edges (pivot candidates
pruned together with the edges it has), the new edges' reverse offers go in one batch
(one prune per receiving key), and the rows no query reached are attached as the build
attaches its cold keys. The same kernels as the build, in the same order, on a growing
graph: a query links only the keys before it (as causal attention reads them).

Insert (`add`, tokens leaving the window): a greedy L2 search finds the new key's
neighbours; it gets pruned out-edges, each neighbour a reverse edge (its list re-pruned
when full, tree edges kept), and a tree parent (a neighbour that kept the edge, else the
best candidate with a free slot or a non-tree edge to give up), so it stays reachable.

The hot loops are numba kernels (kvloft/index/graph_kernels.py, `nogil`); KV heads are
built and searched in a thread pool. One graph: head_graph.py; parameters:
graph_params.py; `cpu_partial_attention` (host_attention.py) attends to retrieved rows
straight from the host tier.
"""

from __future__ import annotations

import os
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kvloft.config import ModelConfig, RetrievalConfig
from kvloft.index.base import RetrieverStats, Selection, check_select, register
from kvloft.index.graph_params import GraphParams
from kvloft.index.head_graph import HeadGraph, exact_knn
from kvloft.index.host_attention import cpu_partial_attention

__all__ = ["AttentionGraphRetriever", "GraphParams", "HeadGraph", "cpu_partial_attention", "exact_knn"]


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
    waits only for its own. extend() queues a prefill chunk's work behind the layer's
    earlier jobs, head by head, and returns at once. stats()["build_s"] counts the time
    build()/extend() held the caller, stats()["build_wait_s"] the time select/add/state_dict
    later waited for a graph, stats()["graph_s"] the seconds the pool's jobs ran (summed over
    heads and threads: the build's CPU work, kNN included on a CPU retriever).
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
        self._stats = RetrieverStats(extra={"dots": 0, "build_s": 0.0, "build_wait_s": 0.0, "graph_s": 0.0,
                                            "attached": 0})
        self._work_lock = threading.Lock()  # graph_s is added to from the pool's threads
        n = self.params.n_threads or min(model_cfg.n_kv_heads, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(max_workers=max(1, n - 1), thread_name_prefix="kvloft-graph")
        self._parallel = n > 1
        nb = self.params.build_threads or os.cpu_count() or 1
        self._build_pool = ThreadPoolExecutor(max_workers=nb, thread_name_prefix="kvloft-graph-build")

    @property
    def incremental(self) -> bool:
        """Whether the runtime should feed prefill chunks through extend() (option `incremental`)."""
        return self.params.incremental

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
                jobs.append(self._submit(None, self._build_head, graphs[h], k_h.clone(), q_h.float().clone()))
            else:
                knn = self._knn(k_h, q_h)
                k_np = np.ascontiguousarray(k_h.cpu().numpy())
                jobs.append(self._submit(None, graphs[h].build, k_np, knn, self.params.ef_connect))
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
        """Incremental build, one prefill chunk at a time (module doc): keys [H_kv, n, D] of
        the rows the chunk moved to the host tier (n may be 0), appended as the next rows;
        queries [H_q, m, D], the chunk's sampled queries, link the keys they like by their
        kNN over every row so far (None: the new keys act as queries, as build() falls back).
        Each head's work is queued behind the layer's earlier jobs on the build pool and
        extend() returns at once; a layer's first select() or add() waits for it. Built
        this way from the first chunk on, the graph covers the host tier when prefill ends,
        with at most the last chunks still linking."""
        hkv, hq, d = self.model_cfg.n_kv_heads, self.model_cfg.n_heads, self.model_cfg.head_dim
        self._check("keys", keys, hkv)
        if queries is not None:
            self._check("queries", queries, hq)
        t0 = time.perf_counter()
        graphs = self._graphs.setdefault(layer, self._new_graphs())
        prev = self._pending.get(layer) or [None] * hkv
        k = keys.detach().to("cpu", torch.float32)
        group = self.model_cfg.group_size
        jobs = []
        for h, g in enumerate(graphs):
            k_h = np.array(k[h].numpy(), dtype=np.float32, order="C", copy=True)  # [n, D], own copy
            q_h = None
            if queries is not None:  # the group's query heads pooled: [g * m, D], own copy
                q_h = queries[h * group : (h + 1) * group].detach().reshape(-1, d).to("cpu", torch.float32, copy=True)
            jobs.append(self._submit(prev[h], self._extend_head, g, k_h, q_h))
        self._pending[layer] = jobs
        self._stats.extra["build_s"] += time.perf_counter() - t0

    def _extend_head(self, graph: HeadGraph, k_h: np.ndarray, q_h: Tensor | None) -> int:
        """One head's share of extend(): k_h [n, D] put, then linked with q_h [m, D]'s kNN."""
        graph.put(k_h)
        if q_h is None:
            q_h = torch.from_numpy(k_h)
        knn = np.empty((0, 0), np.int32)
        if graph.n and q_h.shape[0]:
            all_keys = torch.from_numpy(graph.keys[: graph.n]).to(self.device)  # [N, D]
            knn = self._knn(all_keys, q_h.to(self.device))
        return graph.extend(knn, self.params.ef_connect, self.params.attach_reverse)

    def _submit(self, prev: Future | None, fn: Any, *args: Any) -> Future:
        """fn(*args) on the build pool once prev (the same graph's earlier job) is done, so a
        graph's jobs run in order with no thread left waiting. The future's result is
        prev's plus fn's (attached keys); prev's error passes on."""
        out: Future = Future()

        def run() -> None:
            try:
                base = prev.result() if prev is not None else 0
                t0 = time.perf_counter()
                got = fn(*args)
                with self._work_lock:
                    self._stats.extra["graph_s"] += time.perf_counter() - t0
                out.set_result(base + got)
            except BaseException as e:  # noqa: BLE001 -- handed to whoever waits for the graph
                out.set_exception(e)

        if prev is None:
            self._build_pool.submit(run)
        else:
            prev.add_done_callback(lambda _: self._build_pool.submit(run))
        return out

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
        out: dict[str, Any] = {**s.counts(), "dots": s.extra["dots"], "build_s": s.extra["build_s"],
                               "build_wait_s": s.extra["build_wait_s"], "graph_s": s.extra["graph_s"],
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
        s.load_counts(state)
        s.extra.update(dots=int(state["dots"]), build_s=float(state["build_s"]), attached=int(state["attached"]),
                       build_wait_s=float(state.get("build_wait_s", 0.0)),
                       graph_s=float(state.get("graph_s", 0.0)))
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
        """Stops the worker threads (also done at interpreter exit) once queued builds are done."""
        try:
            self._wait_all()
        finally:
            self._pool.shutdown(wait=True)
        self._build_pool.shutdown(wait=True)

"""Parameters of the attention-aware graph retriever (kvloft/index/attention_graph.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvloft.index.base import params_from_options

__all__ = ["GraphParams"]


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
    incremental: the runtime feeds the index one prefill chunk at a time (extend(): the
        chunk's host rows and sampled queries), so the graph is built when prefill ends;
        False: one build() after prefill from the whole host tier and query sample.
    attach_reverse: incremental build: a row no query linked when it arrived is attached as
        the build attaches its cold keys, and its nearest `attach_reverse` out-neighbours
        link back to it (over their farthest non-tree edge when full). A later query links it only
        if it comes after it, so without these edges late rows have fewer ways in: measured
        (synthetic OOD, 4K keys in chunks of 512) recall@100 0.912 with 0, 0.934 with 4,
        0.943 with 8 against 0.948 one-shot; 16K keys in SmolLM2 shape: 0.915 with 4, 0.924
        with 8 against 0.940 (bench/graph_build.py).
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
    incremental: bool = True
    attach_reverse: int = 8

    def __post_init__(self) -> None:
        for name in ("max_degree", "knn", "ef_connect", "ef_insert", "knn_chunk"):
            _check_int(name, getattr(self, name), 1)
        for name in ("ef", "fallback_queries", "n_threads", "build_threads", "seed", "attach_reverse"):
            _check_int(name, getattr(self, name), 0)
        if self.max_degree < 2:
            raise ValueError(f"max_degree must be >= 2, got {self.max_degree}")
        if isinstance(self.ef_scale, bool) or not isinstance(self.ef_scale, (int, float)):
            raise TypeError(f"ef_scale must be a number, got {self.ef_scale!r}")
        if not self.ef_scale >= 1.0:
            raise ValueError(f"ef_scale must be >= 1 (the pool holds at least k), got {self.ef_scale}")
        if self.key_metric not in ("l2", "ip"):
            raise ValueError(f"key_metric must be 'l2' or 'ip', got {self.key_metric!r}")
        for name in ("fill", "incremental"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
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

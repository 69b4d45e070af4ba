"""Off-the-shelf ANN baselines through faiss, built on keys alone (method "faiss").

One faiss index per (layer, KV head), inner product, over the host-tier keys:
  index="flat"  IndexFlatIP: exact, scores every key.
  index="ivf"   IndexIVFFlat: k-means lists (nlist, default sqrt(N)), nprobe lists probed.
  index="hnsw"  IndexHNSWFlat: HNSW graph on keys (hnsw_m, ef_construction), ef_search.
Prefill queries are ignored: these indexes know keys only, which is what RetrievalAttention
measures them against (queries are out of distribution for them).

GQA: with RetrievalConfig.gqa_reduce="max", each query head of the group searches its own
top-k, and the union is ranked by the max over the group (exact for flat: a key in the
group's top-k by max is in the top-k of the head attaining that max); with "sum", one
search with the summed query (sum_h <q_h, k> = <sum_h q_h, k>, exact for flat).

`scanned` (keys whose score was computed), summed over KV heads:
  flat: N per KV head (every key, once, whatever the group size).
  ivf:  faiss.cvar.indexIVF_stats.ndis, the sizes of the probed lists, summed over the
        group's searches and capped at N (on a faiss GPU index, where faiss keeps no
        stats, the estimate nprobe * N / nlist per search); the nlist centroid scores of
        the coarse quantizer are not counted.
  hnsw: faiss.cvar.hnsw_stats.ndis, summed over the group's searches, capped at N.
faiss keeps these counters in process globals, so searches run under one lock.

faiss-gpu is used for flat and ivf when the module has GPU support and the retriever's
device is CUDA (HNSW has no GPU version); faiss-cpu otherwise.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

try:  # an optional dependency: this module is imported only when method "faiss" is asked for
    import faiss
except ImportError as e:
    raise ImportError(
        "retrieval method 'faiss' needs the faiss package: pip install 'kvloft[faiss]' "
        "(CPU) or 'kvloft[gpu]' (faiss-gpu, CUDA 12)"
    ) from e

from kvloft.config import ModelConfig, RetrievalConfig
from kvloft.index.base import RetrieverStats, Selection, check_select, register

__all__ = ["FaissParams", "FaissRetriever"]

_STATS_LOCK = threading.Lock()  # faiss search counters are process-global


@dataclass(frozen=True)
class FaissParams:
    """RetrievalConfig.options of method "faiss" ("efSearch" is accepted for ef_search).

    index: "flat", "ivf" or "hnsw".
    nlist: IVF lists; 0 -> round(sqrt(N)) at build (at least 1, at most N).
    nprobe: IVF lists probed per search.
    hnsw_m: HNSW out-degree (faiss M; paper-comparable: 32).
    ef_construction: HNSW build pool.
    ef_search: HNSW search pool; 0 -> ceil(1.5 k). faiss uses max(ef_search, k).
    use_gpu: "auto" (faiss GPU build and a CUDA device), "never".
    """

    index: str = "hnsw"
    nlist: int = 0
    nprobe: int = 8
    hnsw_m: int = 32
    ef_construction: int = 40
    ef_search: int = 0
    use_gpu: str = "auto"

    def __post_init__(self) -> None:
        if self.index not in ("flat", "ivf", "hnsw"):
            raise ValueError(f"faiss index must be 'flat', 'ivf' or 'hnsw', got {self.index!r}")
        for name, low in (("nlist", 0), ("nprobe", 1), ("hnsw_m", 2), ("ef_construction", 1), ("ef_search", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if self.use_gpu not in ("auto", "never"):
            raise ValueError(f"use_gpu must be 'auto' or 'never', got {self.use_gpu!r}")

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> FaissParams:
        opts = dict(options)
        if "efSearch" in opts:
            opts["ef_search"] = opts.pop("efSearch")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(opts) - known)
        if unknown:
            raise ValueError(f"unknown faiss option(s) {unknown}; known options: {sorted(known)} (and efSearch)")
        return cls(**opts)


class _HeadIndex:
    """One faiss index and a float32 copy of its keys [n, D] (to rank GQA candidates)."""

    def __init__(self, params: FaissParams, dim: int, gpu: Any) -> None:
        self.params, self.dim, self.gpu = params, dim, gpu  # build-time params
        self.index: Any = None
        self.keys = np.zeros((0, dim), np.float32)
        self.n = 0

    def _new_index(self, train: np.ndarray) -> Any:
        p, d = self.params, self.dim
        if p.index == "flat":
            index = faiss.IndexFlatIP(d)
        elif p.index == "hnsw":
            index = faiss.IndexHNSWFlat(d, p.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = p.ef_construction
        else:
            nlist = p.nlist or round(math.sqrt(train.shape[0]))
            nlist = max(1, min(nlist, train.shape[0]))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.min_points_per_centroid = 1  # small hosts: no warnings, fewer points per list
            index.train(train)
        if self.gpu is not None and p.index != "hnsw":
            res, dev = self.gpu
            index = faiss.index_cpu_to_gpu(res, dev, index)
        return index

    def add(self, keys: np.ndarray) -> None:
        """keys [n, D] float32, appended as the next rows."""
        if keys.shape[0] == 0:
            return
        if self.index is None:
            self.index = self._new_index(keys)
        self.index.add(keys)
        cap = self.keys.shape[0]
        if self.n + keys.shape[0] > cap:  # amortized growth of the key copy
            grown = np.zeros((max(self.n + keys.shape[0], 2 * cap), self.dim), np.float32)
            grown[: self.n] = self.keys[: self.n]
            self.keys = grown
        self.keys[self.n : self.n + keys.shape[0]] = keys
        self.n += keys.shape[0]

    @property
    def nlist(self) -> int:
        return int(faiss.extract_index_ivf(self.index).nlist) if self.params.index == "ivf" else 0

    def search(self, qs: np.ndarray, k: int, reduce_max: bool, p: FaissParams) -> tuple[np.ndarray, int]:
        """qs [g, D] float32 -> (ids [k] int64 ranked by the group-reduced score, scanned).
        p: the retriever's current params (search efforts may change between calls)."""
        searches = qs if reduce_max else qs.sum(axis=0, keepdims=True)
        with _STATS_LOCK:
            if p.index == "hnsw":
                self.index.hnsw.efSearch = p.ef_search or math.ceil(1.5 * k)
                faiss.cvar.hnsw_stats.reset()
            elif p.index == "ivf":
                faiss.extract_index_ivf(self.index).nprobe = p.nprobe
                faiss.cvar.indexIVF_stats.reset()
            _, ids = self.index.search(searches, k)  # [s, k]
            scanned = self._scanned(searches.shape[0], p.nprobe)
        cand = np.unique(ids[ids >= 0])
        if cand.shape[0] == 0:
            return np.full(k, -1, np.int64), scanned
        scores = qs @ self.keys[cand].T  # [g, c]: rank the union by the group's score
        scores = scores.max(axis=0) if reduce_max else scores.sum(axis=0)
        top = cand[np.argsort(-scores, kind="stable")[:k]]
        out = np.full(k, -1, np.int64)
        out[: top.shape[0]] = top
        return out, scanned

    def _scanned(self, n_searches: int, nprobe: int) -> int:
        kind = self.params.index
        if kind == "flat":
            return self.n
        if kind == "hnsw":
            return min(int(faiss.cvar.hnsw_stats.ndis), self.n)
        if self.gpu is not None:  # faiss GPU keeps no IVF stats: expected list sizes
            return min(round(n_searches * nprobe * self.n / self.nlist), self.n)
        return min(int(faiss.cvar.indexIVF_stats.ndis), self.n)


@register("faiss")
class FaissRetriever:
    """Retriever protocol over faiss indexes on keys only; see the module doc.

    Search efforts (nprobe, ef_search) are read from `self.params` at every select, so a
    benchmark may sweep them on one build with dataclasses.replace.
    """

    needs_queries = False  # a keys-only index: the runtime need not keep a prefill query sample

    def __init__(self, cfg: RetrievalConfig, model_cfg: ModelConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.device = torch.device(device)
        self.params = FaissParams.from_options(cfg.options)
        self.heads: dict[int, list[_HeadIndex]] = {}
        self._stats = RetrieverStats(extra={"build_s": 0.0, "index": self.params.index, "gpu": False})
        self._gpu = self._gpu_resources()
        self._stats.extra["gpu"] = self._gpu is not None

    def _gpu_resources(self) -> Any:
        if self.params.use_gpu == "never" or self.device.type != "cuda":
            return None
        if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
            return None  # faiss-cpu build: the CPU indexes serve a CUDA session too
        return faiss.StandardGpuResources(), self.device.index or 0

    def _new_heads(self) -> list[_HeadIndex]:
        d = self.model_cfg.head_dim
        return [_HeadIndex(self.params, d, self._gpu) for _ in range(self.model_cfg.n_kv_heads)]

    def _check_keys(self, keys: Any) -> np.ndarray:
        hkv, d = self.model_cfg.n_kv_heads, self.model_cfg.head_dim
        if not isinstance(keys, Tensor):
            raise TypeError(f"keys must be a torch.Tensor, got {type(keys).__name__}")
        if keys.dim() != 3 or (keys.shape[0], keys.shape[2]) != (hkv, d):
            raise ValueError(f"keys must be [{hkv}, N, {d}], got {list(keys.shape)}")
        return keys.detach().to("cpu", torch.float32).numpy()

    def build(self, layer: int, keys: Tensor, queries: Tensor | None) -> None:
        """keys [H_kv, N, D]; queries are not used (a keys-only baseline)."""
        k = self._check_keys(keys)
        t0 = time.perf_counter()
        heads = self._new_heads()
        for h, head in enumerate(heads):
            head.add(np.ascontiguousarray(k[h]))
        self.heads[layer] = heads
        self._stats.extra["build_s"] += time.perf_counter() - t0

    def add(self, layer: int, keys: Tensor, positions: Tensor) -> None:
        """keys [H_kv, n, D] of tokens leaving the window (the next host rows)."""
        k = self._check_keys(keys)
        heads = self.heads.setdefault(layer, self._new_heads())
        for h, head in enumerate(heads):
            head.add(np.ascontiguousarray(k[h]))

    def select(self, layer: int, q: Tensor, budget: int) -> Selection:
        """q [H_q, D] -> Selection(ids [H_kv, k] int64, k = min(budget, N))."""
        check_select(q, budget, self.model_cfg)
        hkv, hq, d = self.model_cfg.n_kv_heads, self.model_cfg.n_heads, self.model_cfg.head_dim
        heads = self.heads.get(layer)
        n = heads[0].n if heads else 0
        k = min(budget, n)
        if k == n:  # the budget covers the host tier
            ids = torch.arange(n, dtype=torch.int64)[None].expand(hkv, -1).contiguous()
            sel = Selection(ids=ids.to(self.device), scanned=n * hkv)
        else:
            qs = q.detach().to("cpu", torch.float32).numpy().reshape(hkv, hq // hkv, d)
            reduce_max = self.cfg.gqa_reduce == "max"
            res = [head.search(np.ascontiguousarray(qs[h]), k, reduce_max, self.params)
                   for h, head in enumerate(heads)]
            ids = torch.from_numpy(np.stack([r[0] for r in res]))
            sel = Selection(ids=ids.to(self.device), scanned=sum(r[1] for r in res))
        self._stats.record(sel)
        return sel

    def stats(self) -> dict[str, Any]:
        return self._stats.as_dict()

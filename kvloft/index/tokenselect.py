"""TokenSelect: token-level selection by a soft vote of the query heads (arXiv 2411.02886).

Per decode step and layer, every candidate key j (the host tier) gets one criticality

    S_j = sum_h softmax_j(s[h, j]),   s[h, j] = q_h · K[j]            (q_h: query head h)

and the top-k rows of S are selected for all heads of the layer (a shared Selection
`[k]`). The softmax per head keeps one head with large logits from outvoting the others;
the paper scores without 1/sqrt(d) (option `scale_scores` turns it on). k is the
`budget` argument of `select` (the paper's default of 2048 is RetrievalConfig.budget's).

Selection cache: consecutive decode queries are often alike. If the cosine similarity
of the flattened query `[H_q * D]` with the last query that ran a selection in the
same layer is >= `theta` (0.9), that selection is returned again without scoring. Its
ids stay valid because host rows are only appended; tokens added since are not in it
until the next miss, as in the paper. A change of budget is always a miss.

GQA: query head h reads KV head h // (H_q // H_kv), the HF convention used across
kvloft, so each query head is scored against the KV head it attends to. The paper
maps query head h to KV head h mod H_kv instead; that mapping is not followed here.

Cost of a miss: one pass over all host keys, N * H_kv * D * bytes read from the key
mirror on the retriever's device, plus an [H_q, N] fp32 logit buffer. A hit costs one
dot product of length H_q * D.

State per layer (_LayerState): the key mirror, the last query that ran a selection
(fp32 `[H_q * D]`), its ids `[k]` and the budget they were made for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kvloft.config import ModelConfig, RetrievalConfig
from kvloft.index.base import RetrieverStats, Selection, params_from_options, register, state_tensor
from kvloft.index.key_mirror import LayerMirrors
from kvloft.index.key_scan import scan_store
from kvloft.tiers.chunked import ChunkedRows


@dataclass(frozen=True)
class TokenSelectParams:
    """Options of RetrievalConfig(method="tokenselect", options={...}).

    theta: cosine similarity at or above which the last selection is reused, in [0, 1].
    selection_cache: False scores every step (theta is then unused).
    scale_scores: multiply the logits by 1/sqrt(head_dim) before the per-head softmax.
    chunk_rows: rows per chunk of the key mirror.
    """

    theta: float = 0.9
    selection_cache: bool = True
    scale_scores: bool = False
    chunk_rows: int = 16384

    def __post_init__(self) -> None:
        if isinstance(self.theta, bool) or not isinstance(self.theta, (int, float)):
            raise TypeError(f"tokenselect theta must be a float in [0, 1], got {self.theta!r}")
        if not 0.0 <= float(self.theta) <= 1.0:
            raise ValueError(
                f"tokenselect theta must lie in [0, 1] (a cosine similarity), got {self.theta}; "
                "use selection_cache=False to turn the cache off"
            )
        for name in ("selection_cache", "scale_scores"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"tokenselect {name} must be a bool, got {getattr(self, name)!r}")
        if isinstance(self.chunk_rows, bool) or not isinstance(self.chunk_rows, int) or self.chunk_rows < 1:
            raise ValueError(f"tokenselect chunk_rows must be an int >= 1, got {self.chunk_rows!r}")

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> TokenSelectParams:
        return params_from_options(cls, options, "tokenselect")


@dataclass
class _LayerState:
    keys: ChunkedRows  # host-tier keys, token-major [N, H_kv, D]
    last_q: Tensor | None = None  # fp32 [H_q * D] of the last query that ran a selection
    last_ids: Tensor | None = None  # int64 [k] chosen for it
    last_budget: int = -1


@register("tokenselect")
class TokenSelectRetriever:
    needs_queries = False  # the runtime need not keep a prefill query sample
    small_state = True  # state_dict() is O(budget) per layer: a session keeps it to roll back a failed call

    def __init__(self, cfg: RetrievalConfig, model_cfg: ModelConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.device = torch.device(device)
        self.params = TokenSelectParams.from_options(dict(cfg.options))
        self.scale = model_cfg.head_dim**-0.5 if self.params.scale_scores else 1.0
        self.layers = LayerMirrors(_LayerState, model_cfg, self.params.chunk_rows, self.device)
        self._stats = RetrieverStats()
        self.cache_hits = 0
        self.cache_misses = 0

    def build(self, layer: int, keys: Tensor, queries: Tensor | None) -> None:
        """keys [H_kv, N, D] of the host tier after prefill; queries are not needed."""
        self.layers.build(layer, keys)

    def add(self, layer: int, keys: Tensor, positions: Tensor) -> None:
        """keys [H_kv, n, D] leaving the window; they become host rows N .. N + n - 1."""
        self.layers.append(layer, keys)

    def criticality(self, layer: int, q: Tensor) -> Tensor:
        """Soft vote of the query heads: q [H_q, D] -> S [N] fp32 (sums to H_q)."""
        st = self.layers.get(layer)
        if st is None or len(st.keys) == 0:
            return torch.empty(0, dtype=torch.float32, device=self.device)
        q = q.to(self.device)
        logits = scan_store(q, st.keys, scale=self.scale)  # [H_q, N]
        return torch.softmax(logits, dim=-1).sum(dim=0)

    def select(self, layer: int, q: Tensor, budget: int) -> Selection:
        """q [H_q, D] -> Selection(ids [min(budget, N)] shared by all heads, scanned)."""
        if budget < 0:
            raise ValueError(f"budget must be >= 0 host tokens, got {budget}")
        st = self.layers.get(layer)
        n = 0 if st is None else len(st.keys)
        if budget >= n:  # every host row fits: nothing to rank, the cache is left alone
            sel = Selection(ids=torch.arange(n, device=self.device), scanned=0)
        else:
            sel = self._select_topk(st, q, budget, layer)
        self._stats.record(sel)
        return sel

    def _select_topk(self, st: _LayerState, q: Tensor, budget: int, layer: int) -> Selection:
        qflat = q.to(self.device, torch.float32, copy=True).reshape(-1)  # [H_q * D], kept: a copy
        if self._cache_hit(st, qflat, budget):
            self.cache_hits += 1
            return Selection(ids=st.last_ids, scanned=0)
        self.cache_misses += 1
        s = self.criticality(layer, q)
        ids = torch.topk(s, budget).indices
        st.last_q, st.last_ids, st.last_budget = qflat, ids, budget
        return Selection(ids=ids, scanned=s.shape[0] * self.model_cfg.n_kv_heads)

    def _cache_hit(self, st: _LayerState, qflat: Tensor, budget: int) -> bool:
        if not self.params.selection_cache or st.last_q is None or st.last_budget != budget:
            return False
        cos = torch.nn.functional.cosine_similarity(qflat, st.last_q, dim=0)
        # a host read per layer and step: a hit skips the scoring pass, and only the host can skip it
        return bool(cos >= self.params.theta)

    def stats(self) -> dict[str, Any]:
        looked = self.cache_hits + self.cache_misses
        self._stats.extra.update(
            cache_hits=self.cache_hits,
            cache_misses=self.cache_misses,
            cache_hit_rate=self.cache_hits / looked if looked else 0.0,
        )
        return self._stats.as_dict()

    def state_dict(self, host: bool = True) -> dict[str, Any]:
        """Selection caches and counters; the key mirrors are rebuilt from the host tier by
        build(). Tensors on the host, or (host=False) copied on the device (base.state_tensor)."""
        s = self._stats
        out: dict[str, Any] = {**s.counts(host), "cache_hits": self.cache_hits,
                               "cache_misses": self.cache_misses}
        for layer, st in self.layers.items():
            if st.last_q is not None:
                out[f"layer{layer}.last_q"] = state_tensor(st.last_q, host)  # fp32 [H_q * D]
                out[f"layer{layer}.last_ids"] = state_tensor(st.last_ids, host)  # int64 [k]
                out[f"layer{layer}.last_budget"] = st.last_budget
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state_dict() (after build() of every layer)."""
        s = self._stats
        s.load_counts(state)
        self.cache_hits, self.cache_misses = int(state["cache_hits"]), int(state["cache_misses"])
        for key, value in state.items():
            if key.endswith(".last_q"):
                layer = int(key.removeprefix("layer").split(".")[0])
                st = self.layers.of(layer, value.dtype)
                st.last_q = value.to(self.device)
                st.last_ids = state[f"layer{layer}.last_ids"].to(self.device)
                st.last_budget = int(state[f"layer{layer}.last_budget"])

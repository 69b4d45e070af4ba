"""Recycled Attention: alternate full steps and partial steps (arXiv 2411.05787).

A full step attends to ALL host tokens (its Selection is every host row, shared by
all heads) and, on the side, computes the attention probabilities of that query over
the host keys explicitly:

    p[h, j] = softmax_j(q_h · K[j] * scale)                 [H_q, N], scale = 1/sqrt(D)
    p'      = max-pool of p along tokens (kernel 7, stride 1, same length)
    g[c, j] = max over the query heads h of KV group c of p'[h, j]     [H_kv, N]

The top-K rows of g per KV head become the partial set. The following partial steps
attend only to that set (a per-head Selection `[H_kv, K]`), recycling the attention
pattern of the last full step. K is the `budget` (the paper's 4096 when the runtime
passes that). Probabilities are normalised over the host tier only: the static tier
(sink + window) is attended on every step anyway, and leaving it out of the softmax
changes each head's probabilities by one common factor.

New tokens: rows that enter the host tier (`add`) between full steps join the set,
each evicting the lowest-scored entry of every KV head once the set holds K rows, so
its size stays K. An added row gets score 1 + (its arrival number since the last full
step); every probability is <= 1, so added rows outrank recycled ones and the oldest
added row goes first only if more than K arrive. This keeps the paper's rule that
tokens generated after the full step are always attended.

Schedules (step t = number of earlier `select` calls in this layer):
- "stride": a full step at t = 0, S, 2S, ... (S = `stride`, default 50).
- "dynamic": a full step at t = 0; then every QC steps after the last full step
  (QC = `query_check`, default 5) the head-averaged query [D] is compared with the
  one of the last full step; cosine <= s (`sim_threshold`, default 0.85) makes this
  step a full step.
A change of budget also forces a full step (the set was ranked for another K).

Cost: a full step reads all N host keys (N * H_kv * D * bytes from the key mirror) and
keeps an [H_q, N] fp32 buffer; a partial step scores nothing (scanned = 0).

State per layer (_LayerState): the key mirror, the step counter, the step and the
head-averaged query of the last full step, the partial set (ids and scores, [H_kv, K'],
K' = min(K, host rows seen)), its budget, and the arrival counter of added rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kvloft.config import ModelConfig, RetrievalConfig
from kvloft.index.base import RetrieverStats, Selection, params_from_options, register, state_tensor
from kvloft.index.key_mirror import LayerMirrors
from kvloft.index.key_scan import scan_store
from kvloft.kernels import reference
from kvloft.tiers.chunked import ChunkedRows

SCHEDULES = ("stride", "dynamic")


@dataclass(frozen=True)
class RecycledParams:
    """Options of RetrievalConfig(method="recycled", options={...}); K is the budget.

    schedule: "stride" (full step every `stride` steps) or "dynamic" (query similarity).
    stride: S, steps between full steps of the stride schedule.
    query_check: QC, steps between query-similarity checks of the dynamic schedule.
    sim_threshold: s, a check with cosine <= s triggers a full step (in [-1, 1]).
    pool_kernel: odd width of the max-pool over token positions.
    scale: logit scale of the full-step softmax (None -> 1/sqrt(head_dim)).
    chunk_rows: rows per chunk of the key mirror.
    """

    schedule: str = "stride"
    stride: int = 50
    query_check: int = 5
    sim_threshold: float = 0.85
    pool_kernel: int = 7
    scale: float | None = None
    chunk_rows: int = 16384

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"recycled schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("stride", "query_check", "pool_kernel", "chunk_rows"):
            _check_positive_int(name, getattr(self, name))
        if self.pool_kernel % 2 == 0:
            raise ValueError(f"recycled pool_kernel must be odd (same-length pooling), got {self.pool_kernel}")
        s = self.sim_threshold
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not -1.0 <= s <= 1.0:
            raise ValueError(f"recycled sim_threshold must be a cosine similarity in [-1, 1], got {s!r}")
        if self.scale is not None and not (isinstance(self.scale, (int, float)) and self.scale > 0):
            raise ValueError(f"recycled scale must be a float > 0 or None (1/sqrt(D)), got {self.scale!r}")

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> RecycledParams:
        return params_from_options(cls, options, "recycled")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"recycled {name} must be an int >= 1, got {value!r}")


@dataclass
class _LayerState:
    keys: ChunkedRows  # host-tier keys, token-major [N, H_kv, D]
    step: int = 0  # select calls so far in this layer
    last_full: int = -1  # step of the last full step
    full_query: Tensor | None = None  # fp32 [D], head-averaged query of the last full step
    set_ids: Tensor | None = None  # int64 [H_kv, K'] partial set (host rows)
    set_scores: Tensor | None = None  # fp32 [H_kv, K'] pooled probability, or 1 + arrival
    set_budget: int = 0  # K the set was ranked for
    arrivals: int = 0  # rows added since the last full step


@register("recycled")
class RecycledRetriever:
    needs_queries = False  # the runtime need not keep a prefill query sample
    small_state = True  # state_dict() is O(budget) per layer: a session keeps it to roll back a failed call

    def __init__(self, cfg: RetrievalConfig, model_cfg: ModelConfig, device: torch.device) -> None:
        if cfg.budget < 1:
            raise ValueError(
                f"recycled attention keeps K = budget tokens per KV head; budget must be >= 1, "
                f"got {cfg.budget}"
            )
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.device = torch.device(device)
        self.params = RecycledParams.from_options(dict(cfg.options))
        p = self.params
        self.scale = p.scale if p.scale is not None else model_cfg.head_dim**-0.5
        self.layers = LayerMirrors(_LayerState, model_cfg, self.params.chunk_rows, self.device)
        self._stats = RetrieverStats()
        self.full_steps = 0
        self.partial_steps = 0

    def build(self, layer: int, keys: Tensor, queries: Tensor | None) -> None:
        """keys [H_kv, N, D] of the host tier after prefill; the layer's schedule restarts."""
        self.layers.build(layer, keys)

    def add(self, layer: int, keys: Tensor, positions: Tensor) -> None:
        """keys [H_kv, n, D] leaving the window: appended, and admitted to the partial set."""
        st = self.layers.append(layer, keys)
        if st.set_ids is not None and keys.shape[1]:
            end = len(st.keys)
            self._admit(st, torch.arange(end - keys.shape[1], end, device=self.device))

    def _admit(self, st: _LayerState, rows: Tensor) -> None:
        """Put new host rows [n] into every head's set; evict the lowest scores beyond K."""
        hkv, n = self.model_cfg.n_kv_heads, rows.numel()
        scores = 1.0 + st.arrivals + torch.arange(n, dtype=torch.float32, device=self.device)
        st.arrivals += n
        ids_new, sc_new = rows[None].expand(hkv, -1), scores[None].expand(hkv, -1)  # [H_kv, n]
        take = min(st.set_budget - st.set_ids.shape[1], n)  # free room: append
        if take > 0:
            st.set_ids = torch.cat([st.set_ids, ids_new[:, :take]], dim=1)
            st.set_scores = torch.cat([st.set_scores, sc_new[:, :take]], dim=1)
        rest = min(n - max(take, 0), st.set_budget)  # more than K new rows: the last K win
        if rest > 0:
            low = torch.topk(st.set_scores, rest, dim=1, largest=False).indices  # [H_kv, rest]
            st.set_ids.scatter_(1, low, ids_new[:, n - rest :].contiguous())
            st.set_scores.scatter_(1, low, sc_new[:, n - rest :].contiguous())

    def probabilities(self, layer: int, q: Tensor) -> Tensor:
        """Attention probabilities over the host tier: q [H_q, D] -> [H_q, N] fp32."""
        st = self.layers[layer]
        q = q.to(self.device)
        logits = scan_store(q, st.keys, scale=self.scale)  # [H_q, N]
        return torch.softmax(logits, dim=-1)

    def full_step_scores(self, layer: int, q: Tensor) -> Tensor:
        """Pooled, group-max probabilities that rank the partial set: q [H_q, D] -> [H_kv, N]."""
        k = self.params.pool_kernel
        p = self.probabilities(layer, q)  # [H_q, N]
        pooled = F.max_pool1d(p[:, None], kernel_size=k, stride=1, padding=k // 2)[:, 0]
        return reference.reduce_group(pooled, self.model_cfg.n_kv_heads, "max")

    def select(self, layer: int, q: Tensor, budget: int) -> Selection:
        """q [H_q, D] -> all host rows [N] (full step) or the partial set [H_kv, K] (partial step)."""
        if budget < 1:
            raise ValueError(f"recycled attention needs budget K >= 1 tokens per KV head, got {budget}")
        st = self.layers.of(layer, q.dtype)
        if self._needs_full(st, q, budget):
            sel = self._full_step(st, layer, q, budget)
            self.full_steps += 1
        else:
            sel = Selection(ids=st.set_ids.clone(), scanned=0)
            self.partial_steps += 1
        st.step += 1
        self._stats.record(sel)
        return sel

    refresh_reads_all = True  # a refresh (full step) selects every host row, not `budget` of them

    def refresh_schedule(self, layer: int, budget: int, n_rows: int) -> tuple[bool] | None:
        """(is the next select(layer, q, budget) a full step?,) under the stride schedule, for a
        step plan made before the step (runtime/step_plan.py); None where it depends on the query
        (the dynamic schedule) or the layer is not indexed. n_rows is not needed. Changes nothing."""
        st = self.layers.get(layer)
        if st is None or self.params.schedule != "stride":
            return None
        if st.set_ids is None or budget != st.set_budget:
            return (True,)
        return (st.step - st.last_full >= self.params.stride,)

    def _needs_full(self, st: _LayerState, q: Tensor, budget: int) -> bool:
        if st.set_ids is None or budget != st.set_budget:
            return True
        since = st.step - st.last_full
        if self.params.schedule == "stride":
            return since >= self.params.stride
        if since % self.params.query_check:
            return False
        qbar = q.to(self.device).float().mean(dim=0)  # [D]
        cos = F.cosine_similarity(qbar, st.full_query, dim=0)
        return bool(cos <= self.params.sim_threshold)

    def _full_step(self, st: _LayerState, layer: int, q: Tensor, budget: int) -> Selection:
        n, hkv = len(st.keys), self.model_cfg.n_kv_heads
        if n == 0:
            st.set_ids = torch.empty((hkv, 0), dtype=torch.int64, device=self.device)
            st.set_scores = torch.empty((hkv, 0), dtype=torch.float32, device=self.device)
        else:
            st.set_scores, st.set_ids = torch.topk(self.full_step_scores(layer, q), min(budget, n), dim=1)
        st.set_budget, st.last_full, st.arrivals = budget, st.step, 0
        st.full_query = q.to(self.device).float().mean(dim=0)
        return Selection(ids=torch.arange(n, device=self.device), scanned=n * hkv)

    def stats(self) -> dict[str, Any]:
        steps = self.full_steps + self.partial_steps
        self._stats.extra.update(
            full_steps=self.full_steps,
            partial_steps=self.partial_steps,
            full_step_rate=self.full_steps / steps if steps else 0.0,
        )
        return self._stats.as_dict()

    def state_dict(self, host: bool = True) -> dict[str, Any]:
        """Schedules, partial sets and counters; the key mirrors are rebuilt from the host tier by
        build(). Tensors on the host, or (host=False) copied on the device (base.state_tensor)."""
        s = self._stats
        out: dict[str, Any] = {**s.counts(host), "full_steps": self.full_steps,
                               "partial_steps": self.partial_steps}
        for layer, st in self.layers.items():
            p = f"layer{layer}."
            out.update({p + "step": st.step, p + "last_full": st.last_full, p + "set_budget": st.set_budget,
                        p + "arrivals": st.arrivals})
            for name in ("full_query", "set_ids", "set_scores"):
                if getattr(st, name) is not None:
                    out[p + name] = state_tensor(getattr(st, name), host)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state_dict() (after build() of every layer)."""
        s = self._stats
        s.load_counts(state)
        self.full_steps, self.partial_steps = int(state["full_steps"]), int(state["partial_steps"])
        for key in state:
            if not key.endswith(".step"):
                continue
            layer = int(key.removeprefix("layer").split(".")[0])
            p = f"layer{layer}."
            st = self.layers[layer]
            st.step, st.last_full = int(state[p + "step"]), int(state[p + "last_full"])
            st.set_budget, st.arrivals = int(state[p + "set_budget"]), int(state[p + "arrivals"])
            for name in ("full_query", "set_ids", "set_scores"):
                val = state.get(p + name)
                setattr(st, name, None if val is None else val.to(self.device))

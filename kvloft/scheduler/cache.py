"""The GPU cache tier: recently retrieved token rows, LRU, per layer (DESIGN.md, Tiers).

Per layer, K and V rows live token-major in `[capacity, H_kv, D]` buffers on the compute
device (the CPU for CPU sessions), indexed by slot; `CacheDirectory` (scheduler/plan.py)
maps host rows to slots on the CPU and plans each step. A row already here is read in
place by the attention kernel and never transferred again; fetched rows are admitted
after the step that fetched them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from kvloft.config import ModelConfig
from kvloft.scheduler.plan import CacheDirectory, CacheStats, PlanScratch, StepPlan

__all__ = ["RowCache", "token_row_bytes"]


def token_row_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of one token's K and V rows in one layer: 2 * H_kv * D * itemsize."""
    return 2 * cfg.n_kv_heads * cfg.head_dim * torch.empty(0, dtype=dtype).element_size()


class RowCache:
    """Cached K and V rows of every layer; capacity token rows per layer.

    k[layer], v[layer]: [capacity, H_kv, D] on `device`, in the KV dtype.
    """

    def __init__(self, cfg: ModelConfig, capacity: int, device: torch.device, dtype: torch.dtype) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"capacity must be an int >= 0 (token rows per layer), got {capacity!r}")
        shape = (capacity, cfg.n_kv_heads, cfg.head_dim)
        self.capacity = capacity
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        scratch = PlanScratch()
        self.dirs = [CacheDirectory(capacity, scratch) for _ in range(cfg.n_layers)]
        self.row_bytes = token_row_bytes(cfg, dtype)

    @classmethod
    def from_bytes(cls, cfg: ModelConfig, nbytes: int, device: torch.device, dtype: torch.dtype) -> RowCache:
        """The largest cache of whole token rows for all layers within nbytes."""
        per_token = token_row_bytes(cfg, dtype) * cfg.n_layers
        return cls(cfg, int(nbytes) // per_token, device, dtype)

    @property
    def nbytes(self) -> int:
        return self.capacity * self.row_bytes * len(self.k)

    def plan(self, layer: int, ids: Tensor | np.ndarray) -> StepPlan:
        """Plan this layer's step for a selection (see CacheDirectory.plan)."""
        return self.dirs[layer].plan(ids)

    def admit(self, layer: int, gathered_k: Tensor, gathered_v: Tensor, slots: Tensor) -> None:
        """Copy gathered rows 0..a-1 ([>= a, H_kv, D] on the device) into slots [a] int64."""
        a = slots.shape[0]
        if a:
            self.k[layer].index_copy_(0, slots, gathered_k[:a])
            self.v[layer].index_copy_(0, slots, gathered_v[:a])

    def clear(self) -> None:
        """Forget every cached row (a session rolled back: host rows past its mark will be
        written again with other tokens); hit statistics restart."""
        scratch = PlanScratch()
        self.dirs = [CacheDirectory(self.capacity, scratch) for _ in self.dirs]

    def totals(self) -> CacheStats:
        total = CacheStats()
        for d in self.dirs:
            total.add(d.stats)
        return total

    def stats(self) -> dict[str, Any]:
        """Hit statistics summed over layers (tokens per step per layer, deduplicated across
        heads), the capacity and the bytes held."""
        return {**self.totals().as_dict(), "capacity_tokens": self.capacity, "bytes": self.nbytes,
                "layer_hit_rate": [round(d.stats.hit_rate, 4) for d in self.dirs]}

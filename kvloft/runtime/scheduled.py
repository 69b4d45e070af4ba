"""ScheduledAttention: TieredAttention whose decode reads retrieved rows through the scheduler.

The decode path takes its rows from scheduler/overlap.py's OverlapFetch (a GPU row cache,
copy streams, the search on a worker thread) instead of reading them in place; everything
else (prefill, indexes, rollback) is TieredAttention's. Session builds one for
RuntimeConfig(scheduler="overlap"); use_scheduler() swaps one in for benchmarks.
"""

from __future__ import annotations

from typing import Any

import torch

from kvloft.config import CacheConfig, ModelConfig, RetrievalConfig, RuntimeConfig
from kvloft.index.base import Retriever
from kvloft.kernels import KernelSet
from kvloft.runtime.attention import TieredAttention
from kvloft.scheduler.cache import RowCache
from kvloft.scheduler.overlap import OverlapFetch
from kvloft.scheduler.params import SchedulerParams
from kvloft.tiers.kvcache import TieredKVCache

__all__ = ["ScheduledAttention", "use_scheduler"]


class ScheduledAttention(TieredAttention):
    def __init__(self, cfg: ModelConfig, rcfg: RetrievalConfig, cache: TieredKVCache, retriever: Retriever,
                 ops: KernelSet, device: torch.device, profile: bool = False, *,
                 runtime: RuntimeConfig | None = None, cache_cfg: CacheConfig | None = None,
                 params: SchedulerParams | None = None) -> None:  # fmt: skip
        super().__init__(cfg, rcfg, cache, retriever, ops, device, profile)
        self.fetch = OverlapFetch(cfg, rcfg, cache, retriever, ops, device, self.timers, runtime=runtime,
                                  cache_cfg=cache_cfg, params=params)

    @classmethod
    def from_tiered(cls, base: TieredAttention, params: SchedulerParams | None = None, *,
                    runtime: RuntimeConfig | None = None, cache_cfg: CacheConfig | None = None) -> ScheduledAttention:
        """A scheduled backend over `base`'s tiers and retriever (built indexes kept)."""
        new = cls(base.cfg, base.rcfg, base.cache, base.retriever, base.ops, base.device, base.timers.sync,
                  runtime=runtime, cache_cfg=cache_cfg, params=params)
        new.indexes.adopt(base.indexes)
        new.sampler, new.decoding, new.scanned = base.sampler, base.decoding, base.scanned
        return new

    @property
    def rows(self) -> RowCache:
        """The GPU row cache of retrieved rows (hit statistics: rows.stats(), rows.totals())."""
        return self.fetch.rows

    def scheduler_stats(self) -> dict[str, Any]:
        """Row cache hit statistics, rows moved, fetch mode, where select ran."""
        return self.fetch.stats()


def use_scheduler(session, params: SchedulerParams | None = None) -> ScheduledAttention:
    """Give a session with a tiered backend a ScheduledAttention over the same tiers and
    retriever (indexes kept); returns it. For benchmarks comparing schedulers."""
    base = session.backend
    if not isinstance(base, TieredAttention):
        raise TypeError(f"use_scheduler needs a retrieval session, not method={session.retrieval.method!r}")
    base.close()  # a scheduled backend's search worker
    session.backend = ScheduledAttention.from_tiered(base, params, runtime=session.runtime,
                                                     cache_cfg=session.cache_cfg)
    return session.backend

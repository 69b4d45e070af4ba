"""A session's refusals before it allocates: context cap, host, disk and device budgets.

Every check runs before the call that would grow the session changes anything, and its
message names the numbers and the settings that would make room.
"""

from __future__ import annotations

import shutil

import torch

from kvloft.config import CacheConfig, RetrievalConfig, RuntimeConfig
from kvloft.kernels import KernelSet
from kvloft.runtime.attention import TieredAttention
from kvloft.runtime.dense import DenseAttention
from kvloft.runtime.loader import Model
from kvloft.scheduler.budget import (
    available_bytes,
    dense_kv_bytes,
    fmt_bytes,
    pick_prefill_chunk,
    plan_memory,
    static_tier_bytes,
)
from kvloft.scheduler.prefill_chunk import SELECTING_CHUNK_MAX, selecting
from kvloft.tiers.kvcache import TieredKVCache

__all__ = ["SessionLimits"]


class SessionLimits:
    def __init__(self, model: Model, retrieval: RetrievalConfig, runtime: RuntimeConfig, cache_cfg: CacheConfig,
                 ops: KernelSet) -> None:
        self.model, self.retrieval, self.runtime, self.cache_cfg, self.ops = model, retrieval, runtime, cache_cfg, ops

    def prefill_chunk(self, backend, n_tokens: int, n_new: int) -> int:
        """Tokens per prefill chunk for a feed of n_new tokens after n_tokens.

        RuntimeConfig.prefill_chunk when set; off CUDA its default (resolved_prefill_chunk), at
        most SELECTING_CHUNK_MAX where chunks select their host rows (a quality setting); on
        CUDA the memory plan's choice for the grown context (scheduler/budget.py
        pick_prefill_chunk: the largest of 16384 .. 512 whose workspace fits what
        gpu_memory_budget leaves), within the memory the device can still give: free memory
        plus the allocator's unused cache, less what the feed adds to the tiers and index."""
        rt, dev = self.runtime, self.model.device
        cfg, rcfg, n = self.model.config, self.retrieval, n_tokens + n_new
        if rt.prefill_chunk is not None:
            return rt.prefill_chunk
        if dev.type != "cuda":
            chunk = rt.resolved_prefill_chunk(dev)
            return min(chunk, SELECTING_CHUNK_MAX) if selecting(rcfg, n) else chunk
        cache = backend.bytes().get("row_cache", 0) if isinstance(backend, TieredAttention) else 0

        def resident(m: int) -> int:
            return plan_memory(cfg, rcfg, rt, m, self.model.dtype, cache_cfg=self.cache_cfg, cache_bytes=cache,
                               check=False).resident

        idle = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        free = available_bytes(dev) + idle - (resident(n) - resident(n_tokens))
        return pick_prefill_chunk(cfg, rcfg, rt, n, self.model.dtype, cache_cfg=self.cache_cfg, cache_bytes=cache,
                                  free_bytes=max(free, 0))

    def check_capacity(self, backend, n_tokens: int, n_new: int) -> None:
        """n_new more tokens after n_tokens: within max_context, dense growth, host and disk budgets."""
        cap = self.cache_cfg.max_context
        if cap and n_tokens + n_new > cap:
            raise ValueError(
                f"context would hold {n_tokens + n_new} tokens, over max_context={cap}; "
                "raise CacheConfig.max_context or feed less"
            )
        self.check_dense_growth(backend, n_tokens, n_new)
        budget = self.runtime.host_memory_budget
        if budget and isinstance(backend, TieredAttention):
            need = backend.cache.host_bytes_after(n_new)  # with a disk tier: at most the budget
            if need > budget:
                raise ValueError(self.host_refusal(backend.cache, n_tokens + n_new, need, budget))
            self.check_disk_space(backend.cache, n_tokens + n_new, n_new)

    def host_refusal(self, cache: TieredKVCache, n_total: int, need: int, budget: int) -> str:
        """Why the host tier would pass its budget, with the options that size it."""
        c, r, chunk = self.model.config, self.retrieval, self.cache_cfg.host_chunk_tokens
        row = cache.row_bytes  # K, V (model dtype or 8-bit codes + scales) and the position
        per_chunk = chunk * row * c.n_layers
        kv, packed = str(self.model.dtype)[6:], "set CacheConfig.host_dtype='fp8' or 'int8' to halve the host rows, "
        if self.cache_cfg.host_dtype is not None:
            kv, packed = f"{self.cache_cfg.host_dtype} + scales", ""
        return (
            f"{n_total} tokens need {fmt_bytes(need)} of host KV memory, over "
            f"host_memory_budget={fmt_bytes(budget)}. The host tier holds every token older than "
            f"n_sink + n_window = {r.n_sink + r.n_window} (RetrievalConfig) and grows by whole chunks of "
            f"CacheConfig.host_chunk_tokens={chunk} tokens, {fmt_bytes(per_chunk)} each over "
            f"{c.n_layers} layers ({row} bytes per token and layer: K, V in {kv} and the position). Lower "
            f"host_chunk_tokens, raise n_window, raise the budget, feed less, {packed}"
            "or set CacheConfig.disk_dir to spill older chunks to disk"
        )

    def check_disk_space(self, cache: TieredKVCache, n_total: int, n_new: int) -> None:
        """Refuse before prefill if the spilled chunks of n_new more tokens (n_total in all)
        would not fit on disk_dir's file system."""
        grow = cache.disk_bytes_after(n_new) - cache.bytes()["disk"]
        if grow <= 0:
            return
        free = shutil.disk_usage(self.cache_cfg.disk_dir).free
        if grow > free:
            raise ValueError(
                f"{n_total} tokens would spill {grow / 2**30:.2f} GiB more to disk_dir="
                f"{self.cache_cfg.disk_dir!r}, which has {free / 2**30:.2f} GiB free; free space there, "
                "raise host_memory_budget or feed less"
            )

    def check_disk_tier(self) -> None:
        """A disk tier only where the fetch can read spilled chunks."""
        if self.cache_cfg.disk_dir is None or self.retrieval.method == "dense":
            return
        zero_copy = self.model.device.type == "cuda" and self.ops.name == "triton"
        if self.runtime.scheduler == "overlap" and zero_copy:
            raise ValueError(
                "CacheConfig.disk_dir with scheduler='overlap' on CUDA: its zero-copy fetch reads pinned "
                "host memory, which spilled chunks are not; use scheduler='none' or kernels='reference' "
                "(staged fetch)"
            )

    def _itemsize(self) -> int:
        return torch.finfo(self.model.dtype).bits // 8

    def check_static_memory(self) -> None:
        """Refuse a static tier that cannot fit before it is allocated (reset() allocates it).

        It lives on the compute device: with the weights it counts against gpu_memory_budget,
        which bounds the compute device on the CPU too (host_memory_budget stays the host
        tier's: with a disk tier it sizes the chunks kept in memory); and it must fit the
        memory the device has free."""
        r, dev = self.retrieval, self.model.device
        evict = self.cache_cfg.resolved_evict_batch(dev)
        static = static_tier_bytes(self.model.config, r, evict, self._itemsize())
        what = (f"the static tier ({fmt_bytes(static)}: n_sink={r.n_sink} + n_window={r.n_window} + "
                f"evict_batch={evict} tokens in each of {self.model.config.n_layers} layers, on {dev.type})")
        fix = "lower RetrievalConfig.n_window (or n_sink, CacheConfig.evict_batch)"
        self.check_device_bytes(static, what, fix)

    def check_device_bytes(self, need: int, what: str, fix: str) -> None:
        """`need` more bytes on the compute device: within its budgets and its free memory."""
        dev, weights = self.model.device, self.model.weight_bytes
        gpu = self.runtime.gpu_memory_budget
        if gpu and weights + need > gpu:
            where = "" if dev.type == "cuda" else " (on the CPU it bounds the compute device, host memory)"
            raise ValueError(f"weights ({fmt_bytes(weights)}) + {what} exceed gpu_memory_budget="
                             f"{fmt_bytes(gpu)}{where}; {fix}, or raise the budget")
        free = available_bytes(dev)
        if need > free:
            raise ValueError(f"{what} exceeds the {fmt_bytes(free)} of memory {dev} has available; {fix}")

    def check_dense_growth(self, backend, n_tokens: int, n_new: int) -> None:
        """Dense KV for the grown context, before DenseKV doubles its capacity."""
        if not isinstance(backend, DenseAttention):
            return
        have = sum(s.nbytes() for s in backend.layers)
        need = dense_kv_bytes(self.model.config, n_tokens + n_new, self._itemsize())
        if need <= have:
            return
        what = (f"dense KV for {n_tokens + n_new} tokens ({fmt_bytes(need)} in capacity that "
                f"doubles, {fmt_bytes(have)} held now)")
        self.check_device_bytes(need, what, "feed less, or use a retrieval method other than 'dense' "
                                "(older tokens then go to the host tier)")

"""Static parameters of the decode scheduler (RuntimeConfig(scheduler="overlap"))."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from kvloft.config import parse_bytes

__all__ = ["CPU_SEARCH_METHODS", "FETCH_MODES", "SchedulerParams"]

FETCH_MODES = ("auto", "zero_copy", "staged", "host")

# Retrievers whose search runs on the CPU next to their index (numba, faiss): their
# select() goes to a worker thread while the GPU computes the static part of the layer.
CPU_SEARCH_METHODS = ("attention_graph", "faiss")


@dataclass(frozen=True)
class SchedulerParams:
    """How ScheduledAttention caches and moves retrieved rows.

    cache_bytes: the GPU row cache of all layers together, in bytes ("512MiB" or an int),
        or "auto": room for budget * H_kv tokens per layer (one step's largest union of
        per-head selections), shrunk to what RuntimeConfig.gpu_memory_budget leaves free
        (scheduler/budget.py). 0 = no cache: every selected row is fetched every step.
    fetch: how missing rows reach the compute device. "zero_copy": a Triton kernel reads
        them from pinned host memory (scheduler/rowcopy.py); "staged": a CPU gather into
        pinned staging buffers, then H2D copies on a copy stream; "host": a CPU gather on
        a CPU-only session; "auto": zero_copy with Triton kernels on CUDA, staged on CUDA
        otherwise, host on the CPU.
    gathered_rows: rows of one gathered buffer; 0 = budget * H_kv. Larger fetches (a
        covering budget, a Recycled full step) run in pieces of this many rows.
    regions: gathered buffers used in turn, so one piece's transfer can start while the
        previous piece's attention still reads its buffer.
    stage_rows: rows per pinned staging buffer (staged fetch): the CPU gathers a piece
        while the copy engine moves the previous one.
    stage_buffers: pinned staging buffers in the ring.
    search_pool: where select() runs. "auto": on a worker thread for CPU-side retrievers
        (CPU_SEARCH_METHODS), inline otherwise; "always"; "never".
    """

    cache_bytes: int | str = "auto"
    fetch: str = "auto"
    gathered_rows: int = 0
    regions: int = 2
    stage_rows: int = 2048
    stage_buffers: int = 3
    search_pool: str = "auto"

    def __post_init__(self) -> None:
        if self.cache_bytes != "auto":
            object.__setattr__(self, "cache_bytes", parse_bytes(self.cache_bytes))
        if self.fetch not in FETCH_MODES:
            raise ValueError(f"fetch must be one of {FETCH_MODES}, got {self.fetch!r}")
        if self.search_pool not in ("auto", "always", "never"):
            raise ValueError(f"search_pool must be 'auto', 'always' or 'never', got {self.search_pool!r}")
        for name, low in (("gathered_rows", 0), ("regions", 1), ("stage_rows", 1), ("stage_buffers", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")

    def replace(self, **changes: Any) -> SchedulerParams:
        return dataclasses.replace(self, **changes)

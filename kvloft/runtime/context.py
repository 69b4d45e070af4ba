"""What every room of TieredAttention reads and counts (runtime/attention.py composes them).

One object, shared by reference, so that a config replaced on the backend (a cluster stage
changes `rcfg.budget` per call) or a counter reset by rollback is seen by every room at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from kvloft.config import ModelConfig, RetrievalConfig
from kvloft.kernels import KernelSet
from kvloft.runtime.dense import Timers
from kvloft.runtime.model import rope_inv_freq
from kvloft.runtime.numerics import FiniteWatch


def _prefill_stats() -> dict[str, int]:
    return {"dense_chunks": 0, "sparse_chunks": 0, "host_keys": 0}


@dataclass(eq=False)
class AttentionContext:
    cfg: ModelConfig
    rcfg: RetrievalConfig  # replaceable: read it here at use, never keep a copy
    ops: KernelSet
    device: torch.device
    timers: Timers
    inv_freq: Tensor  # [D/2] fp32 on `device`, for position remapping
    scanned: int = 0  # keys the retriever scored, over all decode steps
    decoding: bool = False  # Session sets it: a one-token attend of a built layer is a decode step
    # prefill chunks attended densely / sparsely (exact positions; counted once per chunk, at
    # layer 0) and KV-head rows of the host tier read by prefill attention (all layers)
    prefill_stats: dict[str, int] = field(default_factory=_prefill_stats)
    finite: FiniteWatch = field(default_factory=FiniteWatch)  # keys and values appended while on

    @classmethod
    def make(cls, cfg: ModelConfig, rcfg: RetrievalConfig, ops: KernelSet, device: torch.device,
             profile: bool) -> AttentionContext:
        return cls(cfg, rcfg, ops, device, Timers(sync=profile and device.type == "cuda"),
                   rope_inv_freq(cfg).to(device))

    @property
    def scale(self) -> float:
        return self.cfg.head_dim**-0.5

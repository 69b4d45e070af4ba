"""The dense baseline and the timers every attention backend reports.

Timers          wall-clock seconds per category (Session.stats()["timings_s"])
DenseAttention  every token on the compute device, causal softmax (RetrievalConfig(method="dense"))
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch
from torch import Tensor

from kvloft.config import ModelConfig
from kvloft.kernels import KernelSet
from kvloft.runtime.numerics import FiniteWatch
from kvloft.tiers.dense import DenseKV


class Timers:
    """Wall-clock seconds per category.

    CPU ops are synchronous. With `sync` (CUDA), each region synchronizes the device on
    entry and exit so the breakdown is exact; that serializes work, so use it for
    breakdowns (RuntimeConfig.profile), not for end-to-end latency.
    """

    def __init__(self, sync: bool = False) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.sync = sync

    @contextmanager
    def __call__(self, name: str):
        if self.sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.seconds[name] += time.perf_counter() - t0

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 6) for k, v in self.seconds.items()}


class DenseAttention:
    """Attention over every token kept on the compute device (DenseKV per layer)."""

    def __init__(self, cfg: ModelConfig, ops: KernelSet, device: torch.device, dtype: torch.dtype,
                 profile: bool = False) -> None:
        self.layers = [DenseKV(cfg, device, dtype) for _ in range(cfg.n_layers)]
        self.ops = ops
        self.scale = cfg.head_dim**-0.5
        self.timers = Timers(sync=profile and device.type == "cuda")
        self.finite = FiniteWatch()  # keys and values appended while on (Session: prefill)

    def mark(self) -> int:
        """What rollback() needs to forget the tokens appended after now."""
        return self.n_tokens

    def rollback(self, mark: int) -> None:
        for store in self.layers:
            store.truncate(mark)

    def kv_rows(self, layer: int, t: int) -> tuple[Tensor, Tensor]:
        """The rows [t, H_kv, D] of layer's store the next attend() of t tokens keeps (the model
        writes a prefill chunk's k and v there: AttentionBackend.kv_rows)."""
        return self.layers[layer].rows(t)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        store = self.layers[layer]
        self.finite.see(k, v)
        store.append(k, v)
        kk, vv = store.kv()
        with self.timers("attention"):
            if q.shape[0] == 1:  # a decode token sees every key: the split-K decode kernel
                out, _ = self.ops.decode_attend(q[0], kk, vv, scale=self.scale)
                return out[None]
            # one causal call over every key, lower-right (the chunk is the last T keys); on CUDA
            # the flash kernel, K and V read in place for each query group (KernelSet.causal_attend)
            return self.ops.causal_attend(q, kk, vv, scale=self.scale)

    @property
    def n_tokens(self) -> int:
        return self.layers[0].n

    def bytes(self) -> dict[str, int]:
        return {"static": sum(s.nbytes() for s in self.layers), "host": 0}

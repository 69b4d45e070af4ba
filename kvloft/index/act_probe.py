"""ActQKV's activation-aware probe weights (index/actqkv.py): each window query's activation
bias against running per-channel statistics of the layer's queries."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["QueryStats", "activation_bias"]


def activation_bias(window: Tensor, mean: Tensor, var: Tensor, var_floor: float) -> Tensor:
    """phi of each window query per head: window [W, H_q, D], mean/var [H_q, D] -> [W, H_q]."""
    denom = var + var.mean(dim=-1, keepdim=True) * var_floor
    return ((window - mean) ** 2 / denom.clamp_min(torch.finfo(torch.float32).tiny)).mean(dim=-1)


@dataclass
class QueryStats:
    """Running per-channel mean and variance (Welford, batched) of one layer's queries [H_q, D]."""

    count: int = 0
    mean: Tensor | None = None  # [H_q, D] fp64
    m2: Tensor | None = None  # [H_q, D] fp64

    def update(self, x: Tensor) -> None:
        """x [m, H_q, D]."""
        x = x.double()
        n_b, mean_b = x.shape[0], x.mean(dim=0)
        m2_b = ((x - mean_b) ** 2).sum(dim=0)
        if self.count == 0:
            self.count, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta**2 * (self.count * n_b / n)
        self.count = n

    @property
    def var(self) -> Tensor:
        return self.m2 / self.count

"""`DenseKV`, the dense baseline's store: every token of one layer on the compute device,
contiguous (no tiers, no retrieval)."""

from __future__ import annotations

import torch
from torch import Tensor

from kvloft.config import ModelConfig

__all__ = ["DenseKV"]


class DenseKV:
    """All tokens of one layer on the compute device, contiguous (capacity doubles)."""

    def __init__(self, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, capacity: int = 1024):
        shape = (capacity, cfg.n_kv_heads, cfg.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.n = 0

    def append(self, k: Tensor, v: Tensor) -> None:
        need = self.n + k.shape[0]
        if need > self.k.shape[0]:
            cap = max(need, 2 * self.k.shape[0])
            for name in ("k", "v"):
                old = getattr(self, name)
                new = torch.empty((cap, *old.shape[1:]), dtype=old.dtype, device=old.device)
                new[: self.n] = old[: self.n]
                setattr(self, name, new)
        self.k[self.n : need] = k
        self.v[self.n : need] = v
        self.n = need

    def kv(self) -> tuple[Tensor, Tensor]:
        return self.k[: self.n], self.v[: self.n]

    def truncate(self, n: int) -> None:
        """Forget rows n.. (a session rolling back a failed call); capacity is kept."""
        self.n = min(self.n, n)

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

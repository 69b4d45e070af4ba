"""`DenseKV`, the dense baseline's store: every token of one layer on the compute device,
contiguous (no tiers, no retrieval)."""

from __future__ import annotations

import torch
from torch import Tensor

from kvloft.config import ModelConfig

__all__ = ["MIN_CAPACITY", "DenseKV", "dense_capacity"]

MIN_CAPACITY = 1024  # rows of a new DenseKV


def dense_capacity(n: int) -> int:
    """Rows DenseKV grows to for n rows: the smallest power of two >= n, at least MIN_CAPACITY.
    The memory plan (scheduler/budget.py) prices this capacity; growing to 2x the old one or to
    `need` itself instead (the earlier rule) could reach 1.5x it (3000 rows, then one more: 6000
    where the plan counted 4096)."""
    return max(MIN_CAPACITY, 1 << max(0, n - 1).bit_length())


class DenseKV:
    """All tokens of one layer on the compute device, contiguous (grown to dense_capacity: the
    old buffer is at most half the new one while both are held)."""

    def __init__(self, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, capacity: int = MIN_CAPACITY):
        shape = (capacity, cfg.n_kv_heads, cfg.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.n = 0

    def rows(self, t: int) -> tuple[Tensor, Tensor]:
        """The next t rows of k and v [t, H_kv, D] (capacity grown to hold them; n unchanged):
        write a chunk's keys and values there and append() keeps them without a copy."""
        need = self.n + t
        if need > self.k.shape[0]:
            cap = dense_capacity(need)
            for name in ("k", "v"):
                old = getattr(self, name)
                new = torch.empty((cap, *old.shape[1:]), dtype=old.dtype, device=old.device)
                if self.n:  # (an empty store: no copy op at all)
                    new[: self.n] = old[: self.n]
                setattr(self, name, new)
        return self.k[self.n : need], self.v[self.n : need]

    def append(self, k: Tensor, v: Tensor) -> None:
        """k, v [t, H_kv, D] after the rows held: copied in, unless they are rows(t) themselves."""
        t = k.shape[0]
        if not (self._next_rows(k, self.k) and self._next_rows(v, self.v)):
            dk, dv = self.rows(t)
            dk.copy_(k)
            dv.copy_(v)
        self.n += t

    def _next_rows(self, x: Tensor, buf: Tensor) -> bool:
        """x is buf's rows n..n+t as rows(t) gave them (contiguous, within the capacity)."""
        t = x.shape[0]
        return (x.data_ptr() == buf.data_ptr() + self.n * buf.stride(0) * buf.element_size()
                and self.n + t <= buf.shape[0] and x.shape[1:] == buf.shape[1:] and x.dtype == buf.dtype
                and x.is_contiguous() and x.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr())

    def kv(self) -> tuple[Tensor, Tensor]:
        return self.k[: self.n], self.v[: self.n]

    def truncate(self, n: int) -> None:
        """Forget rows n.. (a session rolling back a failed call); capacity is kept."""
        self.n = min(self.n, n)

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

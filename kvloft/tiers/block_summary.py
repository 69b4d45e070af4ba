"""Block summary of a host tier: the mean key of every `block` host rows, per KV head.

Sparse prefill (runtime/exact_prefill.py) scores blocks by their mean key before it reads
any of their rows. LayerTiers.block_summary (tiers/layer_tiers.py) makes one on first use and
updates it from the evicted rows as they leave the window, so it never reads the host tier.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["BlockSummary"]


class BlockSummary:
    """Mean key of every `block` consecutive host rows, per KV head, on the compute device.

    Block b holds rows [b * block, (b + 1) * block); the last one may be partial (its mean
    is over the rows it has). Means are kept in the keys' dtype ([capacity, H_kv, D],
    capacity doubling: 1/block of the host keys' bytes), the open block's sum in fp32.
    """

    def __init__(self, block: int, row_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        self.block = block
        self._means = torch.empty((0, *row_shape), dtype=dtype, device=device)
        self._tail = torch.zeros(row_shape, dtype=torch.float32, device=device)  # open block's sum
        self.n = 0  # rows summarized

    @property
    def n_blocks(self) -> int:
        return -(-self.n // self.block)

    @property
    def nbytes(self) -> int:
        return self._means.numel() * self._means.element_size() + self._tail.numel() * 4

    def add(self, k: Tensor) -> None:
        """Rows k [m, H_kv, D] (host rows n .. n + m - 1; any device)."""
        m, b = k.shape[0], self.block
        if m == 0:
            return
        first, last = self.n // b, (self.n + m - 1) // b  # blocks touched
        kf = k.to(self._means.device, torch.float32)
        rel = (self.n + torch.arange(m, device=kf.device)) // b - first  # [m] block of each row
        sums = torch.zeros((last - first + 1, *kf.shape[1:]), dtype=torch.float32, device=kf.device)
        sums.index_add_(0, rel, kf)
        sums[0] += self._tail
        ends = torch.arange(first + 1, last + 2, device=kf.device) * b
        counts = ends.clamp(max=self.n + m) - torch.arange(first, last + 1, device=kf.device) * b
        self._reserve(last + 1)
        self._means[first : last + 1] = (sums / counts.view(-1, *[1] * (kf.dim() - 1))).to(self._means.dtype)
        self.n += m
        self._tail = sums[-1] if self.n % b else torch.zeros_like(self._tail)

    def mark(self) -> tuple[int, Tensor]:
        """What rollback() needs to forget the rows added after now: (n, the open block's sum)."""
        return self.n, self._tail.clone()

    def rollback(self, mark: tuple[int, Tensor]) -> None:
        """Back to mark(): later rows forgotten, the open block's mean as it was (bit for bit:
        add() stored it as that sum / its count)."""
        n, tail = mark
        if n % self.block:
            self._means[n // self.block] = (tail / (n % self.block)).to(self._means.dtype)
        self.n, self._tail = n, tail

    def _reserve(self, n_blocks: int) -> None:
        if n_blocks > self._means.shape[0]:
            new = torch.empty((max(n_blocks, 2 * self._means.shape[0]), *self._means.shape[1:]),
                              dtype=self._means.dtype, device=self._means.device)
            new[: self._means.shape[0]] = self._means
            self._means = new

    def means(self) -> Tensor:
        """[n_blocks, H_kv, D] mean key of each block (a view)."""
        return self._means[: self.n_blocks]

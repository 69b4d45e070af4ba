"""A strided sample of prefill queries per layer, for retrievers that learn from queries."""

from __future__ import annotations

import torch
from torch import Tensor


class QuerySampler:
    """Keeps a strided sample of prefill queries per layer, at most `cap` tokens.

    Every `stride`-th token is kept; when the sample passes `cap`, every other kept
    token is dropped and the stride doubles, so the sample stays uniform over the prompt.
    """

    def __init__(self, n_layers: int, cap: int) -> None:
        self.cap = cap
        self.stride = 1
        self.kept: list[list[Tensor]] = [[] for _ in range(n_layers)]
        self.pos: list[list[Tensor]] = [[] for _ in range(n_layers)]

    def observe(self, layer: int, q: Tensor, positions: Tensor) -> tuple[Tensor, Tensor] | None:
        """Keeps the strided part of a prefill chunk's queries q [T, H_q, D] at positions [T];
        returns it (queries [m, H_q, D], positions [m] on the CPU; None when cap is 0), for an
        index fed chunk by chunk."""
        if self.cap == 0:
            return None
        m = positions % self.stride == 0
        kept_q, kept_pos = q[m].to("cpu"), positions[m].to("cpu")
        self.kept[layer].append(kept_q)
        self.pos[layer].append(kept_pos)
        if sum(len(p) for p in self.pos[layer]) > self.cap and layer == len(self.kept) - 1:
            self.stride *= 2
            for i in range(len(self.kept)):
                qs, ps = torch.cat(self.kept[i]), torch.cat(self.pos[i])
                m2 = ps % self.stride == 0
                self.kept[i], self.pos[i] = [qs[m2]], [ps[m2]]
        return kept_q, kept_pos

    def final_stride(self, total: int) -> int:
        """The stride the sample will have once positions 0..total-1 are all observed: the
        smallest power of two, from the current one, that keeps at most `cap` tokens."""
        s = self.stride
        while -(-total // s) > self.cap:
            s *= 2
        return s

    def final_part(self, sample: tuple[Tensor, Tensor], total: int) -> tuple[Tensor, Tensor]:
        """Of a chunk's kept queries [m, H_q, D] and positions [m] (observe()), those the sample
        still holds at the end of a feed of `total` tokens: an index fed chunk by chunk then
        learns from the queries a build() after prefill would get, and no more."""
        q, pos = sample
        keep = pos % self.final_stride(total) == 0
        return q[keep], pos[keep]

    def replace(self, layer: int, q: Tensor | None) -> None:
        """This layer's sample set to q [M, H_q, D] (None: empty), without positions: for a
        replica rebuilt from recorded samples (exact positions only; extrapolation needs them)."""
        self.kept[layer] = [] if q is None else [q]
        self.pos[layer] = []

    def sample(self, layer: int) -> Tensor | None:
        """Queries [H_q, M, D] of this layer, or None if none were kept."""
        if not self.kept[layer]:
            return None
        return torch.cat(self.kept[layer]).transpose(0, 1).contiguous()

    def sample_positions(self, layer: int) -> Tensor | None:
        """Positions [M] of sample(layer)'s queries, or None."""
        return torch.cat(self.pos[layer]) if self.pos[layer] else None

    def clear(self) -> None:
        for lst in (*self.kept, *self.pos):
            lst.clear()

    def mark(self) -> tuple[int, list[list[Tensor]], list[list[Tensor]]]:
        """The sample now (lists of the same tensors: observe() never changes one in place)."""
        return self.stride, [list(x) for x in self.kept], [list(x) for x in self.pos]

    def rollback(self, mark: tuple[int, list[list[Tensor]], list[list[Tensor]]]) -> None:
        self.stride, self.kept, self.pos = mark[0], [list(x) for x in mark[1]], [list(x) for x in mark[2]]

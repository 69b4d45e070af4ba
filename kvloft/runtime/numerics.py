"""Non-finite numbers in a session's forward pass: detected once per step, reported clearly.

NaN or inf weights, or keys and values that overflow (float16), would otherwise flow into
the tiers and the logits, and greedy decoding would emit token 0 forever. A backend keeps
a FiniteWatch: while it is on (prefill), every key and value appended is folded into one
device-side flag, read once per prefill chunk together with the chunk's logits (one host
sync per chunk). Decode checks the logits it already copies to the host for sampling.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["FiniteWatch", "NonFiniteError", "finite_sum"]


class NonFiniteError(FloatingPointError):
    """NaN or inf in keys, values or logits; the session call that met it was rolled back."""


def finite_sum(t: Tensor) -> Tensor:
    """A 0-dim fp64 on t's device that is finite iff every element of t is (NaN or +-inf
    propagate through the sum; a sum of fp32, bf16 or fp16 values cannot overflow fp64, so a
    finite t never reads as non-finite; fp64 elements near 1e308 could). One reduction pass:
    ~6x faster on the CPU than torch.isfinite(t).all(), which makes four passes and a mask."""
    return t.sum(dtype=torch.float64)


class FiniteWatch:
    """Folds `see(t)` calls into one device-side sum: was any element non-finite?"""

    def __init__(self) -> None:
        self.on = False
        self._sum: Tensor | None = None  # 0-dim fp64 on the compute device (finite_sum)

    def see(self, *tensors: Tensor) -> None:
        if not self.on:
            return
        for t in tensors:
            s = finite_sum(t)
            self._sum = s if self._sum is None else self._sum + s

    def take(self) -> bool:
        """True if anything seen since the last take() was non-finite (reads the sum: one sync)."""
        s, self._sum = self._sum, None
        return s is not None and not bool(torch.isfinite(s))

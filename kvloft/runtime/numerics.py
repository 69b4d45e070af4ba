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

__all__ = ["FiniteWatch", "NonFiniteError"]


class NonFiniteError(FloatingPointError):
    """NaN or inf in keys, values or logits; the session call that met it was rolled back."""


class FiniteWatch:
    """Folds `see(t)` calls into one device-side flag: was any element non-finite?"""

    def __init__(self) -> None:
        self.on = False
        self._bad: Tensor | None = None  # 0-dim bool on the compute device

    def see(self, *tensors: Tensor) -> None:
        if not self.on:
            return
        for t in tensors:
            bad = ~torch.isfinite(t).all()
            self._bad = bad if self._bad is None else self._bad | bad

    def take(self) -> bool:
        """True if anything seen since the last take() was non-finite (reads the flag: one sync)."""
        bad, self._bad = self._bad, None
        return bad is not None and bool(bad)

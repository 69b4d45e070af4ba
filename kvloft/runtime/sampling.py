"""The next token from a session's logits: greedy, temperature, nucleus (top_p)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kvloft.runtime.inputs import generation_stops

__all__ = ["check_generate_args", "sample_token"]


def check_generate_args(max_new_tokens: int, temperature: float, top_p: float, stop: Sequence[str] | str | None,
                        seed: int | None, last_logits: Tensor | None) -> list[str]:
    """The stop strings of a generate call whose arguments are valid and that has logits
    [V] to continue from; ValueError/TypeError naming the argument otherwise."""
    stops = generation_stops(max_new_tokens, temperature, top_p, stop, seed)
    if last_logits is None:
        raise ValueError("nothing to continue from: feed a prompt before generating")
    return stops


def sample_token(logits: Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """A token id from finite logits [V] (fp32, CPU): argmax at temperature 0, else drawn with
    `gen` from softmax(logits / temperature) cut to the smallest set holding top_p of it."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sp, si = probs.sort(descending=True)
        keep = sp.cumsum(0) - sp < top_p
        probs = torch.zeros_like(probs).scatter_(0, si[keep], sp[keep])
    return int(torch.multinomial(probs, 1, generator=gen))

"""Next-token choice for one served sequence: sampling as Session.stream does, and logprobs.

    sampler = TokenSampler(temperature=0.7, top_p=0.9, seed=3)
    token = sampler.sample(logits)                       # logits [V] fp32 (any device)
    entry = token_logprobs(logits, token, k=5)           # chosen token's logprob and the top 5

Sampling draws from the same generator, in the same order, as Session._sample, so a served
answer equals Session.generate with the same arguments and seed. Logprobs are those of the
model's own distribution (log-softmax of the raw logits, before temperature and top_p), as
OpenAI reports them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvloft.runtime.numerics import NonFiniteError

MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top_logprobs


class TokenSampler:
    """Greedy (temperature 0) or temperature / nucleus sampling from one seeded generator."""

    def __init__(self, temperature: float, top_p: float, seed: int) -> None:
        self.temperature, self.top_p = temperature, top_p
        self.gen = torch.Generator().manual_seed(seed)

    def sample(self, logits: Tensor) -> int:
        """logits [V] (fp32 or lower, any device) -> a token id. NonFiniteError on NaN/inf."""
        logits = logits.float().cpu()
        if not bool(torch.isfinite(logits).all()):
            raise NonFiniteError("non-finite numbers (NaN or inf) in the logits of a decode step: the model's "
                                 "weights hold NaN/inf or its dtype overflowed; the request was rolled back")
        if self.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / self.temperature, dim=-1)
        if self.top_p < 1:
            sp, si = probs.sort(descending=True)
            keep = sp.cumsum(0) - sp < self.top_p
            probs = torch.zeros_like(probs).scatter_(0, si[keep], sp[keep])
        return int(torch.multinomial(probs, 1, generator=self.gen))


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its id, its logprob, and the k most likely ids with theirs."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def token_logprobs(logits: Tensor, token: int, k: int) -> TokenLogprob:
    """logits [V] -> the logprob of `token` and the top k (0 <= k <= MAX_TOP_LOGPROBS)."""
    if not 0 <= k <= MAX_TOP_LOGPROBS:
        raise ValueError(f"k must lie in [0, {MAX_TOP_LOGPROBS}], got {k}")
    lp = torch.log_softmax(logits.float().cpu(), dim=-1)  # [V]
    top = torch.topk(lp, k) if k else None
    pairs = tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else ()
    return TokenLogprob(token=token, logprob=float(lp[token]), top=pairs)

"""Shared by the session fork and save/restore tests: the tiny model's session settings (prefill
in chunks of 64, several host chunks per layer), a prompt, a session fed it and decoded a few
greedy steps, and greedy decoding that records the tokens and logits."""

import torch

from kvloft import CacheConfig, RetrievalConfig, RuntimeConfig, Session

RUNTIME = RuntimeConfig(prefill_chunk=64, progress=False)
CACHE = CacheConfig(host_chunk_tokens=64)  # several host chunks per layer
TIERED = {"budget": 24, "n_sink": 4, "n_window": 32}  # under the 200-token prompts: the ring wraps


def prompt_ids(model, n: int, seed: int = 0) -> torch.Tensor:
    """[n] int64 token ids, uniform over the vocabulary (a fixed generator: no global RNG)."""
    return torch.randint(0, model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


def greedy(s: Session, n: int) -> tuple[list[int], torch.Tensor]:
    """n greedy steps of s: the tokens fed and the logits [n, V] each step returned."""
    ids, logits = [], []
    for _ in range(n):
        t = int(s.last_logits.argmax())
        logits.append(s.step(t).clone())
        ids.append(t)
    return ids, torch.stack(logits) if logits else torch.empty(0)


def fed(model, rcfg: RetrievalConfig, prompt: torch.Tensor, steps: int = 0) -> Session:
    """A session of rcfg fed prompt [T], then `steps` greedy steps (decode state: the ring
    wrapped, the retriever's caches warm)."""
    s = Session(model, rcfg, RUNTIME, CACHE)
    s.feed(prompt)
    greedy(s, steps)
    return s

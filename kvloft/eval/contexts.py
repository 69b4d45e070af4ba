"""One prompt's sessions for `kvloft eval`: one dense prefill forked into every method, or a
prefill per method.

Prefill dominates a long-context evaluation (a 32K prompt costs the 0.5B Qwen on an H100 far
more in prefill than in the few dozen decode steps of an answer), so by default (`kvloft eval
--prefill shared`) a prompt is prefilled once, with dense attention under the runtime
(chunking) and tier settings every method uses, and each method's session is a fork of it
(Session.fork: its tiers and index built from the dense K/V, kvloft/runtime/fork.py), decoded
and dropped before the next. Where the method's own prefill is dense too (exact positions, a
prompt within its prefill_dense_tokens, full-precision host rows: the default at 32K and below)
the fork holds the K/V that prefill would compute, up to float rounding, and decodes as it.

A method the fork refuses prefills on its own, and its context says why: remapped positions
(`+x` methods), an index that learns from prefill queries (attention_graph, actqkv), an int8/fp8
host tier, a prompt past prefill_dense_tokens, a limit. The dense method decodes the shared
session itself, after every fork is made, so it costs no copy.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from kvloft.config import CacheConfig, RetrievalConfig, RuntimeConfig

__all__ = ["PREFILL_MODES", "Context", "own_context", "shared_contexts"]

PREFILL_MODES = ("shared", "own")


@dataclass
class Context:
    """A session holding one prompt, ready to decode, and how it got there."""

    session: Any  # kvloft.Session
    prompt_tokens: int
    prefill_s: float  # seconds of the prefill it holds (the shared one for a fork)
    prefill: str  # "shared": the prompt's one dense prefill (that session or a fork of it); "own"
    fork_s: float | None = None  # seconds Session.fork took (tiers and index built from the dense K/V)
    note: str | None = None  # shared mode, prefill "own": why this method could not fork


def own_context(model, prompt: str, rcfg: RetrievalConfig, runtime: RuntimeConfig,
                cache: CacheConfig | None, note: str | None = None) -> Context:
    """A fresh session of `rcfg` fed `prompt` (its own chunked prefill)."""
    from kvloft.runtime.session import Session

    s = Session(model, rcfg, runtime, cache)
    n = s.feed(prompt)
    return Context(s, n, s.stats()["timings_s"]["prefill_s"], "own", note=note)


def shared_contexts(model, prompt: str, rcfgs: Sequence[RetrievalConfig], dense: RetrievalConfig,
                    runtime: RuntimeConfig, cache: CacheConfig | None) -> Iterator[tuple[int, Context]]:
    """(i, context of rcfgs[i]) for every config, each once; drop a context before asking for the
    next (only the shared session outlives it). dense: the shared session's config (a dense one).

    Order: configs the fork refuses whatever the prompt (their own prefill runs before the
    shared one, so the two never hold the device at once), then forks in the given order, then
    the dense configs (the last of them decodes the shared session itself)."""
    from kvloft.runtime.fork import rebuild_blockers
    from kvloft.runtime.session import Session

    if dense.method != "dense":
        raise ValueError(f"the shared prefill must be dense, got method={dense.method!r}")
    parent = Session(model, dense, runtime, cache)
    tiered = [i for i, r in enumerate(rcfgs) if r.method != "dense"]
    dense_ids = [i for i, r in enumerate(rcfgs) if r.method == "dense"]
    blocked = {i: why for i in tiered if (why := rebuild_blockers(parent, rcfgs[i]))}  # unfed: config reasons
    for i, why in blocked.items():
        yield i, own_context(model, prompt, rcfgs[i], runtime, cache, note="; ".join(why))
    forks = [i for i in tiered if i not in blocked]
    if not forks and not dense_ids:
        return
    n = parent.feed(prompt)
    prefill_s = parent.stats()["timings_s"]["prefill_s"]
    for i in forks:
        yield i, _fork_context(parent, rcfgs[i], n, prefill_s, prompt)
    for j, i in enumerate(dense_ids):
        last = j == len(dense_ids) - 1
        if last and rcfgs[i] == parent.retrieval:
            s, parent = parent, None  # the caller's reference is the last one: dropped after decoding
            yield i, Context(s, n, prefill_s, "shared")
            del s
        else:
            yield i, _fork_context(parent, rcfgs[i], n, prefill_s, prompt)


def _fork_context(parent, rcfg: RetrievalConfig, n: int, prefill_s: float, prompt: str) -> Context:
    """The parent forked into rcfg, or rcfg's own prefill with the reason where fork refuses."""
    t0 = time.perf_counter()
    try:
        child = parent.fork(rcfg)
    except ValueError as e:
        return own_context(parent.model, prompt, rcfg, parent.runtime, parent.cache_cfg, note=str(e))
    return Context(child, n, prefill_s, "shared", fork_s=time.perf_counter() - t0)

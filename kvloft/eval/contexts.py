"""One prompt's sessions for `kvloft eval`: one dense prefill forked into every method, or a
prefill per method.

Every method of a grid reads the same prompt, so by default (`kvloft eval --prefill shared`) a
prompt is prefilled once (on the CPU that cut a run's wall time by 38-53%; on a GPU shared by
many eval processes decoding is most of a run and the saving is smaller: docs/evaluation.md),
with dense attention under the runtime (chunking) and tier settings every method uses, and each
method's session is a fork of it (Session.fork: its tiers and index built from the dense K/V,
kvloft/runtime/fork.py), decoded and dropped before the next. Where the method's own prefill is
dense too (exact positions, a prompt within its prefill_dense_tokens, full-precision host rows:
the default at 32K and below) the fork holds the K/V that prefill would compute, up to float
rounding, and decodes as it.

A method the fork refuses prefills on its own, and its context says why: remapped positions
(`+x` methods), an index that learns from prefill queries (attention_graph, actqkv), an int8/fp8
host tier, a prompt past prefill_dense_tokens, a limit. The dense method decodes a copy of the
shared session (Session.fork(), the dense K/V once more) while forks are still to come, else
that session itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from kvloft.config import CacheConfig, RetrievalConfig, RuntimeConfig

__all__ = ["PREFILL_MODES", "Context", "own_context", "shared_contexts"]

PREFILL_MODES = ("shared", "own")
log = logging.getLogger(__name__)


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
    """(i, context of rcfgs[i]) for every config in order; drop a context before asking for the
    next (only the shared session outlives it). dense: the shared session's config (a dense one).

    The shared session is prefilled when a config first needs it and dropped once no later one
    does: a dense config decodes a copy of it (Session.fork()) while forks are still to come,
    else the session itself; a config the fork refuses whatever the prompt (rebuild_blockers
    on the unfed session: remapped positions, a quantized host tier) never makes it prefill."""
    from kvloft.runtime.fork import rebuild_blockers
    from kvloft.runtime.session import Session

    if dense.method != "dense":
        raise ValueError(f"the shared prefill must be dense, got method={dense.method!r}")
    parent = Session(model, dense, runtime, cache)
    blocked = {i: why for i, r in enumerate(rcfgs) if r.method != "dense" and (why := rebuild_blockers(parent, r))}
    users = [i for i in range(len(rcfgs)) if i not in blocked]  # configs that read the shared session
    n = prefill_s = 0
    for i, rcfg in enumerate(rcfgs):
        if i in blocked:
            yield i, own_context(model, prompt, rcfg, runtime, cache, note="; ".join(blocked[i]))
            continue
        if not parent.tokens:
            n = parent.feed(prompt)
            prefill_s = parent.stats()["timings_s"]["prefill_s"]
        if i != users[-1]:
            yield i, _fork_context(parent, rcfg, n, prefill_s, prompt)
            continue
        # the shared session's last reader: the session itself where it is of its config, then gone
        s, parent = parent, None
        yield i, (Context(s, n, prefill_s, "shared") if rcfg == s.retrieval
                  else _fork_context(s, rcfg, n, prefill_s, prompt))
        del s


def _fork_context(parent, rcfg: RetrievalConfig, n: int, prefill_s: float, prompt: str) -> Context:
    """The parent forked into rcfg, or rcfg's own prefill with the reason where fork refuses."""
    t0 = time.perf_counter()
    try:
        child = parent.fork(rcfg)
    except ValueError as e:  # a refusal (fork.py names every reason)
        return own_context(parent.model, prompt, rcfg, parent.runtime, parent.cache_cfg, note=str(e))
    except Exception as e:  # noqa: BLE001  a failing fork costs this method its shared prefill, not the run
        log.warning("fork into %s failed, prefilling on its own: %s: %s", rcfg.method, type(e).__name__, e)
        return own_context(parent.model, prompt, rcfg, parent.runtime, parent.cache_cfg,
                           note=f"the fork failed: {type(e).__name__}: {e}")
    return Context(child, n, prefill_s, "shared", fork_s=time.perf_counter() - t0)

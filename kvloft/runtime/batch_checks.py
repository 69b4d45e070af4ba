"""The checks of a batched step's input, run before anything changes (runtime/engine.py).

    pairs = check_pairs(pairs, model, max_batch)     # [(session, token id)], range-checked
    check_sessions(sessions, "generate", model, max_batch)

A batch is refused whole, naming the item and the fix: an empty list or more than max_batch
items, an item that is not a plain kvloft.Session of this model, a session twice, an unfed
session, a token that is not an int in the vocabulary, a session with no room for one more token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from kvloft.runtime.loader import Model
from kvloft.runtime.session import Session

__all__ = ["check_pairs", "check_sessions", "is_int"]


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _token(t: Any) -> int:
    """A token id given as a Python int or a 0-dim integer tensor."""
    if isinstance(t, Tensor) and t.dim() == 0 and not t.is_floating_point() and t.dtype != torch.bool:
        return int(t)
    if not is_int(t):
        raise TypeError(f"a token must be an int (or a 0-dim integer tensor), got {type(t).__name__} {t!r}")
    return t


def check_sessions(sessions: Sequence[Any], what: str, model: Model, max_batch: int) -> None:
    """Sessions of `model`, plain Session decode path, each once, at most max_batch."""
    if not sessions:
        raise ValueError(f"{what} needs at least one session")
    if len(sessions) > max_batch:
        raise ValueError(f"{what} got {len(sessions)} sessions, over max_batch={max_batch}; "
                         "split them over several calls or make an Engine with a larger max_batch")
    seen: dict[int, int] = {}
    for b, s in enumerate(sessions):
        if not isinstance(s, Session):
            raise TypeError(f"{what}: item {b} must be a kvloft.Session, got {type(s).__name__}")
        if type(s)._forward is not Session._forward:
            raise TypeError(f"{what}: session {b} is a {type(s).__name__}, which runs its own forward "
                            "pass; decode it alone with session.step()")
        if s.model is not model:
            raise ValueError(f"{what}: session {b} belongs to another model object ({s.model.source}) than "
                             f"this engine's ({model.source}; each load_model call makes a new one); "
                             "step it with an Engine made for its model: kvloft.Engine(session.model)")
        if id(s) in seen:
            raise ValueError(f"{what}: session {b} is the same session as item {seen[id(s)]}; a session "
                             "appends one token per step: pass each session once")
        seen[id(s)] = b
        if s.last_logits is None:
            raise ValueError(f"{what}: session {b} has no context; feed it a prompt first")


def check_pairs(pairs: Sequence[Any], model: Model, max_batch: int) -> list[tuple[Session, int]]:
    """(session, token) pairs -> [(session, token id)], each session checked as check_sessions
    does and each token range-checked, each session with room for one more token."""
    if not isinstance(pairs, Sequence) or isinstance(pairs, (str, bytes)):
        raise TypeError(f"step takes a list of (session, token) pairs, got {type(pairs).__name__}")
    for b, p in enumerate(pairs):
        if not isinstance(p, (tuple, list)) or len(p) != 2:
            raise TypeError(f"step: item {b} must be a (session, token) pair, got {p!r}")
    check_sessions([s for s, _ in pairs], "step", model, max_batch)
    out = []
    for b, (s, t) in enumerate(pairs):
        try:
            tok = s._to_ids([_token(t)])[0]  # range-checked against the vocabulary
            s._check_capacity(1)  # max_context, host budget, disk space, dense growth
        except (TypeError, ValueError) as e:
            e.add_note(f"in pair {b} of the step (a session of {len(s)} tokens); no session was changed")
            raise
        out.append((s, tok))
    return out

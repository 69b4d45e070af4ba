"""The server's limits on every size a request controls, checked before anything is allocated.

    limits = Limits(max_context=32768, max_window=4096)
    limits.check_retrieval({"n_window": 20000})   # LimitExceeded naming `kvloft serve --max-window`

A request may ask for a static tier (n_sink + n_window tokens per layer), a retrieval budget,
a prompt, an answer (max_tokens), a new session, and spilled bytes when its session is
evicted. Each has a limit here; a request over one is refused with HTTP 400 whose message
names the limit and the command-line option that raises it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from kvloft.config import RetrievalConfig, parse_bytes


class LimitExceeded(ValueError):
    """A request asks for more than one of the server's limits allows (HTTP 400)."""

    def __init__(self, what: str, value: int, limit: int, option: str, param: str | None = None,
                 fix: str = "ask for less") -> None:
        super().__init__(f"{what}={value} is over this server's limit of {limit}; {fix}, or start the "
                         f"server with a higher `kvloft serve {option}`")
        self.param = param


# field -> (what the user asked, the option raising it, the request field)
_RETRIEVAL = {"n_window": ("max_window", "--max-window"), "n_sink": ("max_sink", "--max-sink"),
              "budget": ("max_budget", "--max-budget")}


@dataclass(frozen=True)
class Limits:
    """The largest sizes one request may ask for (all must be >= 1).

    max_context: tokens a session may hold: what it holds + the new prompt + max_tokens.
    max_window / max_sink / max_budget: a session's n_window, n_sink, retrieval budget.
    max_tokens: a request's max_tokens (max_completion_tokens).
    max_stored_sessions: named sessions kept at once, resident or spilled to disk.
    spill_limit: bytes of sessions spilled to disk (int or '8GiB').
    max_n: choices of one request (`n`); each choice beyond the first prefills its own session.
    """

    max_context: int = 32768
    max_window: int = 4096
    max_sink: int = 1024
    max_budget: int = 4096
    max_tokens: int = 4096
    max_stored_sessions: int = 64
    spill_limit: int | str = "8GiB"
    max_n: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "spill_limit", parse_bytes(self.spill_limit))
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{f.name} must be an int >= 1, got {value!r}")

    def check_retrieval(self, asked: dict[str, Any] | RetrievalConfig) -> None:
        """Refuse a static tier or budget over the limits (asked: RetrievalConfig fields)."""
        get = asked.get if isinstance(asked, dict) else lambda k: getattr(asked, k, None)
        for key, (limit_name, option) in _RETRIEVAL.items():
            value = get(key)
            limit = getattr(self, limit_name)
            if isinstance(value, int) and value > limit:
                raise LimitExceeded(key, value, limit, option, param=f"kvloft.{key}")

    def check_max_tokens(self, max_tokens: int) -> None:
        if max_tokens > self.max_tokens:
            raise LimitExceeded("max_tokens", max_tokens, self.max_tokens, "--max-tokens-limit", param="max_tokens")

    def check_n(self, n: int) -> None:
        if n > self.max_n:
            raise LimitExceeded("n", n, self.max_n, "--max-n", param="n")

    def check_context(self, held: int, prompt: int, max_tokens: int, param: str) -> None:
        """Refuse a prompt whose session would pass max_context tokens (held + prompt + max_tokens)."""
        total = held + prompt + max_tokens
        if total > self.max_context:
            raise LimitExceeded(f"context tokens (session {held} + prompt {prompt} + max_tokens {max_tokens})",
                                total, self.max_context, "--max-context", param=param)

    def check_new_session(self, stored: int) -> None:
        if stored >= self.max_stored_sessions:
            raise LimitExceeded("sessions", stored + 1, self.max_stored_sessions, "--max-stored-sessions",
                                param="session_id", fix="delete sessions no longer needed (DELETE /v1/sessions/{id})")

    def check_spill(self, spilled: int, more: int) -> None:
        if spilled + more > self.spill_limit:
            raise LimitExceeded("spilled session bytes", spilled + more, self.spill_limit, "--spill-limit",
                                fix="delete sessions no longer needed (DELETE /v1/sessions/{id})")

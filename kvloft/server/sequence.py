"""One answer (one choice of one request) on one session, as server/batcher.py's EngineLoop runs it.

A Sequence goes PREFILL (its feeds through a GatedPrefill: one Session.feed call per feed in a
helper thread that pauses after every prefill chunk until the loop lets it run the next),
DECODE (the loop samples its next token, `choose`, and hands back the logits that follow,
`accept`) and DONE. Its events reach the request through `sink`; answer text is held back
while it may still be the start of a stop string.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from kvloft.server.sampling import TokenLogprob, TokenSampler, token_logprobs
from kvloft.server.stops import AnswerText

__all__ = ["Cancelled", "GatedPrefill", "GenerationParams", "Phase", "Sequence", "Sink", "search_seconds"]

Sink = Callable[[tuple], None]  # called from the loop's threads with (index, kind, payload)


class Cancelled(Exception):
    """The client left or the server is draining: the work stopped between two chunks or steps."""


class Phase(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    DONE = "done"


@dataclass(frozen=True)
class GenerationParams:
    """How one answer is generated. logprobs: top-k logprobs per token (None: none)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stops: tuple[str, ...] = ()
    logprobs: int | None = None


class GatedPrefill:
    """A sequence's feeds, each one Session.feed call, in a helper thread that pauses after
    every prefill chunk until advance() is called again. stop() makes the paused feed raise
    Cancelled, which Session.feed rolls back."""

    def __init__(self, session, feeds: list[list[int]], on_progress: Callable[[int, int, int], None]) -> None:
        self.session, self.feeds, self.on_progress = session, feeds, on_progress
        self._go, self._paused = threading.Semaphore(0), threading.Semaphore(0)
        self._thread: threading.Thread | None = None
        self._abort: str | None = None
        self.feed_index = self.done = self.fed = 0
        self.finished = False
        self.error: BaseException | None = None

    def next_chunk(self) -> int:
        """Tokens the next advance() feeds (about: the last chunk of a feed runs on into the next)."""
        ids = self.feeds[self.feed_index] if self.feed_index < len(self.feeds) else []
        return max(1, min(self.session.runtime.resolved_prefill_chunk(self.session.model.device), len(ids) - self.done))

    def advance(self) -> None:
        """Run the next chunk (blocking); `finished` once every feed is done or one failed."""
        if self.finished:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True, name="kvloft-prefill")
            self._thread.start()
        self._go.release()
        self._paused.acquire()

    def stop(self, reason: str) -> None:
        """Abandon the feeds: a paused feed raises Cancelled(reason) and rolls back (blocking)."""
        self._abort = reason
        if self._thread is not None and not self.finished:
            self.advance()
        self.finished = True

    def _run(self) -> None:
        self._go.acquire()
        try:
            self._check()
            for i, ids in enumerate(self.feeds):
                self.feed_index, self.done = i, 0
                self.session.feed(ids, self._between)
                self.fed, self.done = self.fed + len(ids), 0
            self.feed_index = len(self.feeds)
        except BaseException as e:  # noqa: BLE001  handed to the loop, which ends the sequence with it
            self.error = e
        finally:
            self.finished = True
            self._paused.release()

    def _between(self, done: int, total: int) -> None:
        self.done = done
        self.on_progress(self.feed_index, done, total)
        if done == total:  # the feed's end (index build) runs on, into the next feed's first chunk
            return
        self._paused.release()
        self._go.acquire()
        self._check()

    def _check(self) -> None:
        if self._abort is not None:
            raise Cancelled(self._abort)


class Sequence:
    """One answer on one session, from its feeds to its end (see the module's docstring).

    session: a kvloft Session held for this request (nothing else touches it meanwhile).
    feeds: token-id lists fed in order (empty lists skipped); the last is the prompt.
    sink(event): receives (index, kind, payload) from the loop's threads:
        ("progress", (done, total))   after each chunk of the prompt feed
        ("prefilled", tokens_fed)     every feed done
        ("piece", (text, [TokenLogprob]))  answer text that can be sent, with its tokens' logprobs
        ("end", (finish | None, error | None))  last; the loop no longer touches the session
    cancel: set it to stop the sequence within one chunk or step.
    fork_of: another sequence of the loop whose context this one takes instead of feeding its
        own (feeds must be empty): once that one's feeds are in, and before its first decode
        step, the loop forks its session (Session.fork) and hands the fork to `adopt` (e.g. the
        lease holding this sequence's session); this one then decodes from the same context.
    """

    def __init__(self, session, feeds: list[list[int]], params: GenerationParams, sink: Sink,
                 cancel: threading.Event, index: int = 0, t_arrival: float | None = None,
                 fork_of: Sequence | None = None, adopt: Callable[[Any], None] | None = None) -> None:
        self.session, self.params, self.sink, self.cancel, self.index = session, params, sink, cancel, index
        self.feeds = [list(f) for f in feeds if len(f)]
        if fork_of is not None and self.feeds:
            raise ValueError("a sequence forked from another takes its context: give it no feeds")
        self.fork_of, self.adopt = fork_of, adopt
        tok = session.model.tokenizer
        self.eos = frozenset(tok.eos_ids if tok is not None else session.model.config.eos_token_ids)
        self.phase = Phase.PREFILL
        self.prompt_fed = False  # every feed went in (the session then holds the prompt)
        self.fed = 0
        self.generated: list[int] = []
        self.finish: str | None = None
        self.error: BaseException | None = None
        self.logits: Tensor | None = None  # [V] of the next token while decoding
        self.sampler = TokenSampler(params.temperature, params.top_p, params.seed)
        self.text = AnswerText(tok, params.stops)
        self.pending: list[TokenLogprob] = []  # logprobs of tokens whose text is not sent yet
        self.t_arrival = time.monotonic() if t_arrival is None else t_arrival
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.search0 = search_seconds(session)
        self.gate = GatedPrefill(session, self.feeds, self._progress)

    def take_fork(self, session) -> None:
        """This sequence runs on `session`, forked from fork_of's (handed to adopt first)."""
        if self.adopt is not None:
            self.adopt(session)
        self.session = self.gate.session = session
        self.search0 = search_seconds(session)

    def emit(self, kind: str, payload: Any) -> None:
        self.sink((self.index, kind, payload))

    def _progress(self, feed: int, done: int, total: int) -> None:
        if feed == len(self.feeds) - 1:
            self.emit("progress", (done, total))

    # ---- decode ----------------------------------------------------------------------------------

    def choose(self) -> int:
        """The next token from the current logits (EOS included: the caller ends on it)."""
        token = self.sampler.sample(self.logits)
        if token not in self.eos and self.params.logprobs is not None:
            self.pending.append(token_logprobs(self.logits, token, self.params.logprobs))
        return token

    def accept(self, token: int, logits: Tensor, now: float) -> str | None:
        """The token was appended and `logits` [V] are the next one's: send text; the finish
        reason if the answer ends here, else None."""
        self.logits = logits
        self.generated.append(token)
        self.t_first = self.t_first or now
        self.t_last = now
        piece, stopped = self.text.push(token)
        if piece:
            self._send(piece)
        if stopped:
            return "stop"
        return "length" if len(self.generated) >= self.params.max_tokens else None

    def _send(self, piece: str) -> None:
        self.emit("piece", (piece, self.pending))
        self.pending = []

    def flush(self) -> None:
        """At the end: text held back for a stop string that never completed, and logprobs not sent."""
        tail = self.text.flush() if self.error is None else ""
        if tail or self.pending:
            self._send(tail)


def search_seconds(session) -> float:
    timers = getattr(session.backend, "timers", None)
    return float(timers.seconds.get("search", 0.0)) if timers is not None else 0.0

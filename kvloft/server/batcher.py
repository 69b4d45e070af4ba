"""Continuous batching: one engine loop per model runs every request's model calls.

    loop = EngineLoop(model, max_batch=32, step_tokens=512)
    loop.submit([Sequence(session, feeds=[prompt_ids], params=..., sink=put_event, cancel=ev)])
    ...                                   # events arrive through `sink`: progress, prefilled, piece, end
    loop.close()

A Sequence is one answer (one choice of one request) on one session. Its life:

    PREFILL   its feeds (a stopped request's context to re-feed, then the prompt) go through
              Session.feed one prefill chunk (RuntimeConfig.prefill_chunk tokens) at a time
    DECODE    each iteration samples its next token and appends it through engine.step
    DONE      at EOS, a stop string, max_tokens, an error, or cancellation (client gone,
              server draining); its "end" event is sent only after the loop let go of the session

Each iteration of the loop: sequences cancelled since the last one leave; the decoders
(all DECODE sequences, at most `max_batch`, rotated when there are more) take one token of
the step's budget each; prefill chunks of the PREFILL sequences, first come first served,
fill the rest of `step_tokens` (at least one chunk an iteration, so a prompt always
advances); then one engine.step appends every decoder's token in one forward pass. A long
prompt thus costs the running streams one chunk's time per iteration, not its whole prefill.

A feed runs as one Session.feed call (so a prompt fed here equals one fed directly: same
chunks, the index built once at its end, the same tail selection in extrapolate mode) in a
helper thread that pauses after each chunk until the loop lets it run the next
(GatedPrefill): the loop still decides when every model call runs, and only one runs at a time.

The engine is `kvloft.Engine(model, max_batch)` when kvloft provides it, else
SequentialFallbackEngine (Session.step per sequence: the same answers, no batched forward).
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kvloft.server.sampling import TokenLogprob, TokenSampler, token_logprobs
from kvloft.server.stops import AnswerText

log = logging.getLogger(__name__)

Sink = Callable[[tuple], None]  # called from the loop's threads with (index, kind, payload)


class Cancelled(Exception):
    """The client left or the server is draining: the work stopped between two chunks or steps."""


# ---- the engine ----------------------------------------------------------------------------------


class SequentialFallbackEngine:
    """Stand-in for kvloft.Engine where it is missing: Session.step for each pair, stacked.

    Same interface and answers as the batched engine, without its one forward pass for the
    batch (so no batching speed-up). make_engine() picks the real Engine when present."""

    batched = False

    def __init__(self, max_batch: int = 32) -> None:
        self.max_batch = max_batch

    def step(self, pairs: list[tuple[Any, int]]) -> Tensor:
        """pairs [(session, token)] -> logits [B, V] fp32, each token appended to its session."""
        if not 0 < len(pairs) <= self.max_batch:
            raise ValueError(f"a step takes 1..{self.max_batch} (session, token) pairs, got {len(pairs)}")
        if len({id(s) for s, _ in pairs}) != len(pairs):
            raise ValueError("a session appears twice in one step; give each session one token per step")
        return torch.stack([s.step(t).float() for s, t in pairs])


def make_engine(model, max_batch: int):
    """kvloft.Engine(model, max_batch=...) if kvloft has it, else SequentialFallbackEngine."""
    import kvloft

    engine_cls = getattr(kvloft, "Engine", None)
    if engine_cls is None:
        return SequentialFallbackEngine(max_batch)
    return engine_cls(model, max_batch=max_batch)


def engine_name(engine) -> str:
    return "fallback" if isinstance(engine, SequentialFallbackEngine) else type(engine).__name__


# ---- one sequence ----------------------------------------------------------------------------------


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
    """

    def __init__(self, session, feeds: list[list[int]], params: GenerationParams, sink: Sink,
                 cancel: threading.Event, index: int = 0, t_arrival: float | None = None) -> None:
        self.session, self.params, self.sink, self.cancel, self.index = session, params, sink, cancel, index
        self.feeds = [list(f) for f in feeds if len(f)]
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
        self.search0 = _search_seconds(session)
        self.gate = GatedPrefill(session, self.feeds, self._progress)

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


def _session_step(session, token: int) -> Tensor | BaseException:
    try:
        return session.step(token).float().cpu()
    except Exception as e:  # noqa: BLE001
        return e


def _search_seconds(session) -> float:
    timers = getattr(session.backend, "timers", None)
    return float(timers.seconds.get("search", 0.0)) if timers is not None else 0.0


# ---- the loop ----------------------------------------------------------------------------------------


class EngineLoop:
    """One thread running every model call of one model's requests (see the module's docstring).

    draining: a threading.Event; once set, every sequence ends with Cancelled.
    metrics: a kvloft.server.metrics.ServerMetrics (or None).
    """

    def __init__(self, model, *, engine=None, max_batch: int = 32, step_tokens: int = 512,
                 draining: threading.Event | None = None, metrics=None) -> None:
        for name, value in (("max_batch", max_batch), ("step_tokens", step_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.engine = engine if engine is not None else make_engine(model, max_batch)
        self.max_batch, self.step_tokens = max_batch, step_tokens
        self.draining = draining or threading.Event()
        self.metrics = metrics
        self._cv = threading.Condition()
        self._inbox: list[Sequence] = []
        self._active: list[Sequence] = []
        self._thread: threading.Thread | None = None
        self._closed = False
        self._own_step: set[type] = set()  # session types the engine refused: Session.step each

    # ---- public --------------------------------------------------------------------------------

    def submit(self, seqs: list[Sequence]) -> None:
        """Add sequences to the running batch (thread-safe); they start at the next iteration."""
        with self._cv:
            if self._closed:
                raise RuntimeError("the engine loop is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="kvloft-engine")
                self._thread.start()
            self._inbox.extend(seqs)
            self._cv.notify()

    def close(self, timeout: float = 30.0) -> None:
        """End every sequence (Cancelled) and stop the thread."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def counts(self) -> tuple[int, int]:
        """(decoding sequences, sequences waiting for or in prefill)."""
        active = list(self._active)
        running = sum(s.phase is Phase.DECODE for s in active)
        return running, len(active) - running + len(self._inbox)

    # ---- the thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._inbox and not self._active:
                    self._cv.wait()
                if self._closed:
                    self._active.extend(self._inbox)
                    self._inbox.clear()
                    break
                self._active.extend(self._inbox)
                self._inbox.clear()
            try:
                self._iteration()
            except Exception as e:
                log.exception("engine loop iteration failed; ending its sequences")
                for s in list(self._active):
                    self._end(s, error=e)
        for s in list(self._active):
            self._end(s, error=Cancelled("the server is shutting down"))

    def _iteration(self) -> None:
        self._reap()
        decoders = self._pick_decoders()
        self._prefill(self.step_tokens - len(decoders))
        self._decode(decoders)
        if self.metrics is not None:
            self.metrics.set_counts(*self.counts)

    def _reap(self) -> None:
        for s in list(self._active):
            if self.draining.is_set():
                self._end(s, error=Cancelled("the server is shutting down"))
            elif s.cancel.is_set():
                self._end(s, error=Cancelled("the client disconnected"))

    def _pick_decoders(self) -> list[Sequence]:
        """Every decoding sequence, at most max_batch; those picked go to the back of the line."""
        decoders = [s for s in self._active if s.phase is Phase.DECODE][: self.max_batch]
        if len(decoders) == self.max_batch:
            picked = set(map(id, decoders))
            self._active = [s for s in self._active if id(s) not in picked] + decoders
        return decoders

    def _prefill(self, budget: int) -> None:
        """Prefill chunks, first come first served, within `budget` tokens (at least one chunk)."""
        ran = False
        for s in [s for s in self._active if s.phase is Phase.PREFILL]:
            while s.phase is Phase.PREFILL and (not ran or s.gate.next_chunk() <= budget):
                if s.cancel.is_set() or self.draining.is_set():
                    return
                before, t0 = s.gate.fed + s.gate.done, time.perf_counter()
                s.gate.advance()
                fed = s.gate.fed + s.gate.done - before
                budget -= max(fed, 1)
                ran = True
                if self.metrics is not None:
                    self.metrics.prefilled(fed, time.perf_counter() - t0)
                if s.gate.finished:
                    self._prefill_done(s)
            if budget <= 0:
                return

    def _prefill_done(self, s: Sequence) -> None:
        if s.gate.error is not None:
            self._end(s, error=s.gate.error)
            return
        s.prompt_fed, s.fed = True, s.gate.fed
        s.logits = s.session.last_logits
        s.emit("prefilled", s.fed)
        if s.params.max_tokens == 0:
            self._end(s, finish="length")
        else:
            s.phase = Phase.DECODE

    def _decode(self, decoders: list[Sequence]) -> None:
        batch: list[tuple[Sequence, int]] = []
        for s in decoders:
            try:
                token = s.choose()
            except Exception as e:  # noqa: BLE001  non-finite logits: this sequence fails alone
                self._end(s, error=e)
                continue
            if token in s.eos:
                self._end(s, finish="stop")
            else:
                batch.append((s, token))
        if not batch:
            return
        t0 = time.perf_counter()
        outs = self._step([(s.session, t) for s, t in batch])
        now = time.monotonic()
        if self.metrics is not None:
            self.metrics.decoded(len(batch), time.perf_counter() - t0)
        for (s, token), out in zip(batch, outs, strict=True):
            if isinstance(out, BaseException):
                self._end(s, error=out)
                continue
            if self.metrics is not None:
                self.metrics.token_latency(s, now)
            finish = s.accept(token, out, now)
            if finish is not None:
                self._end(s, finish=finish)

    def _step(self, pairs: list[tuple[Any, int]]) -> list[Tensor | BaseException]:
        """Each pair's next logits [V] fp32 (CPU), or the error that sequence alone fails with.
        Sessions of a type the engine refused (TypeError: e.g. pipelined sessions, which run
        their own forward pass) are stepped by themselves."""
        own = [k for k, (s, _) in enumerate(pairs) if type(s) in self._own_step]
        out: list[Tensor | BaseException | None] = [None] * len(pairs)
        for k in own:
            out[k] = _session_step(*pairs[k])
        rest = [k for k in range(len(pairs)) if out[k] is None]
        if rest:
            for k, r in zip(rest, self._engine_step([pairs[k] for k in rest]), strict=True):
                out[k] = r
        return out

    def _engine_step(self, pairs: list[tuple[Any, int]]) -> list[Tensor | BaseException]:
        before = [len(s) for s, _ in pairs]
        try:
            rows = self.engine.step(pairs).float().cpu()  # [B, V]: the step's one host sync
            return [rows[i] for i in range(len(pairs))]
        except Exception as e:  # noqa: BLE001
            if len(pairs) == 1 and not isinstance(e, TypeError):
                return [e]
            if len(pairs) > 1:
                log.warning("a batched step of %d sequences failed (%s: %s); stepping them one by one",
                            len(pairs), type(e).__name__, e)
        return [self._step_alone(s, t, n) for (s, t), n in zip(pairs, before, strict=True)]

    def _step_alone(self, session, token: int, before: int) -> Tensor | BaseException:
        if len(session) == before + 1 and session.last_logits is not None:  # the failed batch took its token
            return session.last_logits.float().cpu()
        try:
            return self.engine.step([(session, token)]).float().cpu()[0]
        except TypeError as e:  # the engine does not take this kind of session: it steps by itself
            log.info("the engine refuses %s sessions (%s); stepping them one by one", type(session).__name__, e)
            self._own_step.add(type(session))
            return _session_step(session, token)
        except Exception as e:  # noqa: BLE001
            return e

    def _end(self, s: Sequence, finish: str | None = None, error: BaseException | None = None) -> None:
        if s.phase is Phase.PREFILL:
            s.gate.stop(str(error) if isinstance(error, Cancelled) else "the sequence ended")
        s.finish, s.error = (None, error) if error is not None else (finish, None)
        s.flush()
        s.phase = Phase.DONE
        if s in self._active:
            self._active.remove(s)
        if self.metrics is not None:
            self.metrics.sequence_ended(s, _search_seconds(s.session) - s.search0)
        s.emit("end", (s.finish, s.error))

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
Here: the loop. A sequence's own state (Sequence, GatedPrefill) is in server/sequence.py, the
engine choice in server/engines.py.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from torch import Tensor

from kvloft.server.engines import SequentialFallbackEngine, engine_name, make_engine
from kvloft.server.sequence import Cancelled, GenerationParams, Phase, Sequence, search_seconds

__all__ = [  # the sequence and engine names are re-exported for callers of this module
    "Cancelled", "EngineLoop", "GenerationParams", "Sequence", "SequentialFallbackEngine", "engine_name", "make_engine",
]

log = logging.getLogger(__name__)


def _session_step(session, token: int) -> Tensor | BaseException:
    try:
        return session.step(token).float().cpu()
    except Exception as e:  # noqa: BLE001
        return e


class EngineLoop:
    """One thread running every model call of one model's requests (see the module's docstring).

    draining: a threading.Event; once set, every sequence ends with Cancelled.
    metrics: a kvloft.server.metrics.ServerMetrics (or None).
    """

    def __init__(self, model, *, engine=None, max_batch: int = 32, step_tokens: int = 512,
                 draining: threading.Event | None = None, metrics=None, graphs: str = "auto") -> None:
        for name, value in (("max_batch", max_batch), ("step_tokens", step_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.engine = engine if engine is not None else make_engine(model, max_batch, graphs)
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
        for s in [s for s in self._active if s.phase is Phase.PREFILL and s.fork_of is None]:
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
        self._forks_of(s)  # before s decodes: they take the context it holds now
        self._ready(s)

    def _ready(self, s: Sequence) -> None:
        """Its context is in: it decodes next (or ends, asked for no token)."""
        s.logits = s.session.last_logits
        s.emit("prefilled", s.fed)
        if s.params.max_tokens == 0:
            self._end(s, finish="length")
        else:
            s.phase = Phase.DECODE

    def _forks_of(self, source: Sequence) -> None:
        """The sequences waiting on `source` take a fork of its session (n > 1's extra choices:
        one prefill, not one per choice); one that cannot fork ends with the error alone."""
        for f in [f for f in self._active if f.fork_of is source and f.phase is Phase.PREFILL]:
            try:
                f.take_fork(source.session.fork())
            except Exception as e:  # noqa: BLE001  e.g. the fork over a memory limit: this choice fails
                self._end(f, error=e)
                continue
            f.prompt_fed, f.fed = True, source.fed
            self._ready(f)

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
        if s.phase is Phase.DONE:  # a fork ended with its source, met again in a list taken before
            return
        if s.phase is Phase.PREFILL:
            s.gate.stop(str(error) if isinstance(error, Cancelled) else "the sequence ended")
            for f in [f for f in self._active if f.fork_of is s and f.phase is Phase.PREFILL]:
                self._end(f, error=error or Cancelled("the sequence it forks from ended before its prompt was in"))
        s.finish, s.error = (None, error) if error is not None else (finish, None)
        s.flush()
        s.phase = Phase.DONE
        if s in self._active:
            self._active.remove(s)
        if self.metrics is not None:
            self.metrics.sequence_ended(s, search_seconds(s.session) - s.search0)
        s.emit("end", (s.finish, s.error))

"""One request on its held session(s): its sequences in the engine loop, its answer, its undo.

A Run tokenizes and checks the prompt (a worker thread), then hands one Sequence per choice
to the model's EngineLoop (batcher.py), which feeds and decodes them among every other
request's sequences and sends back their events; the Run turns them into the answer or its
server-sent events. The loop checks for cancellation between prefill chunks and between
decode steps, so a run stops within one chunk or one step when its client disconnects
(`cancel`) or the server drains (`draining`, set on SIGTERM).

A run that does not complete leaves its session as it was before the request: a feed that
stops rolls itself back (Session.feed is atomic); once the prompt is in, the session is
reset and re-fed its earlier tokens by its next request (`lease.meta["rebuild"]`), so no
half prompt or half answer stays in it. The session is given back (the lease released) only
after the loop let go of every sequence of the run.

n > 1: choice 0 runs on the request's session; every other choice runs on a throwaway
lease of the same retrieval setup whose session becomes a fork of choice 0's (Session.fork)
once the prompt is in and before choice 0 decodes: one prefill for every choice. Choice i
samples with seed + i; the forks are dropped at the end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi.responses import StreamingResponse

from kvloft.server import protocol as P
from kvloft.server.batcher import EngineLoop
from kvloft.server.limits import LimitExceeded, Limits
from kvloft.server.metrics import RequestRecord
from kvloft.server.sequence import Cancelled, GenerationParams, Sequence

__all__ = ["Cancelled", "Job", "LeasedStream", "Run", "cancelled_error", "events", "limit_error",
           "progress_then_events", "watch_disconnect"]

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One request, validated: what to feed, how to generate, how to answer."""

    chat: bool
    model_name: str
    session_id: str | None  # as the client named it (the manager's id may carry an owner prefix)
    retrieval: dict[str, Any]
    prompt: Any  # chat: list of {"role", "content"}; completion: str or list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    stream: bool
    include_usage: bool
    rid: str = ""
    progress: bool = False  # stream prefill progress events (needs stream)
    n: int = 1
    logprobs: int | None = None  # top-k logprobs per token; None: none

    @classmethod
    def from_request(cls, req, default_max_tokens: int, limits: Limits, name: str, chat: bool,
                     rid: str | None = None) -> Job:
        if req.model != name:
            raise P.APIError(404, f"model {req.model!r} is not served here; this server serves {name!r} "
                                  "(GET /v1/models)", code="model_not_found", param="model")
        req.refuse_unsupported()
        max_tokens = req.max_tokens
        if chat and req.max_completion_tokens is not None:
            max_tokens = req.max_completion_tokens
        max_tokens = default_max_tokens if max_tokens is None else max_tokens
        retrieval = req.kvloft.model_dump(exclude_none=True) if req.kvloft else {}
        try:
            limits.check_max_tokens(max_tokens)
            limits.check_n(req.n)
            limits.check_retrieval(retrieval)
        except LimitExceeded as e:
            raise limit_error(e) from e
        return cls(chat=chat, model_name=name, session_id=req.session_id, retrieval=retrieval,
                   prompt=_chat_messages(req) if chat else _completion_prompt(req),
                   max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, stop=req.stop_list(),
                   seed=req.seed, stream=req.stream,
                   include_usage=bool(req.stream_options and req.stream_options.include_usage),
                   rid=rid or P.new_id("chatcmpl" if chat else "cmpl"),
                   progress=bool(req.stream and req.prefill_progress), n=req.n, logprobs=req.top_logprobs())


def limit_error(e: LimitExceeded) -> P.APIError:
    return P.APIError(400, str(e), code="limit_exceeded", param=e.param)


def cancelled_error(e: Cancelled) -> P.APIError:
    return P.APIError(503, f"request stopped: {e}", type="server_error", code="cancelled",
                      headers={"Retry-After": "1"})


def _chat_messages(req: P.ChatRequest) -> list[dict[str, str]]:
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]


def _completion_prompt(req: P.CompletionRequest) -> str | list[int]:
    p = req.prompt
    if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        if len(p) != 1:
            raise P.APIError(400, f"prompt has {len(p)} strings; kvloft completes one prompt per request",
                             param="prompt")
        p = p[0]
    if not p:
        raise P.APIError(400, "the prompt is empty", param="prompt")
    return p


class Run:
    """One job's sequences in the engine loop. leases[0] holds the request's session; one more
    throwaway lease per extra choice (n > 1)."""

    def __init__(self, job: Job, leases: list, limits: Limits, loop: EngineLoop,
                 record: RequestRecord | None = None) -> None:
        self.job, self.leases, self.limits, self.loop = job, leases, limits, loop
        self.lease, self.session = leases[0], leases[0].session
        self.record = record or RequestRecord(job.rid, "chat" if job.chat else "completions")
        self.cancel = threading.Event()  # set when the client leaves
        self.open_turn = self.lease.meta.get("open_turn", False)
        self.rebuild: list[int] = []  # a stopped request's context, taken from the lease to re-feed
        self.prior = len(self.session)  # session tokens before this request (after its rebuild)
        self.reused = self.fed = 0
        self.seqs: list[Sequence] = []
        self.texts = [""] * job.n
        self.finish: list[str | None] = [None] * job.n
        self.errors: list[BaseException | None] = [None] * job.n
        self.logprobs: list[list] = [[] for _ in range(job.n)]
        self.offsets = [0] * job.n  # completions' text_offset of the next streamed token, per choice
        self.prefilled = self.ended = 0
        self.completed = False
        self._queue: asyncio.Queue | None = None
        self._backlog: deque = deque()  # events read while waiting for the prefill, not yet streamed

    # ---- start -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Tokenize and check the prompt, then hand the sequences to the loop. APIError if refused."""
        ids = await anyio.to_thread.run_sync(self._prepare)
        aloop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        sink = lambda ev: aloop.call_soon_threadsafe(self._queue.put_nowait, ev)
        j, s = self.job, self.session
        base_seed = s.runtime.seed if j.seed is None else j.seed
        for i, lease in enumerate(self.leases):
            params = GenerationParams(max_tokens=j.max_tokens, temperature=j.temperature, top_p=j.top_p,
                                      seed=base_seed + i, stops=tuple(j.stop), logprobs=j.logprobs)
            if i == 0:
                seq = Sequence(s, [self.rebuild, ids], params, sink, self.cancel, index=0, t_arrival=self.record.t0)
            else:  # forks choice 0's session once the prompt is in (the lease then holds the fork)
                seq = Sequence(lease.session, [], params, sink, self.cancel, index=i, t_arrival=self.record.t0,
                               fork_of=self.seqs[0], adopt=lambda fork, lease=lease: setattr(lease, "session", fork))
            self.seqs.append(seq)
        self.loop.submit(self.seqs)

    def _prepare(self) -> list[int]:
        """Blocking, no model call: the prompt's ids, checked against the context limit; takes a
        pending rebuild from the lease."""
        s, meta, job = self.session, self.lease.meta, self.job
        rebuild = list(meta.get("rebuild") or [])
        held = len(rebuild) if rebuild else len(s)
        ids = self._prompt_ids(held)
        try:
            self.limits.check_context(held, len(ids), job.max_tokens, param=self._param)
        except LimitExceeded as e:
            raise limit_error(e) from e
        if rebuild:
            if len(s):
                s.reset()
            del meta["rebuild"]
        self.rebuild, self.prior, self.reused = rebuild, held, held - len(rebuild)
        return ids

    @property
    def _param(self) -> str:
        return "messages" if self.job.chat else "prompt"

    def _prompt_ids(self, held: int) -> list[int]:
        job, tok = self.job, self.session.model.tokenizer
        if not job.chat and not isinstance(job.prompt, str):
            return list(job.prompt)
        text = job.prompt
        if job.chat:
            text = _chat_text(tok, job.prompt, continuing=bool(held), open_turn=self.lease.meta.get("open_turn"))
        return tok.encode(text, add_bos=None if not held else False)  # as Session.feed does

    # ---- events ----------------------------------------------------------------------------------

    async def _next(self) -> tuple:
        """The next event of any sequence, with the run's state updated."""
        i, kind, payload = ev = await self._queue.get()
        if kind == "prefilled":
            self.prefilled += 1
            if i == 0:
                self.fed = payload
        elif kind == "piece":
            self.texts[i] += payload[0]
            self.logprobs[i] += payload[1]
        elif kind == "end":
            self.finish[i], self.errors[i] = payload
            self.ended += 1
            self.completed = self.ended == len(self.seqs) and not any(self.errors)
        return ev

    def failure(self, e: BaseException) -> Exception:
        """A sequence's error as what the request raises: Cancelled or an APIError."""
        if isinstance(e, (Cancelled, P.APIError)):
            return e
        if isinstance(e, (ValueError, TypeError)):
            return P.APIError(400, str(e), param=None if self.seqs[0].prompt_fed else self._param)
        return P.APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error")

    async def prefill_progress(self) -> AsyncIterator[tuple[int, int]]:
        """(done, total) of the prompt's feed until every choice's prompt is in; raises a failure."""
        while self.prefilled < len(self.seqs):
            ev = await self._next()
            i, kind, payload = ev
            if kind == "end" and payload[1] is not None:
                raise self.failure(payload[1])
            if kind == "progress":
                if i == 0:
                    yield payload
            elif kind != "prefilled":
                self._backlog.append(ev)

    async def wait_prefilled(self) -> None:
        async for _ in self.prefill_progress():
            pass

    async def answer_events(self) -> AsyncIterator[tuple]:
        """Piece and end events (backlog first) until every sequence ended."""
        while self._backlog:
            yield self._backlog.popleft()
        while self.ended < len(self.seqs):
            ev = await self._next()
            if ev[1] in ("piece", "end"):
                yield ev

    async def collect(self) -> None:
        """Until every sequence ended; raises the first failure."""
        async for _i, kind, payload in self.answer_events():
            if kind == "end" and payload[1] is not None:
                raise self.failure(payload[1])

    # ---- the end ---------------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop the run's sequences, wait until the loop let go of them, undo an incomplete request."""
        self.cancel.set()
        with anyio.CancelScope(shield=True):
            while self.ended < len(self.seqs):
                await self._next()
            if self.seqs:
                if self.completed:
                    self.lease.meta["open_turn"] = self.job.chat
                else:
                    await anyio.to_thread.run_sync(self.rollback)
            self._finish_record()

    def rollback(self) -> None:
        """Blocking, after every sequence ended: leave the session as it was before this request."""
        s, meta = self.session, self.lease.meta
        meta["open_turn"] = self.open_turn
        if self.lease.ephemeral or (not self.seqs[0].prompt_fed and len(s) == self.prior):
            return  # the feeds rolled themselves back: the session holds what it held
        keep = self.rebuild or s.tokens[: self.prior]
        s.reset()
        if keep:
            meta["rebuild"] = keep

    def _finish_record(self) -> None:
        r = self.record
        r.tokens_in = self.fed
        r.tokens_out = sum(len(s.generated) for s in self.seqs)
        firsts = [s.t_first for s in self.seqs if s.t_first is not None]
        r.ttft_s = min(firsts) - r.t0 if firsts else None
        errors = [e for e in self.errors if e is not None]
        if self.completed:
            r.outcome = self.finish[0] or "stop"
        elif errors and all(isinstance(e, Cancelled) for e in errors):
            r.outcome = "cancelled"
        else:
            r.outcome = "error"

    # ---- answers ---------------------------------------------------------------------------------

    @property
    def n_generated(self) -> int:
        return sum(len(s.generated) for s in self.seqs)

    def extension(self) -> dict[str, Any]:
        return {"session_id": None if self.lease.ephemeral else self.job.session_id, "prefilled_tokens": self.fed,
                "reused_tokens": self.reused, "context_tokens": len(self.session),
                "retrieval": {"method": self.session.retrieval.method, "budget": self.session.retrieval.budget}}

    def usage(self) -> dict[str, int]:
        return P.usage(self.fed, self.n_generated)

    def format_logprobs(self, i: int, entries: list) -> dict | None:
        """Choice i's logprobs of `entries` in the wire format (None when not asked for)."""
        if self.job.logprobs is None:
            return None
        tok = self.session.model.tokenizer
        if self.job.chat:
            return P.chat_logprobs(tok, entries)
        out = P.completion_logprobs(tok, entries, self.offsets[i])
        self.offsets[i] += sum(len(t) for t in out["tokens"])
        return out

    def response(self) -> dict[str, Any]:
        j = self.job
        choice = P.chat_choice if j.chat else P.completion_choice
        choices = [choice(i, self.texts[i], self.finish[i], self.format_logprobs(i, self.logprobs[i]))
                   for i in range(j.n)]
        build = P.chat_completion if j.chat else P.completion
        return build(j.rid, j.model_name, choices, self.usage(), self.extension())


async def events(run: Run) -> AsyncIterator[str]:
    """Server-sent events of a streamed answer; an error after the start is sent as an error event."""
    j = run.job
    chunk = P.chat_chunk if j.chat else P.completion_chunk
    try:
        if j.chat:
            for i in range(j.n):
                yield sse(P.chat_chunk(j.rid, j.model_name, {"role": "assistant", "content": ""}, None, i))
        async for i, kind, payload in run.answer_events():
            if kind == "piece":
                text, entries = payload
                body = {"content": text} if j.chat else text
                yield sse(chunk(j.rid, j.model_name, body, None, i, run.format_logprobs(i, entries)))
            elif payload[1] is not None:
                raise run.failure(payload[1])
            else:
                yield sse(chunk(j.rid, j.model_name, {} if j.chat else "", payload[0], i))
        if j.include_usage:
            obj = "chat.completion.chunk" if j.chat else "text_completion"
            yield sse(P.usage_chunk(j.rid, j.model_name, obj, run.usage(), run.extension()))
    except P.APIError as e:
        yield sse(e.body())
    except Cancelled as e:
        yield sse(cancelled_error(e).body())
    yield "data: [DONE]\n\n"


async def progress_then_events(run: Run) -> AsyncIterator[str]:
    """{"object": "kvloft.prefill", done, total} events after each chunk of the prompt's feed,
    then the answer's events."""
    try:
        async for done, total in run.prefill_progress():
            yield sse({"id": run.job.rid, "object": "kvloft.prefill", "done": done, "total": total})
    except (P.APIError, Cancelled) as e:  # the status line is sent already: report in the stream
        yield sse(e.body() if isinstance(e, P.APIError) else cancelled_error(e).body())
        yield "data: [DONE]\n\n"
        return
    async for event in events(run):
        yield event


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def watch_disconnect(receive, cancel: threading.Event) -> asyncio.Task:
    """A task that sets `cancel` when the client disconnects (cancel the task when the response is done)."""

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            await asyncio.sleep(0.05)  # a host whose receive() does not block must not spin the loop
        cancel.set()

    return asyncio.ensure_future(watch())


class LeasedStream(StreamingResponse):
    """A streamed response that, however it ends, stops its run, waits until the loop let go of
    its sequences, gives its sessions back, and then calls `done` (metrics and log)."""

    def __init__(self, content, run: Run, watcher: asyncio.Task, release: Callable[[], Any],
                 done: Callable[[], None] | None = None) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._run, self._watcher, self._release, self._done = run, watcher, release, done

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._watcher.cancel()
            with anyio.CancelScope(shield=True):
                await self._run.close()
                await self._release()
            if self._done is not None:
                self._done()


def _chat_text(tok, messages: list[dict[str, str]], continuing: bool, open_turn: bool) -> str:
    """Chat messages rendered to append to a session: when continuing, closes an open assistant
    turn and leaves out what the template writes once per conversation (bos, a default system prompt)."""
    if not continuing:
        return tok.apply_chat_template(messages, True)
    return tok.apply_chat_template_continuation(messages, open_turn=open_turn)


def retrieval_fields(lease) -> dict[str, Any]:
    """Every RetrievalConfig field of a lease's session (for a throwaway session built alike)."""
    return {f.name: getattr(lease.retrieval, f.name) for f in dataclasses.fields(lease.retrieval)}

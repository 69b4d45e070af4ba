"""One request's work on one held session: feed, generate, answer; stop when nobody waits.

A Run checks for cancellation between prefill chunks and between decode steps (through
the session's progress callback and the token stream), so it stops within one chunk or
one step when its client disconnects (`cancel`) or the server drains (`draining`, set on
SIGTERM). A run that does not complete leaves its session as it was before the request:
a session that was empty is reset; one that held tokens is reset and re-fed those tokens
by its next request (`lease.meta["rebuild"]`), so no half prompt or half answer stays in it.
The session is given back (the lease released) only after the run's worker thread ended.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi.responses import StreamingResponse

from kvloft.server import protocol as P
from kvloft.server.limits import LimitExceeded, Limits

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """The client left or the server is draining: the run stopped between two chunks or steps."""


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

    @classmethod
    def from_request(cls, req, default_max_tokens: int, limits: Limits, name: str, chat: bool) -> Job:
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
            limits.check_retrieval(retrieval)
        except LimitExceeded as e:
            raise limit_error(e) from e
        return cls(chat=chat, model_name=name, session_id=req.session_id, retrieval=retrieval,
                   prompt=_chat_messages(req) if chat else _completion_prompt(req),
                   max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, stop=req.stop_list(),
                   seed=req.seed, stream=req.stream,
                   include_usage=bool(req.stream_options and req.stream_options.include_usage),
                   rid=P.new_id("chatcmpl" if chat else "cmpl"),
                   progress=bool(req.stream and req.prefill_progress))


def limit_error(e: LimitExceeded) -> P.APIError:
    return P.APIError(400, str(e), code="limit_exceeded", param=e.param)


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
    """Feeding and generating for one job on one held session (blocking parts run in worker threads)."""

    def __init__(self, job: Job, lease, limits: Limits, draining: threading.Event) -> None:
        self.job, self.lease, self.session, self.limits = job, lease, lease.session, limits
        self.draining = draining
        self.cancel = threading.Event()  # set when the client leaves
        self.touched = self.completed = False  # the session changed / the whole request is done
        self.prior = 0  # session tokens before this request
        self.open_turn = lease.meta.get("open_turn", False)
        self.reused = self.fed = 0
        self.text = ""
        self.finish = "stop"
        self._thread: threading.Thread | None = None
        self._pieces = None

    # ---- cancellation --------------------------------------------------------------------

    def stopped(self) -> bool:
        return self.cancel.is_set() or self.draining.is_set()

    def check(self, *_progress) -> None:
        """Raise Cancelled if the run should stop (also a Session.feed progress callback)."""
        if self.stopped():
            raise Cancelled("the server is shutting down" if self.draining.is_set() else "the client disconnected")

    def start_thread(self, target: Callable[[], None]) -> None:
        self._thread = threading.Thread(target=target, daemon=True, name=f"kvloft-{self.job.rid}")
        self._thread.start()

    async def close(self) -> None:
        """Stop the run's work, wait for its thread, and undo an incomplete request (the lease is still held)."""
        self.cancel.set()
        with anyio.CancelScope(shield=True):
            if self._thread is not None:
                await anyio.to_thread.run_sync(self._thread.join)
            if self.touched and not self.completed:
                await anyio.to_thread.run_sync(self.rollback)

    def rollback(self) -> None:
        """Blocking: leave the session as it was before this request."""
        if self._pieces is not None:
            self._pieces.close()
        s, meta = self.session, self.lease.meta
        if self.lease.ephemeral:
            return
        if "rebuild" not in meta:
            meta["rebuild"] = s.tokens[: self.prior]
        s.reset()
        if not meta["rebuild"]:
            del meta["rebuild"]
        meta["open_turn"] = self.open_turn

    # ---- work ----------------------------------------------------------------------------

    def prefill(self, on_progress: Callable[[int, int], None] | None = None) -> None:
        """Blocking: feed the job's prompt (after re-feeding the context of a rolled-back request)."""
        s, job = self.session, self.job
        self.check()
        rebuilt = self._rebuild()
        self.reused, self.prior = len(s) - rebuilt, len(s)
        ids = self._prompt_ids()
        try:
            self.limits.check_context(len(s), len(ids), job.max_tokens, param="messages" if job.chat else "prompt")
        except LimitExceeded as e:
            raise limit_error(e) from e

        def progress(done: int, total: int) -> None:
            self.check()
            if on_progress is not None:
                on_progress(done, total)

        self.touched = True
        try:
            self.fed = rebuilt + s.feed(ids, progress)
        except (ValueError, TypeError) as e:  # refused before anything changed
            self.touched = False
            raise P.APIError(400, str(e), param="messages" if job.chat else "prompt") from e
        self.lease.meta["open_turn"] = job.chat
        self.start = len(s)

    def _rebuild(self) -> int:
        pending = self.lease.meta.get("rebuild")
        if not pending:
            return 0
        if len(self.session):
            self.session.reset()
        n = self.session.feed(pending, self.check)
        del self.lease.meta["rebuild"]
        return n

    def _prompt_ids(self) -> list[int]:
        s, job, tok = self.session, self.job, self.session.model.tokenizer
        if not job.chat and not isinstance(job.prompt, str):
            return list(job.prompt)
        text = job.prompt
        if job.chat:
            text = _chat_text(tok, job.prompt, continuing=bool(len(s)), open_turn=self.lease.meta.get("open_turn"))
        return tok.encode(text, add_bos=None if not s.tokens else False)  # as Session.feed does

    def pieces(self):
        """Blocking generator of answer pieces; checks for cancellation before each step."""
        job = self.job
        if job.max_tokens == 0:
            self.finish, self.completed = "length", True
            return
        try:
            it = self._pieces = self.session.stream(job.max_tokens, job.temperature, job.top_p, job.stop, job.seed)
            while True:
                self.check()
                piece = next(it, None)
                if piece is None:
                    break
                yield piece
        except (ValueError, TypeError) as e:
            raise P.APIError(400, str(e)) from e
        self.finish = self._finish_reason()
        self.completed = True

    def generate_all(self) -> None:
        self.text = "".join(self.pieces())

    def _finish_reason(self) -> str:
        new = self.session.tokens[self.start:]
        if len(new) < self.job.max_tokens:
            return "stop"
        decoded = self.session.model.tokenizer.decode(new)
        return "stop" if any(s in decoded for s in self.job.stop) else "length"

    # ---- answers -------------------------------------------------------------------------

    @property
    def n_generated(self) -> int:
        return len(self.session) - self.start

    def extension(self) -> dict[str, Any]:
        return {"session_id": None if self.lease.ephemeral else self.job.session_id, "prefilled_tokens": self.fed,
                "reused_tokens": self.reused, "context_tokens": len(self.session),
                "retrieval": {"method": self.session.retrieval.method, "budget": self.session.retrieval.budget}}

    def usage(self) -> dict[str, int]:
        return P.usage(self.fed, self.n_generated)

    def response(self) -> dict[str, Any]:
        j = self.job
        build = P.chat_completion if j.chat else P.completion
        return build(j.rid, j.model_name, self.text, self.finish, self.usage(), self.extension())


def cancelled_error(run: Run, e: Cancelled) -> P.APIError:
    return P.APIError(503, f"request stopped: {e}", type="server_error", code="cancelled",
                      headers={"Retry-After": "1"})


async def events(run: Run) -> AsyncIterator[str]:
    """Server-sent events of a streamed answer; an error after the start is sent as an error event."""
    j = run.job
    it = run.pieces()
    done = object()
    try:
        if j.chat:
            yield sse(P.chat_chunk(j.rid, j.model_name, {"role": "assistant", "content": ""}, None))
        while (piece := await anyio.to_thread.run_sync(next, it, done)) is not done:
            chunk = (P.chat_chunk(j.rid, j.model_name, {"content": piece}, None) if j.chat
                     else P.completion_chunk(j.rid, j.model_name, piece, None))
            yield sse(chunk)
        yield sse(P.chat_chunk(j.rid, j.model_name, {}, run.finish) if j.chat
                  else P.completion_chunk(j.rid, j.model_name, "", run.finish))
        if j.include_usage:
            obj = "chat.completion.chunk" if j.chat else "text_completion"
            yield sse(P.usage_chunk(j.rid, j.model_name, obj, run.usage(), run.extension()))
    except P.APIError as e:
        yield sse(e.body())
    except Cancelled as e:
        yield sse(cancelled_error(run, e).body())
    except Exception as e:  # the status line is gone: report in the stream
        log.exception("stream failed")
        yield sse(P.error_body(f"generation failed: {type(e).__name__}: {e}", "server_error"))
    yield "data: [DONE]\n\n"


async def progress_then_events(run: Run) -> AsyncIterator[str]:
    """Feed the prompt in the run's thread, streaming {"object": "kvloft.prefill", done, total}
    events after each prefill chunk, then the answer's events."""
    q: queue.Queue = queue.Queue()
    failed: list[BaseException] = []

    def work() -> None:
        try:
            run.prefill(lambda done, total: q.put((done, total)))
        except BaseException as e:  # noqa: BLE001  reported in the stream: the status line is sent already
            failed.append(e)
        finally:
            q.put(None)

    run.start_thread(work)
    while (item := await anyio.to_thread.run_sync(q.get)) is not None:
        yield sse({"id": run.job.rid, "object": "kvloft.prefill", "done": item[0], "total": item[1]})
    if failed:
        e = failed[0]
        body = (e.body() if isinstance(e, P.APIError) else cancelled_error(run, e).body() if isinstance(e, Cancelled)
                else P.error_body(f"prefill failed: {type(e).__name__}: {e}", "server_error"))
        yield sse(body)
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
    """A streamed response that, however it ends, stops its run, waits for the run's thread,
    and only then gives its session back."""

    def __init__(self, content, run: Run, watcher: asyncio.Task, release: Callable[[], Any]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._run, self._watcher, self._release = run, watcher, release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._watcher.cancel()
            with anyio.CancelScope(shield=True):
                await self._run.close()
                await self._release()


def _chat_text(tok, messages: list[dict[str, str]], continuing: bool, open_turn: bool) -> str:
    """Chat messages rendered to append to a session: when continuing, closes an open assistant
    turn and leaves out what the template writes once per conversation (bos, a default system prompt)."""
    if not continuing:
        return tok.apply_chat_template(messages, True)
    return tok.apply_chat_template_continuation(messages, open_turn=open_turn)

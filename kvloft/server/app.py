"""An OpenAI-compatible HTTP API over kvloft sessions (FastAPI).

    app = create_app(kvloft.load_model("smollm2"), ServerConfig(api_key="secret"))
    uvicorn.run(app, host="127.0.0.1", port=8000)        # or: kvloft serve --model smollm2

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret")
    client.chat.completions.create(model=client.models.list().data[0].id, messages=[...],
                                   extra_body={"session_id": "doc-42", "kvloft": {"budget": 256}})

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with
`stream`, as server-sent events ending in `data: [DONE]`), and the kvloft routes
GET/DELETE /v1/sessions/{id}, GET /v1/usage, GET /health.

Sessions (`session_id`): a session is a conversation that stays fed. Each request's
prompt, or its messages, is appended to what the session already holds, and the answer
stays in it too; send only the new turns. The first request of a long document pays its
prefill once; later questions prefill only themselves (`kvloft.prefilled_tokens` in each
response, `GET /v1/sessions/{id}` for the session's stats). A chat answer's end-of-turn
token is not generated into the session; the next request closes the turn first.
Without `session_id` each request gets a fresh session.

Limits: optional bearer-token auth (401), a request-body limit (413), a per-client
token-bucket rate limit (429 with Retry-After), a cap on max_tokens (400). Errors are
OpenAI-style JSON: {"error": {"message", "type", "param", "code"}}.

Model calls run in worker threads; requests on one session are serialized, requests on
different sessions interleave (see manager.py). The factory returns a plain FastAPI app,
so another host (e.g. a Ray Serve deployment) can mount the same app.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvloft.config import CacheConfig, RetrievalConfig, RuntimeConfig
from kvloft.server import protocol as P
from kvloft.server.manager import SessionManager, SessionMismatch, SessionsBusy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    """Settings of one server.

    api_key: bearer token required on /v1/* (None = open).
    model_name: the id served by /v1/models and expected in requests (None = the model's name).
    max_request_bytes: largest request body accepted.
    rate_limit: requests per minute per client (API key, else address); 0 = unlimited.
    default_max_tokens / max_tokens_limit: max_tokens when unset, and the largest allowed.
    max_sessions, host_budget, device_budget, spill_dir: the SessionManager's limits.
    """

    api_key: str | None = None
    model_name: str | None = None
    max_request_bytes: int = 1 << 20
    rate_limit: float = 0.0
    default_max_tokens: int = 256
    max_tokens_limit: int = 4096
    max_sessions: int = 8
    host_budget: int | str = 0
    device_budget: int | str = 0
    spill_dir: str | None = None
    retrieval: RetrievalConfig = field(default_factory=lambda: RetrievalConfig(budget=256))
    runtime: RuntimeConfig = field(default_factory=lambda: RuntimeConfig(progress=False))
    cache: CacheConfig = field(default_factory=CacheConfig)

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be a non-empty string or None (no auth)")
        if self.max_request_bytes < 1 or self.rate_limit < 0 or self.default_max_tokens < 0:
            raise ValueError("max_request_bytes must be >= 1, rate_limit and default_max_tokens >= 0")
        if self.max_tokens_limit < self.default_max_tokens:
            raise ValueError(f"max_tokens_limit ({self.max_tokens_limit}) is below default_max_tokens "
                             f"({self.default_max_tokens})")


def create_app(model, config: ServerConfig | None = None, manager: SessionManager | None = None) -> FastAPI:
    """The FastAPI app serving `model` (a kvloft Model with a tokenizer)."""
    cfg = config or ServerConfig()
    if model.tokenizer is None:
        raise ValueError(f"model {model.source} has no tokenizer; the server needs one to read text "
                         "(load a real model, e.g. kvloft.load_model('smollm2'))")
    manager = manager or SessionManager(model, retrieval=cfg.retrieval, runtime=cfg.runtime, cache=cfg.cache,
                                        max_sessions=cfg.max_sessions, host_budget=cfg.host_budget,
                                        device_budget=cfg.device_budget, spill_dir=cfg.spill_dir)
    name = cfg.model_name or model.config.name
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        manager.close()

    app = FastAPI(title="kvloft", version=_version(), lifespan=lifespan)
    app.state.manager, app.state.model, app.state.config = manager, model, cfg
    app.add_middleware(Guard, api_key=cfg.api_key, max_body=cfg.max_request_bytes,
                       limiter=RateLimiter(cfg.rate_limit) if cfg.rate_limit else None)
    _add_error_handlers(app)
    _add_routes(app, model, manager, cfg, name)
    return app


# ---- routes ------------------------------------------------------------------------------------


def _add_routes(app: FastAPI, model, manager: SessionManager, cfg: ServerConfig, name: str) -> None:
    created = int(time.time())

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "kvloft"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await _parse(request, P.CompletionRequest)
        return await _serve(_Job.from_request(req, cfg, name, model, chat=False), manager)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await _parse(request, P.ChatRequest)
        return await _serve(_Job.from_request(req, cfg, name, model, chat=True), manager)

    @app.get("/v1/sessions/{session_id}")
    async def session_info(session_id: str) -> dict:
        info = manager.info(session_id)
        if info is None:
            raise P.APIError(404, f"no session {session_id!r}", code="session_not_found", param="session_id")
        return info

    @app.delete("/v1/sessions/{session_id}")
    async def session_delete(session_id: str) -> dict:
        if not await manager.delete(session_id):
            raise P.APIError(404, f"no session {session_id!r}", code="session_not_found", param="session_id")
        return {"id": session_id, "object": "session", "deleted": True}

    @app.get("/v1/usage")
    async def usage() -> dict:
        return manager.usage()


async def _parse(request: Request, model_cls):
    """The JSON body as `model_cls` (whatever the Content-Type says, as OpenAI's server does)."""
    raw = await request.body()
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise P.APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from e
    if not isinstance(obj, dict):
        raise P.APIError(400, f"the request body must be a JSON object, got {type(obj).__name__}",
                         code="invalid_json")
    try:
        return model_cls.model_validate(obj)
    except ValidationError as e:
        raise P.APIError(400, _describe(e.errors()), param=_where(e.errors())) from e


def _where(errors: list[dict]) -> str | None:
    loc = errors[0].get("loc", ()) if errors else ()
    return ".".join(str(x) for x in loc if x != "body") or None


def _describe(errors: list[dict]) -> str:
    first = errors[0] if errors else {}
    where = _where(errors)
    msg = f"{where}: {first.get('msg', 'invalid value')}" if where else first.get("msg", "invalid request")
    return msg + (f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else "")


@dataclass
class _Job:
    """One request, validated: what to feed, how to generate, how to answer."""

    chat: bool
    model_name: str
    session_id: str | None
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
    def from_request(cls, req, cfg: ServerConfig, name: str, model, chat: bool) -> _Job:
        if req.model != name:
            raise P.APIError(404, f"model {req.model!r} is not served here; this server serves {name!r} "
                                  "(GET /v1/models)", code="model_not_found", param="model")
        req.refuse_unsupported()
        max_tokens = req.max_tokens
        if chat and req.max_completion_tokens is not None:
            max_tokens = req.max_completion_tokens
        max_tokens = cfg.default_max_tokens if max_tokens is None else max_tokens
        if max_tokens > cfg.max_tokens_limit:
            raise P.APIError(400, f"max_tokens={max_tokens} is over this server's limit of {cfg.max_tokens_limit}",
                             param="max_tokens")
        return cls(chat=chat, model_name=name, session_id=req.session_id,
                   retrieval=req.kvloft.model_dump(exclude_none=True) if req.kvloft else {},
                   prompt=_chat_messages(req) if chat else _completion_prompt(req, model),
                   max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, stop=req.stop_list(),
                   seed=req.seed, stream=req.stream,
                   include_usage=bool(req.stream_options and req.stream_options.include_usage),
                   rid=P.new_id("chatcmpl" if chat else "cmpl"),
                   progress=bool(req.stream and req.prefill_progress))


def _chat_messages(req: P.ChatRequest) -> list[dict[str, str]]:
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]


def _completion_prompt(req: P.CompletionRequest, model) -> str | list[int]:
    p = req.prompt
    if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        if len(p) != 1:
            raise P.APIError(400, f"prompt has {len(p)} strings; kvloft completes one prompt per request",
                             param="prompt")
        p = p[0]
    if not p:
        raise P.APIError(400, "the prompt is empty", param="prompt")
    return p


async def _serve(job: _Job, manager: SessionManager):
    try:
        lease = await manager.acquire(job.session_id, job.retrieval)
    except SessionsBusy as e:
        raise P.APIError(503, str(e), type="server_error", code="sessions_busy") from e
    except SessionMismatch as e:
        raise P.APIError(409, str(e), code="session_mismatch", param="kvloft") from e
    except (ValueError, TypeError) as e:
        raise P.APIError(400, str(e), param="kvloft") from e
    streaming = False
    try:
        run = _Run(job, lease)
        if job.progress:  # the stream feeds the prompt itself, reporting as it goes
            streaming = True
            return LeasedStream(_progress_then_events(run), release=lambda: manager.release(lease))
        await anyio.to_thread.run_sync(run.prefill)
        if job.stream:
            streaming = True  # the response gives the session back when the stream ends
            return LeasedStream(_events(run), release=lambda: manager.release(lease))
        await anyio.to_thread.run_sync(run.generate_all)
        return JSONResponse(run.response())
    finally:
        if not streaming:
            await manager.release(lease)


class _Run:
    """Feeding and generating for one job on one held session (blocking: runs in worker threads)."""

    def __init__(self, job: _Job, lease) -> None:
        self.job, self.lease, self.session = job, lease, lease.session
        self.reused = len(self.session)
        self.fed = 0
        self.text = ""
        self.finish = "stop"

    def prefill(self, on_progress=None) -> None:
        s, job = self.session, self.job
        try:
            if job.chat:
                text = _chat_text(s.model.tokenizer, job.prompt, continuing=bool(len(s)),
                                  open_turn=self.lease.meta.get("open_turn", False))
                self.fed = s.feed(text, on_progress)
                self.lease.meta["open_turn"] = True
            else:
                self.fed = s.feed(job.prompt, on_progress)
                self.lease.meta["open_turn"] = False
        except (ValueError, TypeError) as e:
            raise P.APIError(400, str(e), param="messages" if job.chat else "prompt") from e
        self.start = len(s)

    def pieces(self):
        job = self.job
        if job.max_tokens == 0:
            self.finish = "length"
            return
        try:
            yield from self.session.stream(job.max_tokens, job.temperature, job.top_p, job.stop, job.seed)
        except (ValueError, TypeError) as e:
            raise P.APIError(400, str(e)) from e
        self.finish = self._finish_reason()

    def generate_all(self) -> None:
        self.text = "".join(self.pieces())

    def _finish_reason(self) -> str:
        new = self.session.tokens[self.start:]
        if len(new) < self.job.max_tokens:
            return "stop"
        decoded = self.session.model.tokenizer.decode(new)
        return "stop" if any(s in decoded for s in self.job.stop) else "length"

    @property
    def n_generated(self) -> int:
        return len(self.session) - self.start

    def extension(self) -> dict[str, Any]:
        return {"session_id": None if self.lease.ephemeral else self.lease.id, "prefilled_tokens": self.fed,
                "reused_tokens": self.reused, "context_tokens": len(self.session),
                "retrieval": {"method": self.session.retrieval.method, "budget": self.session.retrieval.budget}}

    def usage(self) -> dict[str, int]:
        return P.usage(self.fed, self.n_generated)

    def response(self) -> dict[str, Any]:
        j = self.job
        build = P.chat_completion if j.chat else P.completion
        return build(j.rid, j.model_name, self.text, self.finish, self.usage(), self.extension())


async def _events(run: _Run) -> AsyncIterator[str]:
    """Server-sent events of a streamed answer; an error after the start is sent as an error event."""
    j = run.job
    it = run.pieces()
    done = object()
    try:
        if j.chat:
            yield _sse(P.chat_chunk(j.rid, j.model_name, {"role": "assistant", "content": ""}, None))
        while (piece := await anyio.to_thread.run_sync(next, it, done)) is not done:
            chunk = (P.chat_chunk(j.rid, j.model_name, {"content": piece}, None) if j.chat
                     else P.completion_chunk(j.rid, j.model_name, piece, None))
            yield _sse(chunk)
        yield _sse(P.chat_chunk(j.rid, j.model_name, {}, run.finish) if j.chat
                   else P.completion_chunk(j.rid, j.model_name, "", run.finish))
        if j.include_usage:
            obj = "chat.completion.chunk" if j.chat else "text_completion"
            yield _sse(P.usage_chunk(j.rid, j.model_name, obj, run.usage(), run.extension()))
    except P.APIError as e:
        yield _sse(e.body())
    except Exception as e:  # the status line is gone: report in the stream
        log.exception("stream failed")
        yield _sse(P.error_body(f"generation failed: {type(e).__name__}: {e}", "server_error"))
    yield "data: [DONE]\n\n"


async def _progress_then_events(run: _Run) -> AsyncIterator[str]:
    """Feed the prompt in a worker thread, streaming {"object": "kvloft.prefill", done, total}
    events after each prefill chunk, then the answer's events."""
    q: queue.Queue = queue.Queue()
    failed: list[BaseException] = []

    def work() -> None:
        try:
            run.prefill(lambda done, total: q.put((done, total)))
        except BaseException as e:  # reported in the stream: the status line is sent already
            failed.append(e)
        finally:
            q.put(None)

    threading.Thread(target=work, daemon=True).start()
    while (item := await anyio.to_thread.run_sync(q.get)) is not None:
        yield _sse({"id": run.job.rid, "object": "kvloft.prefill", "done": item[0], "total": item[1]})
    if failed:
        e = failed[0]
        yield _sse(e.body() if isinstance(e, P.APIError) else
                   P.error_body(f"prefill failed: {type(e).__name__}: {e}", "server_error"))
        yield "data: [DONE]\n\n"
        return
    async for event in _events(run):
        yield event


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class LeasedStream(StreamingResponse):
    """A streamed response that gives its session back when it ends, however it ends."""

    def __init__(self, content, release: Callable[[], Any]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._release()


def _chat_text(tok, messages: list[dict[str, str]], continuing: bool, open_turn: bool) -> str:
    """Chat messages rendered to append to a session: when continuing, closes an open assistant
    turn and leaves out what the template writes once per conversation (bos, a default system prompt)."""
    if not continuing:
        return tok.apply_chat_template(messages, True)
    return tok.apply_chat_template_continuation(messages, open_turn=open_turn)


# ---- guard: size, auth, rate -------------------------------------------------------------------


class RateLimiter:
    """Token bucket per client: `per_minute` requests a minute, bursts of the same size."""

    def __init__(self, per_minute: float) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, per_minute)
        self.buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, time)

    def take(self, client: str) -> float:
        """0 if allowed, else seconds until the next request is."""
        now = time.monotonic()
        tokens, t = self.buckets.get(client, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - t) * self.rate)
        if tokens >= 1:
            self.buckets[client] = (tokens - 1, now)
            return 0.0
        self.buckets[client] = (tokens, now)
        return (1 - tokens) / self.rate


class _TooLarge(StarletteHTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is over this server's limit of {limit} bytes")


class Guard:
    """ASGI middleware on /v1/*: body size (413), bearer token (401), rate limit (429)."""

    def __init__(self, app, api_key: str | None, max_body: int, limiter: RateLimiter | None) -> None:
        self.app, self.api_key, self.max_body, self.limiter = app, api_key, max_body, limiter

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            return await JSONResponse(refusal.body(), refusal.status, headers=refusal.headers)(scope, receive, send)
        await self.app(scope, self._counting(receive), send)

    def _refusal(self, scope, headers: dict[str, str]) -> P.APIError | None:
        size = headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > self.max_body):
            return P.APIError(413, f"the request body ({size} bytes) is over this server's limit of "
                                   f"{self.max_body} bytes", code="request_too_large")
        token = headers.get("authorization", "").removeprefix("Bearer ").strip()
        if self.api_key is not None and not hmac.compare_digest(token.encode(), self.api_key.encode()):
            return P.APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                              code="invalid_api_key")
        if self.limiter is not None:
            client = token or (scope.get("client") or ("?",))[0]
            wait = self.limiter.take(client)
            if wait:
                return P.APIError(429, f"rate limit reached: retry in {wait:.1f} s", type="requests",
                                  code="rate_limit_exceeded", headers={"Retry-After": str(math.ceil(wait))})
        return None

    def _counting(self, receive):
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise _TooLarge(self.max_body)
            return message

        return counted


# ---- errors ------------------------------------------------------------------------------------


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(P.APIError)
    async def api_error(request: Request, e: P.APIError):
        return JSONResponse(e.body(), e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        return JSONResponse(P.error_body(_describe(e.errors()), param=_where(e.errors())), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(e.status_code)
        return JSONResponse(P.error_body(str(e.detail), code=code), e.status_code)

    @app.exception_handler(Exception)
    async def crashed(request: Request, e: Exception):
        log.exception("request failed")
        return JSONResponse(P.error_body(f"internal error: {type(e).__name__}: {e}", "server_error"), 500)


def _version() -> str:
    from kvloft import __version__

    return __version__

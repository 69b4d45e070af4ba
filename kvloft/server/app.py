"""An OpenAI-compatible HTTP API over kvloft sessions (FastAPI).

    app = create_app(kvloft.load_model("smollm2"), ServerConfig(api_keys=("secret",)))
    uvicorn.run(app, host="127.0.0.1", port=8000)        # or: kvloft serve --model smollm2

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret")
    client.chat.completions.create(model=client.models.list().data[0].id, messages=[...],
                                   extra_body={"session_id": "doc-42", "kvloft": {"budget": 256}})

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with
`stream`, as server-sent events ending in `data: [DONE]`, `n`, `stop`, logprobs), and the
kvloft routes GET/DELETE /v1/sessions/{id}, GET /v1/usage, GET /metrics (Prometheus text
format: metrics.py), GET /health. Each request writes one JSON line to the logger
"kvloft.server.requests".

Sessions (`session_id`): a session is a conversation that stays fed. Each request's
prompt, or its messages, is appended to what the session already holds, and the answer
stays in it too; send only the new turns. The first request of a long document pays its
prefill once; later questions prefill only themselves (`kvloft.prefilled_tokens` in each
response, `GET /v1/sessions/{id}` for the session's stats). A chat answer's end-of-turn
token is not generated into the session; the next request closes the turn first.
Without `session_id` each request gets a fresh session. With API keys, a session belongs
to the key that made it (auth.py). A request whose client leaves, or that the server stops
while draining, leaves its session as it was (run.py).

Limits: optional bearer-token auth (401, one or several keys), a request-body limit (413),
a token-bucket rate limit per credential or address (429 with Retry-After), a limit on
every size a request controls (400 naming the `kvloft serve` option: limits.py), 503 with
Retry-After when every resident session is busy. Errors are OpenAI-style JSON:
{"error": {"message", "type", "param", "code"}}.

Every model call runs in one engine loop per app (batcher.py): requests on different
sessions are batched continuously, joining and leaving the running batch between steps;
requests on one session are serialized (manager.py). See docs/serving.md. The factory
returns a plain FastAPI app, so another host (e.g. a Ray Serve deployment) can mount the
same app.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvloft.config import GRAPH_MODES, CacheConfig, RetrievalConfig, RuntimeConfig
from kvloft.server import protocol as P
from kvloft.server.auth import SHARED, Keys, scoped_id
from kvloft.server.batcher import EngineLoop
from kvloft.server.engines import engine_name
from kvloft.server.guard import OWNER, Guard, RateLimiter
from kvloft.server.limits import LimitExceeded, Limits
from kvloft.server.manager import SessionManager, SessionMismatch, SessionsBusy
from kvloft.server.metrics import RequestRecord, ServerMetrics
from kvloft.server.run import (
    Cancelled,
    Job,
    LeasedStream,
    Run,
    cancelled_error,
    events,
    limit_error,
    progress_then_events,
    retrieval_fields,
    watch_disconnect,
)

log = logging.getLogger(__name__)
BUSY_RETRY_S = 1  # Retry-After of a 503 when every resident session is busy


@dataclass(frozen=True)
class ServerConfig:
    """Settings of one server.

    api_key / api_keys: bearer tokens accepted (any of them); none = open, sessions shared.
    model_name: the id served by /v1/models and expected in requests (None = the model's name).
    max_request_bytes: largest request body accepted.
    rate_limit: requests per minute per client (API key, else address); 0 = unlimited.
    rate_clients: clients whose rate buckets are remembered at once.
    default_max_tokens: max_tokens when unset (limits.max_tokens is the largest allowed).
    max_tokens_limit: if set, replaces limits.max_tokens (kept for callers that name it here).
    limits: the largest sizes a request may ask for (limits.py).
    max_sessions, host_budget, device_budget, spill_dir: the SessionManager's limits.
    max_batch: sequences decoded together in one engine step (more wait their turn).
    step_tokens: tokens one engine iteration works on: a token per decoding sequence, the
        rest prefill chunks (at least one chunk an iteration); also the sessions' prefill chunk
        unless runtime.prefill_chunk is set.
    """

    api_key: str | None = None
    api_keys: tuple[str, ...] = ()
    model_name: str | None = None
    max_request_bytes: int = 1 << 20
    rate_limit: float = 0.0
    rate_clients: int = 10_000
    default_max_tokens: int = 256
    max_tokens_limit: int | None = None
    limits: Limits = field(default_factory=Limits)
    max_sessions: int = 8
    host_budget: int | str = 0
    device_budget: int | str = 0
    spill_dir: str | None = None
    retrieval: RetrievalConfig = field(default_factory=lambda: RetrievalConfig(budget=256))
    runtime: RuntimeConfig = field(default_factory=lambda: RuntimeConfig(progress=False))
    cache: CacheConfig = field(default_factory=CacheConfig)
    max_batch: int = 32
    step_tokens: int = 512
    decode_graphs: str = "auto"

    def __post_init__(self) -> None:
        if self.max_tokens_limit is not None:
            object.__setattr__(self, "limits", dataclasses.replace(self.limits, max_tokens=self.max_tokens_limit))
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be a non-empty string or None (no auth)")
        if self.max_request_bytes < 1 or self.rate_limit < 0 or self.default_max_tokens < 0:
            raise ValueError("max_request_bytes must be >= 1, rate_limit and default_max_tokens >= 0")
        if self.max_batch < 1 or self.step_tokens < 1:
            raise ValueError(f"max_batch and step_tokens must be >= 1, got {self.max_batch}, {self.step_tokens}")
        if self.decode_graphs not in GRAPH_MODES:
            raise ValueError(f"decode_graphs must be one of {GRAPH_MODES} (kvloft.Engine's graphs), "
                             f"got {self.decode_graphs!r}")
        if self.limits.max_tokens < self.default_max_tokens:
            raise ValueError(f"limits.max_tokens ({self.limits.max_tokens}) is below default_max_tokens "
                             f"({self.default_max_tokens})")
        self.limits.check_retrieval(self.retrieval)  # the defaults themselves must be allowed
        if self.runtime.prefill_chunk is None:
            # prefill chunks of one iteration's token budget: a long prompt then leaves room for the
            # others' decode steps every iteration, and a cancel or a drain stops it within a chunk
            object.__setattr__(self, "runtime", dataclasses.replace(self.runtime, prefill_chunk=self.step_tokens))
        Keys(self.keys)  # validates them

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(((self.api_key,) if self.api_key else ()) + tuple(self.api_keys)))


def create_app(model, config: ServerConfig | None = None, manager: SessionManager | None = None,
               engine=None) -> FastAPI:
    """The FastAPI app serving `model` (a kvloft Model with a tokenizer).

    engine: what runs a batched decode step (default: kvloft.Engine, or its stand-in where
    kvloft has none; batcher.make_engine).
    app.state.draining (a threading.Event): set it (as `kvloft serve` does on SIGTERM) and every
    running request stops within one prefill chunk or decode step, leaving its session as it was.
    app.state.loop: the EngineLoop; app.state.metrics: the ServerMetrics.
    """
    cfg = config or ServerConfig()
    if model.tokenizer is None:
        raise ValueError(f"model {model.source} has no tokenizer; the server needs one to read text "
                         "(load a real model, e.g. kvloft.load_model('smollm2'))")
    manager = manager or SessionManager(model, retrieval=cfg.retrieval, runtime=cfg.runtime, cache=cfg.cache,
                                        max_sessions=cfg.max_sessions, host_budget=cfg.host_budget,
                                        device_budget=cfg.device_budget, spill_dir=cfg.spill_dir,
                                        limits=cfg.limits)
    name = cfg.model_name or model.config.name

    draining = threading.Event()
    loop = EngineLoop(model, engine=engine, max_batch=cfg.max_batch, step_tokens=cfg.step_tokens, draining=draining,
                      graphs=cfg.decode_graphs)
    loop.metrics = metrics = ServerMetrics(manager, engine_name(loop.engine))
    log.info("engine loop: %s engine, max_batch=%d, step_tokens=%d, decode graphs %s", engine_name(loop.engine),
             cfg.max_batch, cfg.step_tokens, cfg.decode_graphs)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        draining.set()
        await anyio.to_thread.run_sync(loop.close)
        manager.close()

    app = FastAPI(title="kvloft", version=_version(), lifespan=lifespan)
    app.state.manager, app.state.model, app.state.config = manager, model, cfg
    app.state.draining, app.state.loop, app.state.metrics = draining, loop, metrics
    limiter = RateLimiter(cfg.rate_limit, cfg.rate_clients) if cfg.rate_limit else None
    app.add_middleware(Guard, keys=Keys(cfg.keys), max_body=cfg.max_request_bytes, limiter=limiter)
    _add_error_handlers(app)
    _add_routes(app, manager, cfg, name)
    return app


# ---- routes ------------------------------------------------------------------------------------


def _add_routes(app: FastAPI, manager: SessionManager, cfg: ServerConfig, name: str) -> None:
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
        return await _tracked(request, cfg, name, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _tracked(request, cfg, name, chat=True)

    @app.get("/v1/sessions/{session_id}")
    async def session_info(session_id: str, request: Request) -> dict:
        info = manager.info(_owned(request, session_id))
        if info is None:
            raise _no_session(session_id)
        return {**info, "id": session_id}

    @app.delete("/v1/sessions/{session_id}")
    async def session_delete(session_id: str, request: Request) -> dict:
        if not await manager.delete(_owned(request, session_id)):
            raise _no_session(session_id)
        return {"id": session_id, "object": "session", "deleted": True}

    @app.get("/v1/usage")
    async def usage() -> dict:
        return manager.usage()

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def _owned(request: Request, session_id: str) -> str:
    """The manager's id of the caller's session `session_id` (a malformed id is unknown: 404)."""
    try:
        return scoped_id(request.scope.get(OWNER, SHARED), session_id)
    except ValueError as e:
        raise _no_session(session_id) from e


def _no_session(session_id: str) -> P.APIError:
    return P.APIError(404, f"no session {session_id!r}", code="session_not_found", param="session_id")


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


async def _tracked(request: Request, cfg: ServerConfig, name: str, chat: bool):
    """Parse, serve, and count and log the request once it is over (a stream: once it ended)."""
    metrics: ServerMetrics = request.app.state.metrics
    owner = request.scope.get(OWNER, SHARED)
    rec = RequestRecord(P.new_id("chatcmpl" if chat else "cmpl"), "chat" if chat else "completions",
                        key_id=owner or None)
    streaming = False
    try:
        req = await _parse(request, P.ChatRequest if chat else P.CompletionRequest)
        job = Job.from_request(req, cfg.default_max_tokens, cfg.limits, name, chat=chat, rid=rec.id)
        rec.session = job.session_id
        response = await _serve(job, request, rec)
        streaming = isinstance(response, LeasedStream)
        return response
    except P.APIError as e:
        rec.status = e.status
        rec.outcome = "cancelled" if e.code == "cancelled" else "refused" if e.status < 500 else "error"
        if e.code == "sessions_busy":
            rec.outcome = "refused"
        raise
    except Exception:
        rec.status, rec.outcome = 500, "error"
        raise
    finally:
        if not streaming:
            metrics.request_done(rec)


async def _serve(job: Job, request: Request, rec: RequestRecord):
    """Hold the job's sessions, run it, answer; the sessions are released once the loop let go of them."""
    st = request.app.state
    manager: SessionManager = st.manager
    leases = await _acquire_all(manager, job, request.scope.get(OWNER, SHARED))
    run = Run(job, leases, st.config.limits, st.loop, rec)
    watcher = watch_disconnect(request.receive, run.cancel)
    streaming = False

    async def release() -> None:
        for lease in reversed(leases):
            await manager.release(lease)

    try:
        await run.start()
        done = lambda: st.metrics.request_done(rec)
        if job.progress:  # the stream reports the prompt's feed as it goes
            streaming = True
            return LeasedStream(progress_then_events(run), run, watcher, release, done)
        await run.wait_prefilled()
        if job.stream:
            streaming = True  # the response gives the sessions back when the stream ends
            return LeasedStream(events(run), run, watcher, release, done)
        await run.collect()
        return JSONResponse(run.response())
    except Cancelled as e:
        raise cancelled_error(e) from e
    finally:
        if not streaming:
            watcher.cancel()
            with anyio.CancelScope(shield=True):
                await run.close()
                await release()


async def _acquire_all(manager: SessionManager, job: Job, owner: str) -> list:
    """The request's session, and a throwaway session of the same setup per extra choice."""
    leases = [await _acquire(manager, job, owner)]
    try:
        extra = dataclasses.replace(job, session_id=None, retrieval=retrieval_fields(leases[0]))
        for _ in range(job.n - 1):
            leases.append(await _acquire(manager, extra, owner))
    except BaseException:
        with anyio.CancelScope(shield=True):
            for lease in reversed(leases):
                await manager.release(lease)
        raise
    return leases


async def _acquire(manager: SessionManager, job: Job, owner: str):
    try:
        sid = None if job.session_id is None else scoped_id(owner, job.session_id)
    except ValueError as e:
        raise P.APIError(400, str(e), param="session_id") from e
    try:
        return await manager.acquire(sid, job.retrieval)
    except SessionsBusy as e:
        raise P.APIError(503, str(e), type="server_error", code="sessions_busy",
                         headers={"Retry-After": str(BUSY_RETRY_S)}) from e
    except SessionMismatch as e:
        raise P.APIError(409, str(e), code="session_mismatch", param="kvloft") from e
    except LimitExceeded as e:
        raise limit_error(e) from e
    except (ValueError, TypeError) as e:
        raise P.APIError(400, str(e), param="kvloft") from e


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

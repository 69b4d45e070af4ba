"""The OpenAI-compatible API as a Ray Serve deployment (one implementation: kvloft.server.app).

    from kvloft.cluster import deploy
    deploy("smollm2", port=8000)                          # serve.run of the deployment below
    # or, to compose it yourself:
    app = kvloft_deployment("smollm2", config=ServerConfig(api_key="k")).bind()
    serve.run(app, route_prefix="/")

The deployment's ingress is the FastAPI app of `kvloft serve` (`create_app`), built inside
each replica by a builder function (`@serve.ingress(builder)`), so the model loads where it
runs and never travels through the object store. Routes, session ids, streaming, limits and
errors are those of kvloft.server.app.

With `pipeline=PipelineConfig(...)` the replica's sessions are PipelinedSessions on one
StageGroup that the replica creates (the model's layers split over stage actors): session
`<id>`'s KV records persist in `<directory>/<id>/stage-<i>/`. Several sessions' steps then
flow through the stages together (each request runs in its own thread). Pipelined sessions
are not spilled to disk when the replica is full (their KV lives in the stages): past
`max_sessions` resident sessions a new one is refused (HTTP 503) until one is deleted
(DELETE /v1/sessions/{id}).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from kvloft.cluster.config import PipelineConfig
from kvloft.cluster.group import StageGroup, ensure_ray, import_ray
from kvloft.server.app import ServerConfig, create_app
from kvloft.server.engines import SequentialFallbackEngine
from kvloft.server.manager import Lease, SessionManager, SessionsBusy

ModelSource = str | Callable[[], Any]  # a name/path for kvloft.load_model, or a factory returning a Model


class PipelinedSessionManager(SessionManager):
    """A SessionManager whose sessions are PipelinedSessions on one shared StageGroup."""

    def __init__(self, model, pipeline: PipelineConfig, group: StageGroup | None = None, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.pipeline = pipeline
        self.group = group if group is not None else StageGroup(model, pipeline)
        self._own_group = group is None

    def _materialize(self, lease: Lease):
        from kvloft.cluster.session import PipelinedSession

        cfg = self.pipeline.replace(directory=str(Path(self.pipeline.directory) / lease.id), overwrite=True)
        return PipelinedSession(self.model, lease.retrieval, self.runtime, self.cache, pipeline=cfg,
                                group=self.group)

    async def _make_room(self, incoming: Lease | None) -> None:
        """No spilling: a new session is admitted while fewer than max_sessions are resident."""
        resident = sum(le.session is not None for le in self._leases.values())
        if incoming is None or resident < self.max_sessions:
            return
        raise SessionsBusy(f"{resident} pipelined sessions are resident (max_sessions={self.max_sessions}) and they "
                           "are not spilled; delete one (DELETE /v1/sessions/{id}) or raise max_sessions")

    async def release(self, lease: Lease) -> None:
        if lease.ephemeral and lease.session is not None:
            await anyio.to_thread.run_sync(lambda: lease.session.close(delete_files=True))
        await super().release(lease)

    async def delete(self, session_id: str) -> bool:
        lease = self._leases.get(session_id)
        if lease is not None and lease.session is not None:
            async with lease.lock:
                await anyio.to_thread.run_sync(lambda: lease.session.close(delete_files=True))
        return await super().delete(session_id)

    def close(self) -> None:
        for lease in list(self._leases.values()):
            if lease.session is not None:
                lease.session.close()
        super().close()
        if self._own_group:
            self.group.close()


def build_app(model: ModelSource, config: ServerConfig | None = None, pipeline: PipelineConfig | None = None,
              *, device: str = "auto", dtype: str = "auto"):
    """The FastAPI app of `kvloft serve` for `model`, over pipelined sessions when `pipeline` is given."""
    from kvloft.runtime.loader import load_model

    cfg = config or ServerConfig()
    m = load_model(model, device=device, dtype=dtype) if isinstance(model, str) else model()
    manager = None
    if pipeline is not None:
        manager = PipelinedSessionManager(m, pipeline, retrieval=cfg.retrieval, runtime=cfg.runtime, cache=cfg.cache,
                                        max_sessions=cfg.max_sessions, device_budget=cfg.device_budget)
    # pipelined sessions step through their stage actors, one Session.step each; the batched
    # engine runs a model held in this process
    engine = SequentialFallbackEngine(cfg.max_batch) if pipeline is not None else None
    return create_app(m, cfg, manager=manager, engine=engine)


def kvloft_deployment(model: ModelSource = "smollm2", *, config: ServerConfig | None = None,
                      pipeline: PipelineConfig | None = None, device: str = "auto", dtype: str = "auto",
                      **deployment_options: Any):
    """A Ray Serve Deployment whose ingress is kvloft's FastAPI app, built in each replica.

    deployment_options go to `serve.deployment` (name, num_replicas, ray_actor_options, ...).
    """
    if not isinstance(model, str) and not callable(model):
        raise TypeError(f"model must be a name/path for kvloft.load_model or a factory, got {type(model).__name__}")
    if pipeline is not None and not isinstance(pipeline, PipelineConfig):
        raise TypeError(f"pipeline must be a kvloft.cluster.PipelineConfig, got {type(pipeline).__name__}")
    import_ray()
    from ray import serve

    def build_kvloft_app():  # runs in the replica: the model loads there
        return build_app(model, config, pipeline, device=device, dtype=dtype)

    options = {"name": "kvloft", **deployment_options}

    @serve.deployment(**options)
    @serve.ingress(build_kvloft_app)
    class KvloftServer:
        """kvloft's OpenAI-compatible API (kvloft.server.app) in a Serve replica."""

    return KvloftServer


def deploy(model_name: ModelSource = "smollm2", *, config: ServerConfig | None = None,
           pipeline: PipelineConfig | None = None, name: str = "kvloft", route_prefix: str = "/",
           host: str = "127.0.0.1", port: int = 8000, proxy_location: str = "EveryNode", blocking: bool = False,
           **deployment_options: Any):
    """Start Serve's HTTP proxy on host:port and run the deployment; returns its handle once
    the replicas are up (blocking=True: serves until interrupted).

    The API is then at http://host:port{route_prefix}v1 (e.g. /v1/chat/completions).
    proxy_location: "EveryNode" (Ray's default: a proxy on every node running a replica) or
    "HeadOnly" (one proxy; needed when several Ray nodes share one machine, as they would
    all bind host:port).
    """
    if proxy_location not in ("EveryNode", "HeadOnly"):
        raise ValueError(f"proxy_location must be 'EveryNode' or 'HeadOnly', got {proxy_location!r}")
    import_ray()
    from ray import serve

    ensure_ray(pipeline.address if pipeline else None)
    serve.start(proxy_location=proxy_location, http_options={"host": host, "port": port})
    app = kvloft_deployment(model_name, config=config, pipeline=pipeline, **deployment_options).bind()
    return serve.run(app, name=name, route_prefix=route_prefix, blocking=blocking)

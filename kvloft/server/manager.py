"""Many sessions of one model under one memory budget.

    manager = SessionManager(model, max_sessions=8, host_budget="8GiB")
    async with manager.use("alice", {"budget": 256}) as lease:   # waits for alice's earlier requests
        await anyio.to_thread.run_sync(lease.session.feed, text)

- Requests on one session are serialized (an asyncio lock per session); requests on
  different sessions interleave (in the server, their model calls share one engine loop:
  kvloft.server.batcher).
- At most `max_sessions` sessions are resident; their host-tier bytes stay under
  `host_budget` and their static-tier bytes (device memory on CUDA) under `device_budget`
  (0 = no limit). Making room evicts the least recently used idle session: it is saved
  to `spill_dir` (kvloft.runtime.persist, crash-safe) and loaded back on its next use.
  Busy sessions are never evicted; when no idle one is left a new request is refused
  (SessionsBusy, HTTP 503 in the server). Within a request a session grows up to its own
  RuntimeConfig.host_memory_budget, set to `host_budget` unless given.
- With `limits` (kvloft.server.limits.Limits): at most `max_stored_sessions` named sessions
  are kept, resident or spilled (a new id past that is refused, LimitExceeded), and the
  spilled bytes stay under `spill_limit` (checked before a session is written; when no idle
  session fits, the request that needed room is refused).
- A request without a session id gets a throwaway session (an unguessable id) that counts
  against the same limits while it runs.
- Ids may carry an owner prefix (`<16 hex>~<id>`, see auth.py): the manager keeps them apart
  like any other ids.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from kvloft.config import CacheConfig, RetrievalConfig, RuntimeConfig, parse_bytes
from kvloft.runtime.persist import save_session
from kvloft.runtime.session import Session
from kvloft.server.limits import Limits
from kvloft.server.memory import trim

SESSION_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
OWNED_ID_RE = re.compile(r"(?:[0-9a-f]{16}~)?" + SESSION_ID_RE.pattern)


class SessionsBusy(RuntimeError):
    """No room for another resident session: every resident one is busy."""


class SessionMismatch(ValueError):
    """A request asks an existing session for a retrieval setup it was not built with."""


@dataclass
class Lease:
    """One session while a request holds it. `meta` is free per-session state for the caller."""

    id: str
    retrieval: RetrievalConfig
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    session: Session | None = None  # None while spilled to disk (or not yet created)
    spill: Path | None = None
    spilled_bytes: dict[str, int] = field(default_factory=dict)
    spill_size: int = 0  # bytes of its files on disk while spilled
    ephemeral: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    last_used: float = field(default_factory=time.monotonic)
    requests: int = 0
    users: int = 0  # requests holding or waiting for this session (idle = 0)


class SessionManager:
    def __init__(self, model, *, retrieval: RetrievalConfig | None = None, runtime: RuntimeConfig | None = None,
                 cache: CacheConfig | None = None, max_sessions: int = 8, host_budget: int | str = 0,
                 device_budget: int | str = 0, spill_dir: str | Path | None = None,
                 limits: Limits | None = None) -> None:
        if isinstance(max_sessions, bool) or not isinstance(max_sessions, int) or max_sessions < 1:
            raise ValueError(f"max_sessions must be an int >= 1, got {max_sessions!r}")
        self.model = model
        self.retrieval = retrieval or RetrievalConfig()
        self.host_budget = parse_bytes(host_budget)
        self.device_budget = parse_bytes(device_budget)
        runtime = runtime or RuntimeConfig(progress=False)
        if self.host_budget and not runtime.host_memory_budget:
            runtime = RuntimeConfig(**{**runtime.__dict__, "host_memory_budget": self.host_budget})
        self.runtime, self.cache = runtime, cache or CacheConfig()
        self.max_sessions = max_sessions
        self.limits = limits
        self._own_spill = spill_dir is None
        self.spill_dir = Path(tempfile.mkdtemp(prefix="kvloft-sessions-") if spill_dir is None else spill_dir)
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        self._leases: OrderedDict[str, Lease] = OrderedDict()  # least recently used first
        self._admit = asyncio.Lock()
        self.evictions = 0
        self.restores = 0

    # ---- public --------------------------------------------------------------------------

    @asynccontextmanager
    async def use(self, session_id: str | None, retrieval: dict[str, Any] | None = None) -> AsyncIterator[Lease]:
        """Hold a session (created, or brought back from disk) for one request.

        retrieval: RetrievalConfig fields for this request. A new session is built with the
        manager's defaults updated by them; an existing session keeps its method and tiers
        (SessionMismatch if they differ) and takes a new budget from here on.
        """
        lease = await self.acquire(session_id, retrieval)
        try:
            yield lease
        finally:
            await self.release(lease)

    async def acquire(self, session_id: str | None, retrieval: dict[str, Any] | None = None) -> Lease:
        """Like use(), for callers that release later (e.g. after a streamed response)."""
        lease = self._lease_for(session_id, retrieval)
        lease.users += 1
        try:
            await lease.lock.acquire()
        except BaseException:
            lease.users -= 1
            raise
        try:
            async with self._admit:
                if lease.session is None:
                    await self._make_room(lease)
                    lease.session = await anyio.to_thread.run_sync(self._materialize, lease)
            if retrieval and "budget" in retrieval:
                set_budget(lease.session, retrieval["budget"])
                lease.retrieval = lease.session.retrieval
            if lease.id in self._leases:
                self._leases.move_to_end(lease.id)
            lease.requests += 1
            return lease
        except BaseException:
            lease.users -= 1
            self._forget_if_empty(lease)
            lease.lock.release()
            raise

    async def release(self, lease: Lease) -> None:
        lease.last_used = time.monotonic()
        lease.users -= 1
        dropped = lease.ephemeral and lease.session is not None
        if lease.ephemeral:
            self._leases.pop(lease.id, None)
            lease.session = None
        lease.lock.release()
        async with self._admit:
            await self._make_room(None)
        if dropped:
            await anyio.to_thread.run_sync(trim)

    async def delete(self, session_id: str) -> bool:
        """Forget a session (waits for its running request). False if unknown."""
        lease = self._leases.get(session_id)
        if lease is None:
            return False
        async with lease.lock:
            self._leases.pop(session_id, None)
            lease.session = None
            if lease.spill is not None:
                shutil.rmtree(lease.spill, ignore_errors=True)
        await anyio.to_thread.run_sync(trim, 0.0)
        return True

    def info(self, session_id: str) -> dict[str, Any] | None:
        lease = self._leases.get(session_id)
        if lease is None or lease.ephemeral:
            return None
        out: dict[str, Any] = {"id": lease.id, "resident": lease.session is not None, "busy": lease.lock.locked(),
                               "requests": lease.requests, "retrieval": _retrieval_json(lease.retrieval)}
        if lease.session is not None and not lease.lock.locked():
            out["stats"] = lease.session.stats()
        elif lease.session is None:
            out["bytes"] = dict(lease.spilled_bytes)
        if lease.meta.get("rebuild"):  # a stopped request's undo: its next request feeds these again
            out["rebuild_tokens"] = len(lease.meta["rebuild"])
        return out

    def usage(self) -> dict[str, Any]:
        """Resident sessions and bytes against the limits."""
        resident = [le for le in self._leases.values() if le.session is not None]
        host, device = self._bytes(resident)
        return {"sessions": len(self._leases), "resident": len(resident), "max_sessions": self.max_sessions,
                "host_bytes": host, "host_budget": self.host_budget, "device_bytes": device,
                "device_budget": self.device_budget, "spilled_bytes": self.spilled_bytes(),
                "evictions": self.evictions, "restores": self.restores}

    def tier_bytes(self) -> dict[str, int]:
        """KV bytes of every session by tier: "gpu" (the compute device's static tier and block
        summaries), "host" (host tier in memory), "disk" (host chunks on disk, and spilled sessions)."""
        out = {"gpu": 0, "host": 0, "disk": self.spilled_bytes()}
        for le in list(self._leases.values()):
            s = le.session
            if s is None:
                continue
            b = s.backend.bytes()
            out["gpu"] += b.get("static", 0) + b.get("summary", 0)
            out["host"] += b.get("host", 0)
            out["disk"] += b.get("disk", 0)
        return out

    def close(self) -> None:
        """Drop every session; remove the spill directory if the manager made it."""
        self._leases.clear()
        if self._own_spill:
            shutil.rmtree(self.spill_dir, ignore_errors=True)

    # ---- internals -----------------------------------------------------------------------

    def _lease_for(self, session_id: str | None, retrieval: dict[str, Any] | None) -> Lease:
        retrieval = dict(retrieval or {})
        if session_id is None:
            lease = Lease(id=f"tmp-{secrets.token_hex(16)}", retrieval=self.retrieval.replace(**retrieval),
                          ephemeral=True)
            self._leases[lease.id] = lease
            return lease
        if not isinstance(session_id, str) or not OWNED_ID_RE.fullmatch(session_id):
            raise ValueError(f"session_id must be 1-128 characters of letters, digits, '_', '-', '.', starting "
                             f"with a letter or digit; got {session_id!r}")
        lease = self._leases.get(session_id)
        if lease is None:
            if self.limits is not None:
                self.limits.check_new_session(sum(not le.ephemeral for le in self._leases.values()))
            lease = Lease(id=session_id, retrieval=self.retrieval.replace(**retrieval))
            self._leases[session_id] = lease
        else:
            _check_compatible(lease, retrieval)
        return lease

    def _materialize(self, lease: Lease) -> Session:
        """Runs in a worker thread: load a spilled session, or create a new one."""
        if lease.spill is None:
            return Session(self.model, lease.retrieval, self.runtime, self.cache)
        s = Session.load(lease.spill, self.model, runtime=self.runtime)
        shutil.rmtree(lease.spill, ignore_errors=True)
        lease.spill, lease.spilled_bytes, lease.spill_size = None, {}, 0
        self.restores += 1
        return s

    async def _make_room(self, incoming: Lease | None) -> None:
        """Evict idle sessions (LRU first) until the residents, plus `incoming`, fit the limits."""
        while True:
            resident = [le for le in self._leases.values() if le.session is not None]
            host, device = self._bytes(resident)
            count = len(resident)
            if incoming is not None:
                count += 1
                host += incoming.spilled_bytes.get("host", 0)
                device += incoming.spilled_bytes.get("static", 0)
            if self._fits(count, host, device):
                return
            # a session with a waiting request is not idle: evicting it would wait on that request,
            # which itself waits for this admission
            idle = [le for le in resident if le.users == 0 and le is not incoming]
            if not idle:
                if incoming is None:
                    return  # the busy sessions are evicted once they are released
                raise SessionsBusy(
                    f"no room for another session: {len(resident)} resident sessions are busy "
                    f"(max_sessions={self.max_sessions}, host {host / 2**20:.1f}/{self.host_budget / 2**20:.1f} MiB); "
                    "retry shortly"
                )
            victim = self._spillable(idle)
            if victim is None:  # the spill limit is reached
                if incoming is None:
                    return
                self.limits.check_spill(self.spilled_bytes(), min(_size(le) for le in idle))
            await self._evict(victim)

    def _spillable(self, idle: list[Lease]) -> Lease | None:
        """The least recently used idle session whose save fits the spill limit, if any."""
        if self.limits is None:
            return idle[0]
        spilled = self.spilled_bytes()
        return next((le for le in idle if spilled + _size(le) <= self.limits.spill_limit), None)

    def spilled_bytes(self) -> int:
        return sum(le.spill_size for le in self._leases.values() if le.spill is not None)

    def _fits(self, count: int, host: int, device: int) -> bool:
        return (count <= self.max_sessions and (not self.host_budget or host <= self.host_budget)
                and (not self.device_budget or device <= self.device_budget))

    async def _evict(self, lease: Lease) -> None:
        async with lease.lock:
            if lease.session is None:
                return
            path = self.spill_dir / lease.id
            await anyio.to_thread.run_sync(save_session, lease.session, path)
            lease.spilled_bytes = lease.session.backend.bytes()
            lease.spill, lease.session = path, None
            lease.spill_size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            self.evictions += 1
        await anyio.to_thread.run_sync(trim, 0.0)

    def _forget_if_empty(self, lease: Lease) -> None:
        if lease.session is None and lease.spill is None and lease.users == 0:
            self._leases.pop(lease.id, None)

    @staticmethod
    def _bytes(leases: list[Lease]) -> tuple[int, int]:
        host = device = 0
        for le in leases:
            b = le.session.backend.bytes()
            host += b.get("host", 0)
            device += b.get("static", 0)
        return host, device


def _size(lease: Lease) -> int:
    """Bytes a resident session's save will take, about: its tiers' bytes."""
    return sum(lease.session.backend.bytes().values())


def _check_compatible(lease: Lease, want: dict[str, Any]) -> None:
    have = lease.retrieval
    diff = [f"{k}: {getattr(have, k)!r} (asked {v!r})" for k, v in want.items()
            if k != "budget" and getattr(have, k, None) != v]
    if diff:
        raise SessionMismatch(f"session {lease.id!r} was built with other tiers: {', '.join(diff)}; its method and "
                              "tiers are fixed, so use a new session_id for another setup (budget may change)")


def set_budget(session: Session, budget: int) -> None:
    """Change how many host-tier keys a session retrieves per step (the retrievers re-rank on change)."""
    if budget == session.retrieval.budget:
        return
    session.retrieval = session.retrieval.replace(budget=budget)
    if hasattr(session.backend, "rcfg"):
        session.backend.rcfg = session.retrieval


def _retrieval_json(r: RetrievalConfig) -> dict[str, Any]:
    return {"method": r.method, "budget": r.budget, "n_sink": r.n_sink, "n_window": r.n_window}

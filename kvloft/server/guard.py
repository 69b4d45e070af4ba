"""The server's front door (ASGI middleware): body size (413), API key (401), rate limit (429).

Every path but /health needs the key when keys are set (the API, /docs and /openapi.json
alike). The key's owner tag is left in the ASGI scope under OWNER for the routes. The rate
limit's buckets are keyed by the credential (the owner tag), else by the client's address,
never by whatever token an unauthenticated client chooses to send; their number is bounded.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvloft.server import protocol as P
from kvloft.server.auth import SHARED, Keys

OWNER = "kvloft.owner"  # scope key: the owner tag of the request's credential
OPEN_PATHS = frozenset({"/health"})


class RateLimiter:
    """Token bucket per client: `per_minute` requests a minute, bursts of the same size.

    At most `max_clients` buckets are kept: past that, full buckets (clients idle long enough
    to have refilled, which lose nothing by being forgotten) go first, then the least recently seen.
    """

    def __init__(self, per_minute: float, max_clients: int = 10_000) -> None:
        if per_minute <= 0 or max_clients < 1:
            raise ValueError(f"per_minute must be > 0 and max_clients >= 1, got {per_minute}, {max_clients}")
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, per_minute)
        self.max_clients = max_clients
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, time)

    def take(self, client: str) -> float:
        """0 if allowed, else seconds until the next request is."""
        now = time.monotonic()
        tokens, t = self.buckets.pop(client, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - t) * self.rate)
        allowed = tokens >= 1
        self.buckets[client] = (tokens - 1 if allowed else tokens, now)
        if len(self.buckets) > self.max_clients:
            self._shrink(now)
        return 0.0 if allowed else (1 - tokens) / self.rate

    def _shrink(self, now: float) -> None:
        full = [c for c, (tok, t) in self.buckets.items() if tok + (now - t) * self.rate >= self.capacity]
        for c in full[: len(self.buckets) - self.max_clients]:
            del self.buckets[c]
        while len(self.buckets) > self.max_clients:
            self.buckets.popitem(last=False)


class _TooLarge(StarletteHTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is over this server's limit of {limit} bytes")


class Guard:
    """ASGI middleware: body size (413), bearer token (401), rate limit (429) on all but OPEN_PATHS."""

    def __init__(self, app, keys: Keys, max_body: int, limiter: RateLimiter | None) -> None:
        self.app, self.keys, self.max_body, self.limiter = app, keys, max_body, limiter

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
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
        owner = SHARED
        if self.keys:
            token = headers.get("authorization", "").removeprefix("Bearer ").strip()
            owner = self.keys.owner_of(token)
            if owner is None:
                return P.APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                                  code="invalid_api_key")
        scope[OWNER] = owner
        if self.limiter is not None:
            client = owner or "addr:" + str((scope.get("client") or ("?",))[0])
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

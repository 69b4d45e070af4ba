"""A uvicorn server that drains on SIGTERM/SIGINT: running requests stop, then it exits.

uvicorn alone stops accepting connections on SIGTERM and then waits for every open one to
finish, which for a long prefill is as long as the prefill. This server also sets the
app's `draining` event, so each running request stops within one prefill chunk or decode
step (kvloft.server.run), answers 503 and leaves its session as it was; the app's lifespan
then closes the SessionManager, which removes its own spill directory.
"""

from __future__ import annotations

import threading

import uvicorn

DRAIN_S = 4.0  # uvicorn cancels what is still open after this many seconds


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, draining: threading.Event) -> None:
        super().__init__(config)
        self.draining = draining

    def handle_exit(self, sig, frame) -> None:
        self.draining.set()
        super().handle_exit(sig, frame)


def serve(app, host: str, port: int, log_level: str = "info") -> None:
    """Run `app` (from create_app) until SIGTERM/SIGINT, draining it on the way out."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=DRAIN_S)
    DrainingServer(config, app.state.draining).run()

"""An ASGI app on uvicorn in a thread, on a free localhost port (tests of the HTTP server)."""

import json
import socket
import threading
import time
import urllib.error
import urllib.request


class Served:
    """`with Served(app) as s:` serves `app` at s.url until the block ends."""

    def __init__(self, app, make_server=None) -> None:
        """make_server(uvicorn.Config) -> a uvicorn.Server (default: uvicorn.Server itself)."""
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = (make_server or uvicorn.Server)(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()

    def request(self, method: str, path: str, body=None) -> tuple[int, str]:
        return request(self.url, method, path, body)


def request(url: str, method: str, path: str, body=None, timeout: float = 60) -> tuple[int, str]:
    """(status, body text) of one plain HTTP request; a dict body is sent as JSON."""
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def free_port() -> int:
    """A localhost port free right now (for servers that bind it themselves)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

"""`kvloft serve` against a hostile or careless client: limits on every size a request controls,
sessions owned by their key, work that stops when its client leaves or the server drains,
rate limits by credential or address, 503 with Retry-After. Tiny random weights behind the
real SmolLM2 tokenizer (`chatty`); `slow` sleeps 50 ms per forward call so that a prefill or
an answer lasts seconds and a test can leave in the middle of it."""

import dataclasses
import http.client
import json
import logging
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

uvicorn = pytest.importorskip("uvicorn")

from served import Served

from kvloft import RetrievalConfig, RuntimeConfig, Session
from kvloft.cli import build_parser
from kvloft.server import serve_settings
from kvloft.server.app import ServerConfig, create_app
from kvloft.server.drain import DRAIN_S, DrainingServer
from kvloft.server.guard import RateLimiter
from kvloft.server.limits import Limits

KEY, OTHER = "key-alice", "key-bob"
RETRIEVAL = RetrievalConfig(method="exact", budget=32, n_sink=8, n_window=64)
RUNTIME = RuntimeConfig(progress=False)
SLOW_RUNTIME = RuntimeConfig(progress=False, prefill_chunk=16)
DELAY_S = 0.05  # per forward call of `slow`: one prefill chunk or one decode step
LONG = "word " * 1500  # 94 chunks of 16 tokens: a minute of prefill on `slow` on a 2-core CPU


class SlowNet:
    """The network, 50 ms slower per call."""

    def __init__(self, net, delay: float) -> None:
        self.net, self.delay = net, delay

    def __call__(self, *args, **kwargs):
        time.sleep(self.delay)
        return self.net(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.net, name)


@pytest.fixture(scope="module")
def slow(chatty):
    return dataclasses.replace(chatty, net=SlowNet(chatty.net, DELAY_S))


def _app(model, tmp_path=None, **kw):
    kw = {"api_keys": (KEY, OTHER), "retrieval": RETRIEVAL, "runtime": RUNTIME,
          "spill_dir": None if tmp_path is None else str(tmp_path), **kw}
    return create_app(model, ServerConfig(**kw))


def call(url, method, path, body=None, key=KEY, timeout=60):
    """(status, headers, parsed JSON or text) of one plain HTTP request."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, hdrs, raw = r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        status, hdrs, raw = e.code, e.headers, e.read()
    try:
        return status, hdrs, json.loads(raw)
    except json.JSONDecodeError:
        return status, hdrs, raw.decode()


def completion(prompt, session_id=None, max_tokens=4, **extra):
    body = {"model": "tiny-chat", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    if session_id is not None:
        body["session_id"] = session_id
    return body


def open_request(url, path, body, key=KEY) -> socket.socket:
    """Send a request on a raw socket and return the socket (close it to disconnect)."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    s = socket.create_connection((host, int(port)))
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\nContent-Type: "
              f"application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


def hang_up(s: socket.socket) -> None:
    s.shutdown(socket.SHUT_RDWR)
    s.close()


def wait_busy(url, sid, busy=True, timeout=10.0, key=KEY) -> float:
    """Seconds until session `sid` is (or is no longer) held by a request."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        status, _, info = call(url, "GET", f"/v1/sessions/{sid}", key=key)
        if status == 200 and info["busy"] == busy:
            return time.monotonic() - t0
        time.sleep(0.02)
    raise AssertionError(f"session {sid} busy={not busy} for over {timeout} s")


def tokens_of(app, sid, key=KEY):
    from kvloft.server.auth import owner_tag

    return list(app.state.manager._leases[f"{owner_tag(key)}~{sid}"].session.tokens)


def direct(model, turns, n=4):
    """A Session fed each prompt of `turns` in turn, generating n tokens after each: (answers, tokens)."""
    s = Session(model, RETRIEVAL, RUNTIME)
    answers = []
    for prompt in turns:
        s.feed(prompt)
        answers.append(s.generate(max_new_tokens=n))
    return answers, list(s.tokens)


# ---- 1. limits ---------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value,option", [("n_window", 20000, "--max-window"), ("n_sink", 5000, "--max-sink"),
                                                ("budget", 10**6, "--max-budget")])
def test_a_static_tier_or_budget_over_the_limit_is_refused_before_any_session_exists(chatty, field, value, option):
    app = _app(chatty)
    with Served(app) as s:
        status, _, body = call(s.url, "POST", "/v1/completions", completion("hi", "big", kvloft={field: value}))
        assert status == 400 and option in body["error"]["message"] and body["error"]["code"] == "limit_exceeded"
        assert app.state.manager.usage()["sessions"] == 0  # nothing was built
        status, _, body = call(s.url, "POST", "/v1/completions", completion("hi", max_tokens=10**6))
        assert status == 400 and "--max-tokens-limit" in body["error"]["message"]


def test_a_prompt_over_max_context_is_refused_before_prefill(chatty):
    app = _app(chatty, limits=Limits(max_context=200))
    with Served(app) as s:
        status, _, body = call(s.url, "POST", "/v1/completions", completion("one two " * 100, "ctx", max_tokens=8))
        assert status == 400 and "--max-context" in body["error"]["message"]
        assert tokens_of(app, "ctx") == []  # not fed
        status, _, body = call(s.url, "POST", "/v1/completions", completion("one two " * 10, "ctx", max_tokens=8))
        assert status == 200 and body["kvloft"]["context_tokens"] <= 200


def test_stored_sessions_and_spilled_bytes_are_bounded(chatty, tmp_path):
    with Served(_app(chatty, tmp_path / "count", max_sessions=1, limits=Limits(max_stored_sessions=2))) as s:
        assert call(s.url, "POST", "/v1/completions", completion("first", "a"))[0] == 200
        assert call(s.url, "POST", "/v1/completions", completion("second", "b"))[0] == 200  # "a" spilled
        status, _, body = call(s.url, "POST", "/v1/completions", completion("third", "c"))
        assert status == 400 and "--max-stored-sessions" in body["error"]["message"]
    spill = tmp_path / "bytes"
    with Served(_app(chatty, spill, max_sessions=1, limits=Limits(spill_limit=1))) as s:
        assert call(s.url, "POST", "/v1/completions", completion("first", "a"))[0] == 200
        status, _, body = call(s.url, "POST", "/v1/completions", completion("second", "b"))
        assert status == 400 and "--spill-limit" in body["error"]["message"]  # "a" cannot be spilled
        assert not any(spill.iterdir())
        assert call(s.url, "POST", "/v1/completions", completion("again", "a"))[0] == 200  # "a" still works


# ---- 2. isolation ------------------------------------------------------------------------------


def test_a_session_is_visible_only_to_the_key_that_made_it(chatty):
    app = _app(chatty)
    with Served(app) as s:
        status, _, mine = call(s.url, "POST", "/v1/completions", completion("Alice's secret notes", "doc"))
        assert status == 200 and mine["kvloft"]["session_id"] == "doc"
        assert call(s.url, "GET", "/v1/sessions/doc", key=OTHER)[0] == 404
        assert call(s.url, "GET", "/v1/sessions/unknown", key=OTHER)[0] == 404
        assert call(s.url, "DELETE", "/v1/sessions/doc", key=OTHER)[0] == 404
        _, _, theirs = call(s.url, "POST", "/v1/completions", completion("Bob", "doc"), key=OTHER)
        assert theirs["kvloft"]["reused_tokens"] == 0  # a new session of Bob's, not Alice's
        status, _, info = call(s.url, "GET", "/v1/sessions/doc")
        assert status == 200 and info["id"] == "doc"
        assert info["stats"]["tokens"] == mine["kvloft"]["context_tokens"]  # Alice's is untouched
        assert call(s.url, "DELETE", "/v1/sessions/doc")[0] == 200
        assert call(s.url, "GET", "/v1/sessions/doc", key=OTHER)[0] == 200  # Bob's remains
        rid = mine["id"]
        assert len(rid.split("-")[-1]) == 32 and int(rid.split("-")[-1], 16) >= 0  # 128 random bits


def test_cli_without_a_key_listens_on_loopback_and_says_sessions_are_shared(tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("KVLOFT_API_KEY", raising=False)
    parse = build_parser().parse_args
    with caplog.at_level(logging.WARNING, logger="kvloft.serve"):
        cfg, host = serve_settings(parse(["serve"]))
    assert host == "127.0.0.1" and cfg.keys == () and "shares every session" in caplog.text
    assert serve_settings(parse(["serve", "--host", "0.0.0.0"]))[1] == "0.0.0.0"
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nk-one\n\nk-two\n")
    cfg, host = serve_settings(parse(["serve", "--api-key", "k-a", "--api-key", "k-b", "--api-keys-file", str(keys),
                                      "--max-window", "1024"]))
    assert cfg.keys == ("k-a", "k-b", "k-one", "k-two") and cfg.limits.max_window == 1024
    # a known model name is the id clients ask for; a file path leaves the file's own name
    assert serve_settings(parse(["serve", "--model", "qwen2.5-0.5b"]))[0].model_name == "qwen2.5-0.5b"
    assert serve_settings(parse(["serve", "--model", str(tmp_path / "m.gguf")]))[0].model_name is None


# ---- 3. work stops when nobody waits for it ----------------------------------------------------


def test_a_disconnect_mid_prefill_stops_it_within_a_chunk_and_leaves_the_session_empty(slow):
    app = _app(slow, runtime=SLOW_RUNTIME)
    with Served(app) as s:
        sock = open_request(s.url, "/v1/completions", completion(LONG, "long"))
        wait_busy(s.url, "long")
        time.sleep(0.3)
        hang_up(sock)
        assert wait_busy(s.url, "long", busy=False) < 2.0  # about a minute of prefill was left (this CPU)
        assert tokens_of(app, "long") == []


def test_a_disconnect_mid_answer_stops_decoding(slow):
    app = _app(slow, runtime=SLOW_RUNTIME)
    with Served(app) as s:
        sock = open_request(s.url, "/v1/completions", completion("Tell me", "talk", max_tokens=400, stream=True))
        reader = sock.makefile("rb")
        while not reader.readline().startswith(b"data: {"):  # the first piece of the answer
            pass
        hang_up(sock)
        assert wait_busy(s.url, "talk", busy=False) < 2.0  # ~100 s of decoding were left
        assert tokens_of(app, "talk") == []  # the half answer is not kept


def test_sigterm_drains_within_5_s_and_removes_the_spill_dir(slow):
    app = _app(slow, runtime=SLOW_RUNTIME)
    spill = app.state.manager.spill_dir

    def make(config):
        config.timeout_graceful_shutdown = DRAIN_S
        return DrainingServer(config, app.state.draining)

    s = Served(app, make_server=make).__enter__()
    answer = {}
    client = threading.Thread(target=lambda: answer.update(r=call(s.url, "POST", "/v1/completions",
                                                                  completion(LONG, "d"))))
    client.start()
    wait_busy(s.url, "d")
    t0 = time.monotonic()
    s.server.handle_exit(signal.SIGTERM, None)
    s.thread.join(timeout=10)
    took = time.monotonic() - t0
    client.join(timeout=10)
    s.sock.close()
    assert not s.thread.is_alive() and took < 5.0, took
    assert answer["r"][0] == 503 and "shutting down" in answer["r"][2]["error"]["message"]
    assert not spill.exists()


def test_a_spill_dir_given_by_the_user_is_kept(chatty, tmp_path):
    with Served(_app(chatty, tmp_path / "mine")):
        pass
    assert (tmp_path / "mine").is_dir()


# ---- 4. a lease outlives the work holding it ---------------------------------------------------


def test_a_request_after_a_disconnect_mid_prefill_waits_and_the_session_is_clean(slow, chatty):
    app = _app(slow, runtime=SLOW_RUNTIME)
    with Served(app) as s:
        host, port = s.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("POST", "/v1/completions", json.dumps(completion(LONG, "race", stream=True,
                                                                      prefill_progress=True)),
                     {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        resp = conn.getresponse()
        seen = 0
        while seen < 2:
            seen += b"kvloft.prefill" in resp.fp.readline()
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        t0 = time.monotonic()
        status, _, body = call(s.url, "POST", "/v1/completions", completion("Hello there", "race"))
        assert status == 200 and time.monotonic() - t0 < 2.5  # waited for one chunk, not the whole prompt
        answers, tokens = direct(chatty, ["Hello there"])
        assert body["choices"][0]["text"] == answers[0]
        assert tokens_of(app, "race") == tokens


def test_a_cancelled_turn_leaves_the_earlier_turns_and_nothing_else(slow, chatty):
    app = _app(slow, runtime=SLOW_RUNTIME)
    with Served(app) as s:
        assert call(s.url, "POST", "/v1/completions", completion("First question", "rb"))[0] == 200
        sock = open_request(s.url, "/v1/completions", completion(LONG, "rb"))
        wait_busy(s.url, "rb")
        time.sleep(0.3)
        hang_up(sock)
        wait_busy(s.url, "rb", busy=False)
        status, _, body = call(s.url, "POST", "/v1/completions", completion(" Second question", "rb"))
        assert status == 200
        answers, tokens = direct(chatty, ["First question", " Second question"])
        assert body["choices"][0]["text"] == answers[1]
        assert tokens_of(app, "rb") == tokens


# ---- 5. rate limits ----------------------------------------------------------------------------


def test_the_rate_limit_is_per_address_without_keys_whatever_token_is_sent(chatty):
    with Served(create_app(chatty, ServerConfig(rate_limit=2, runtime=RUNTIME))) as s:
        statuses = [call(s.url, "GET", "/v1/models", key=f"made-up-{i}")[0] for i in range(3)]
    assert statuses == [200, 200, 429]


def test_the_rate_limiter_remembers_a_bounded_number_of_clients():
    limiter = RateLimiter(per_minute=60, max_clients=100)
    for i in range(1000):
        assert limiter.take(f"client-{i}") == 0
        assert len(limiter.buckets) <= 100
    limiter.take("client-999")
    assert "client-999" in limiter.buckets  # the most recent are kept


# ---- 6. busy and docs --------------------------------------------------------------------------


def test_busy_sessions_answer_503_with_retry_after(slow):
    with Served(_app(slow, runtime=SLOW_RUNTIME, max_sessions=1)) as s:
        sock = open_request(s.url, "/v1/completions", completion(LONG, "a"))
        wait_busy(s.url, "a")
        status, headers, body = call(s.url, "POST", "/v1/completions", completion("hi", "b"))
        hang_up(sock)
    assert status == 503 and body["error"]["code"] == "sessions_busy"
    assert int(headers["Retry-After"]) >= 1


def test_docs_and_openapi_need_the_key(chatty):
    with Served(_app(chatty)) as s:
        for path in ("/docs", "/openapi.json"):
            assert call(s.url, "GET", path, key=None)[0] == 401
            assert call(s.url, "GET", path, key="wrong")[0] == 401
            assert call(s.url, "GET", path)[0] == 200
        assert call(s.url, "GET", "/health", key=None)[0] == 200


@pytest.mark.slow
def test_kvloft_serve_exits_within_5_s_of_sigterm_mid_prefill_and_leaves_no_spill_dir(tmp_path):
    """The real command (SmolLM2 in a subprocess): SIGTERM while a long prompt is being fed."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from served import free_port

    port = free_port()
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-m", "kvloft.cli", "serve", "--model", "smollm2", "--port", str(port),
                             "--api-key", KEY, "--log-level", "warning"], env=env, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
            try:
                if call(url, "GET", "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                time.sleep(0.5)
        assert list(tmp_path.glob("kvloft-sessions-*"))  # the manager's own spill dir
        model = call(url, "GET", "/v1/models")[2]["data"][0]["id"]
        sock = open_request(url, "/v1/completions", {**completion("The archive keeps records. " * 3000, "big"),
                                                     "model": model})
        wait_busy(url, "big", timeout=60)
        time.sleep(1.0)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        took = time.monotonic() - t0
        sock.close()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert took < 5.0, took
    assert not list(tmp_path.glob("kvloft-sessions-*"))

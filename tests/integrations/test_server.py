"""The OpenAI-compatible server, driven by the official `openai` client against a real uvicorn
server on a free localhost port. Answers are checked against a kvloft Session run directly."""

import json
import urllib.error
import urllib.request

import anyio
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from served import Served

from kvloft import RetrievalConfig, RuntimeConfig, Session
from kvloft.server.app import ServerConfig, create_app
from kvloft.server.manager import SessionManager

KEY = "test-key"
RETRIEVAL = RetrievalConfig(method="exact", budget=32, n_sink=8, n_window=64)
RUNTIME = RuntimeConfig(progress=False, prefill_chunk=256)  # several chunks per long prompt (progress events)


class Running(Served):
    """The app on uvicorn in a thread (tests/served.py), with an openai client."""

    def client(self, api_key=KEY) -> "openai.OpenAI":
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def server(chatty, tmp_path_factory):
    cfg = ServerConfig(api_key=KEY, max_request_bytes=64 * 1024, retrieval=RETRIEVAL, runtime=RUNTIME,
                       spill_dir=str(tmp_path_factory.mktemp("spill")))
    with Running(create_app(chatty, cfg)) as running:
        yield running


def _raw(method, url, body=None, headers=None):
    """(status, headers, body bytes) of one plain HTTP request (stdlib: no client library in the way)."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


def _direct(model, prompt=None, messages=None, n=6, retrieval=RETRIEVAL):
    s = Session(model, retrieval, RUNTIME)
    s.feed_chat(messages) if messages is not None else s.feed(prompt)
    return s.generate(max_new_tokens=n), s


def test_models_list(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["tiny-chat"]


def test_completion_equals_a_direct_session(server, chatty):
    resp = server.client().completions.create(model="tiny-chat", prompt="The quick brown fox", max_tokens=6,
                                              temperature=0)
    want, s = _direct(chatty, prompt="The quick brown fox")
    assert resp.choices[0].text == want
    assert resp.usage.prompt_tokens == len(chatty.tokenizer.encode("The quick brown fox"))
    assert resp.usage.completion_tokens == len(s) - resp.usage.prompt_tokens


def test_chat_and_streaming_chat_equal_a_direct_session(server, chatty):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    client = server.client()
    resp = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=6, temperature=0)
    want, _ = _direct(chatty, messages=messages)
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == want
    assert resp.choices[0].finish_reason in ("stop", "length")

    chunks = list(client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=6,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    assert len([c for c in chunks if c.choices]) >= 3  # role, pieces, finish
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == resp.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == resp.usage.completion_tokens


def test_session_reuse_prefills_only_the_new_turn(server, chatty):
    client = server.client()
    doc = " ".join(f"Line {i}: the archive keeps record {i * 7}." for i in range(60))
    first = client.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": doc + "\nWhat is record 3?"}], max_tokens=4,
        temperature=0, extra_body={"session_id": "doc-1"})
    ext1 = first.to_dict()["kvloft"]
    assert ext1["session_id"] == "doc-1" and ext1["reused_tokens"] == 0
    assert ext1["prefilled_tokens"] > 600
    second = client.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "And record 5?"}], max_tokens=4, temperature=0,
        extra_body={"session_id": "doc-1"})
    ext2 = second.to_dict()["kvloft"]
    assert ext2["reused_tokens"] == ext1["context_tokens"]  # the whole first exchange stayed fed
    assert ext2["prefilled_tokens"] < 20  # only the turn close and the new question
    assert second.usage.prompt_tokens == ext2["prefilled_tokens"]
    status, _, body = _raw("GET", f"{server.url}/v1/sessions/doc-1", headers=AUTH)
    assert status == 200
    info = json.loads(body)
    assert info["stats"]["tokens"] == ext2["context_tokens"]
    assert info["stats"]["timings_s"]["prefill_tokens"] == ext1["prefilled_tokens"] + ext2["prefilled_tokens"]
    assert info["stats"]["tier_tokens"]["host"] > 500  # the document sits in the host tier


def test_per_request_retrieval_and_mismatch(server):
    client = server.client()
    r = client.completions.create(model="tiny-chat", prompt="abc", max_tokens=2, temperature=0,
                                  extra_body={"session_id": "dense-1", "kvloft": {"method": "dense"}})
    assert r.to_dict()["kvloft"]["retrieval"]["method"] == "dense"
    with pytest.raises(openai.ConflictError, match="method"):
        client.completions.create(model="tiny-chat", prompt="abc", max_tokens=2,
                                  extra_body={"session_id": "dense-1", "kvloft": {"method": "exact"}})
    r = client.completions.create(model="tiny-chat", prompt="abc", max_tokens=2, temperature=0,
                                  extra_body={"session_id": "dense-1", "kvloft": {"budget": 7}})
    assert r.to_dict()["kvloft"]["retrieval"]["budget"] == 7


def test_refusals_are_openai_errors_and_the_server_survives(server):
    with pytest.raises(openai.AuthenticationError, match="API key"):
        server.client(api_key="wrong").models.list()
    status, _, body = _raw("GET", f"{server.url}/v1/models")
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    client = server.client()
    with pytest.raises(openai.APIStatusError, match="limit") as e:
        client.completions.create(model="tiny-chat", prompt="x" * 100_000, max_tokens=1)
    assert e.value.status_code == 413
    with pytest.raises(openai.NotFoundError, match="not served"):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="--max-n"):  # n is limited before any work
        client.completions.create(model="tiny-chat", prompt="hi", max_tokens=1, n=99)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="tiny-chat", messages=[], max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="session_id"):
        client.completions.create(model="tiny-chat", prompt="hi", max_tokens=1, extra_body={"session_id": "../x"})
    status, _, body = _raw("POST", f"{server.url}/v1/chat/completions", b'{"model": "tiny-chat", "messa', AUTH)
    assert status == 400 and "not valid JSON" in json.loads(body)["error"]["message"]
    assert server.client().models.list().data  # still serving


def test_rate_limit(chatty):
    with Running(create_app(chatty, ServerConfig(rate_limit=2, runtime=RUNTIME))) as running:
        client = running.client(api_key="anyone")
        client.models.list()
        client.models.list()
        with pytest.raises(openai.RateLimitError) as e:
            client.models.list()
        assert int(e.value.response.headers["retry-after"]) >= 1


def test_manager_round_robin_over_more_sessions_than_fit(chatty, tmp_path):
    """3 sessions, room for 2: each turn evicts one to disk and brings one back; every answer
    equals the one from a manager with room for all, and the limit holds after every request."""

    async def converse(manager, limit_seen):
        answers = []
        for turn in range(2):
            for sid in ("a", "b", "c"):
                async with manager.use(sid) as lease:
                    s = lease.session
                    await anyio.to_thread.run_sync(s.feed, f"Session {sid}, turn {turn}: tell me more.")
                    answers.append(await anyio.to_thread.run_sync(s.generate, 3))
                limit_seen.append(manager.usage()["resident"])
        return answers

    def run(max_sessions, spill):
        m = SessionManager(chatty, retrieval=RETRIEVAL, runtime=RUNTIME, max_sessions=max_sessions, spill_dir=spill)
        seen = []
        answers = anyio.run(converse, m, seen)
        return answers, seen, m.usage()

    tight, seen, usage = run(2, tmp_path / "tight")
    roomy, _, roomy_usage = run(8, tmp_path / "roomy")
    assert tight == roomy
    assert max(seen) <= 2 and usage["evictions"] >= 4 and usage["restores"] >= 3
    assert roomy_usage["evictions"] == 0


def test_manager_serializes_one_session_and_interleaves_two(chatty, tmp_path):
    """Two requests on one session never overlap; requests on two sessions do."""

    async def scenario():
        m = SessionManager(chatty, retrieval=RETRIEVAL, runtime=RUNTIME, spill_dir=tmp_path)
        log = []

        async def request(sid, tag):
            async with m.use(sid):
                log.append(("in", tag))
                await anyio.sleep(0.05)
                log.append(("out", tag))

        async with anyio.create_task_group() as tg:
            tg.start_soon(request, "same", "a")
            tg.start_soon(request, "same", "b")
        same = list(log)
        log.clear()
        async with anyio.create_task_group() as tg:
            tg.start_soon(request, "one", "a")
            tg.start_soon(request, "two", "b")
        return same, list(log)

    same, other = anyio.run(scenario)
    assert [e for e, _ in same] == ["in", "out", "in", "out"]  # serialized
    assert [e for e, _ in other] == ["in", "in", "out", "out"]  # interleaved


@pytest.mark.slow
def test_smollm2_answers_through_the_server(smollm2):
    cfg = ServerConfig(retrieval=RetrievalConfig(method="exact", budget=64, n_sink=16, n_window=64),
                       runtime=RUNTIME)
    with Running(create_app(smollm2, cfg)) as running:
        client = running.client()
        name = client.models.list().data[0].id
        resp = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=12, temperature=0)
    assert "Paris" in resp.choices[0].message.content


def test_sse_stream_is_well_formed(server):
    """Raw stream of /v1/completions: data lines of JSON objects, ending with [DONE]."""
    body = {"model": "tiny-chat", "prompt": "Once", "max_tokens": 3, "temperature": 0, "stream": True}
    status, headers, raw = _raw("POST", f"{server.url}/v1/completions", json.dumps(body).encode(), AUTH)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    lines = [ln for ln in raw.decode().split("\n") if ln]
    assert lines[-1] == "data: [DONE]"
    objs = [json.loads(ln.removeprefix("data: ")) for ln in lines[:-1]]
    assert all(o["object"] == "text_completion" for o in objs)
    assert objs[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_prefill_progress_events(server):
    """prefill_progress streams kvloft.prefill events (monotone, ending at the prompt size) before the answer."""
    body = {"model": "tiny-chat", "prompt": "word " * 700, "max_tokens": 2, "temperature": 0, "stream": True,
            "prefill_progress": True}
    status, _, raw = _raw("POST", f"{server.url}/v1/completions", json.dumps(body).encode(), AUTH)
    assert status == 200
    lines = [ln for ln in raw.decode().split("\n") if ln]
    assert lines[-1] == "data: [DONE]"
    objs = [json.loads(ln.removeprefix("data: ")) for ln in lines[:-1]]
    prog = [o for o in objs if o["object"] == "kvloft.prefill"]
    assert len(prog) >= 2  # the prompt spans several prefill chunks
    done = [o["done"] for o in prog]
    assert done == sorted(done) and done[-1] == prog[-1]["total"]
    assert objs.index(prog[-1]) < next(i for i, o in enumerate(objs) if o["object"] == "text_completion")

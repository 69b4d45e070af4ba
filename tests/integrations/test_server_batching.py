"""Serving on the engine loop: continuous batching, n choices, logprobs, stop strings across
tokens, /metrics and the request log. Answers are checked against a kvloft Session run alone
(tiny random weights behind the real SmolLM2 tokenizer: `chatty`)."""

import json
import logging
import math
import threading
import time

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
parser = pytest.importorskip("prometheus_client.parser")

from served import Served

from kvloft import RetrievalConfig, RuntimeConfig, Session
from kvloft.server.app import ServerConfig, create_app
from kvloft.server.batcher import EngineLoop
from kvloft.server.engines import SequentialFallbackEngine
from kvloft.server.sequence import Cancelled, GenerationParams, Sequence
from kvloft.server.stops import AnswerText

KEY = "batch-key"
RETRIEVAL = RetrievalConfig(method="exact", budget=32, n_sink=8, n_window=64)
RUNTIME = RuntimeConfig(progress=False)
PROMPTS = ["The quick brown fox", "Once upon a time there", "Rivers run to the sea and",
           "A list of colours: red, green,"]


def client_of(s: Served) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{s.url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def server(chatty, tmp_path_factory):
    cfg = ServerConfig(api_key=KEY, retrieval=RETRIEVAL, runtime=RUNTIME,
                       spill_dir=str(tmp_path_factory.mktemp("spill")))
    app = create_app(chatty, cfg)
    with Served(app) as s:
        s.app = app
        yield s


def direct(model, prompt, n, runtime=RUNTIME, **gen):
    """(answer, session) of a Session alone: fed `prompt`, generating n tokens."""
    s = Session(model, RETRIEVAL, runtime)
    s.feed(prompt)
    return s.generate(max_new_tokens=n, **gen), s


def greedy_ids(model, prompt, n):
    """The first n greedy answer tokens after `prompt` (EOS included if it comes), with their logits."""
    s = Session(model, RETRIEVAL, RUNTIME)
    s.feed(prompt)
    ids, logits = [], []
    for _ in range(n):
        logits.append(s.last_logits.clone())
        ids.append(int(s.last_logits.argmax()))
        s.step(ids[-1])
    return ids, logits


# ---- stop strings across token boundaries -------------------------------------------------------


def test_a_stop_string_spanning_two_tokens_is_never_sent_in_part(chatty):
    tok = chatty.tokenizer
    ids = tok.encode("The harbour lights were burning bright tonight")
    pieces = [tok.decode([i]) for i in ids]
    k = next(i for i in range(1, len(ids) - 1) if len(pieces[i]) >= 3 and len(pieces[i + 1]) >= 3)
    stop = pieces[k][-2:] + pieces[k + 1][:2]  # two characters of each of two tokens
    text = AnswerText(tok, [stop])
    sent, stopped = [], False
    for t in ids:
        piece, stopped = text.push(t)
        sent.append(piece)
        if stopped:
            break
    full = tok.decode(ids)
    assert stopped and "".join(sent) == full[: full.index(stop)]
    assert all(stop[:2] not in p for p in sent)  # the stop's first half was held back, then dropped
    plain = AnswerText(tok, [])
    assert "".join(plain.push(t)[0] for t in ids) + plain.flush() == full  # no stops: nothing held


def test_held_back_text_is_sent_when_no_stop_follows(chatty):
    tok = chatty.tokenizer
    ids = tok.encode("one two three")
    text = AnswerText(tok, ["three!"])
    sent = "".join(text.push(t)[0] for t in ids)
    assert sent == "one two "  # "three" may start the stop: held back
    assert sent + text.flush() == "one two three"


def test_stop_across_tokens_through_the_server(server, chatty):
    ids, _ = greedy_ids(chatty, PROMPTS[0], 12)
    tok = chatty.tokenizer
    pieces = [tok.decode([i]) for i in ids]
    k = next((i for i in range(len(ids) - 1) if pieces[i].strip() and pieces[i + 1].strip()), None)
    if k is None:
        pytest.skip("the greedy answer has no two adjacent non-blank tokens")
    stop = pieces[k][-1:] + pieces[k + 1][:1]
    full = tok.decode(ids)
    want = full[: full.index(stop)]
    c = client_of(server)
    r = c.completions.create(model="tiny-chat", prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    chunks = list(c.completions.create(model="tiny-chat", prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                       stop=[stop], stream=True))
    streamed = [ch.choices[0].text for ch in chunks]
    assert "".join(streamed) == want and chunks[-1].choices[0].finish_reason == "stop"


# ---- logprobs and n ------------------------------------------------------------------------------


def test_chat_logprobs_equal_the_models_log_softmax(server, chatty):
    messages = [{"role": "user", "content": "Name a colour."}]
    c = client_of(server)
    r = c.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=5, temperature=0,
                                  logprobs=True, top_logprobs=3)
    s = Session(chatty, RETRIEVAL, RUNTIME)
    s.feed_chat(messages)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens >= 1
    for entry in content:
        lp = torch.log_softmax(s.last_logits.float(), -1)
        token = int(s.last_logits.argmax())
        assert math.isclose(entry.logprob, float(lp[token]), abs_tol=1e-4)
        assert bytes(entry.bytes) == chatty.tokenizer.token_bytes(token)
        top = entry.top_logprobs
        assert len(top) == 3 and top[0].logprob == pytest.approx(entry.logprob, abs=1e-6)  # greedy: the top one
        assert [t.logprob for t in top] == sorted((t.logprob for t in top), reverse=True)
        s.step(token)
    assert b"".join(bytes(e.bytes) for e in content).decode() == r.choices[0].message.content

    chunks = list(c.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=5, temperature=0,
                                            logprobs=True, top_logprobs=2, stream=True))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-6)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        c.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=1, logprobs=True, top_logprobs=21)


def test_completion_logprobs_tokens_and_offsets(server):
    r = client_of(server).completions.create(model="tiny-chat", prompt=PROMPTS[1], max_tokens=6, temperature=0,
                                             logprobs=2)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert all(len(top) <= 2 and max(top.values()) >= lp.token_logprobs[i] - 1e-6
               for i, top in enumerate(lp.top_logprobs))


def test_n_choices_equal_sessions_run_alone_with_seed_plus_i(server, chatty):
    c = client_of(server)
    r = c.completions.create(model="tiny-chat", prompt=PROMPTS[2], max_tokens=6, temperature=0, n=2)
    want, _ = direct(chatty, PROMPTS[2], 6)
    assert [ch.text for ch in r.choices] == [want, want] and [ch.index for ch in r.choices] == [0, 1]
    r = c.completions.create(model="tiny-chat", prompt=PROMPTS[2], max_tokens=6, temperature=1.0, seed=5, n=2,
                             extra_body={"session_id": "forked"})
    n_prompt = len(chatty.tokenizer.encode(PROMPTS[2]))
    generated = []
    for i, ch in enumerate(r.choices):
        want, alone = direct(chatty, PROMPTS[2], 6, temperature=1.0, seed=5 + i)
        assert ch.text == want
        generated.append(len(alone) - n_prompt)
    ext = r.to_dict()["kvloft"]
    assert r.usage.prompt_tokens == n_prompt and r.usage.completion_tokens == sum(generated)
    assert ext["context_tokens"] == n_prompt + generated[0]  # the session keeps choice 0
    chunks = list(c.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=4, temperature=0, n=2, stream=True))
    texts = ["", ""]
    for ch in chunks:
        texts[ch.choices[0].index] += ch.choices[0].delta.content or ""
    assert texts[0] == texts[1] and texts[0]
    # the throwaway sessions of extra choices are gone once the stream's lease is released, which
    # runs after its last byte: wait for it a bounded time
    deadline = time.monotonic() + 10
    while app_usage(server)["sessions"] > 1 + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert app_usage(server)["sessions"] <= 1 + 1


def app_usage(server):
    return server.app.state.manager.usage()


# ---- continuous batching -----------------------------------------------------------------------------


def test_four_concurrent_requests_each_equal_its_sequential_answer(server, chatty):
    c = client_of(server)
    out: dict[int, str] = {}

    def ask(i: int) -> None:
        chunks = c.completions.create(model="tiny-chat", prompt=PROMPTS[i], max_tokens=16, temperature=0,
                                      stream=True, extra_body={"session_id": f"conc-{i}"})
        out[i] = "".join(ch.choices[0].text for ch in chunks)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert out == {i: direct(chatty, PROMPTS[i], 16)[0] for i in range(4)}


class Recording(SequentialFallbackEngine):
    """The stand-in engine, noting each step's batch size."""

    def __init__(self, max_batch=32):
        super().__init__(max_batch)
        self.sizes = []

    def step(self, pairs):
        self.sizes.append(len(pairs))
        return super().step(pairs)


def _run_loop(loop, seqs_args, cancel_after=None):
    """Submit sequences at once; returns {index: (text, finish, error)} and the event order."""
    events, done = [], threading.Event()
    lock = threading.Lock()

    def sink(ev):
        with lock:
            events.append(ev)
            if sum(e[1] == "end" for e in events) == len(seqs_args):
                done.set()
            mine = [e for e in events if e[1] == "piece" and e[0] == ev[0]]
            if cancel_after and ev[0] == cancel_after[0] and len(mine) >= cancel_after[1]:
                seqs[ev[0]].cancel.set()

    seqs = [Sequence(s, [ids], GenerationParams(max_tokens=n), sink, threading.Event(), index=i)
            for i, (s, ids, n) in enumerate(seqs_args)]
    loop.submit(seqs)
    assert done.wait(60)
    out = {}
    for i in range(len(seqs)):
        text = "".join(e[2][0] for e in events if e[0] == i and e[1] == "piece")
        end = next(e[2] for e in events if e[0] == i and e[1] == "end")
        out[i] = (text, *end)
    return out, events


def test_the_loop_batches_sequences_and_each_equals_its_session_alone(chatty):
    engine = Recording()
    loop = EngineLoop(chatty, engine=engine, step_tokens=512)
    tok = chatty.tokenizer
    try:
        args = [(Session(chatty, RETRIEVAL, RUNTIME), tok.encode(p), 8) for p in PROMPTS]
        out, _ = _run_loop(loop, args)
    finally:
        loop.close()
    for i, p in enumerate(PROMPTS):
        want, s = direct(chatty, p, 8)
        assert out[i][0] == want and out[i][2] is None
        assert args[i][0].tokens == s.tokens  # the session holds what a session alone holds
    assert engine.sizes[0] == 4  # all four decode together from the first step
    assert sum(engine.sizes) == sum(len(a[0].tokens) - len(a[1]) for a in args)


def test_a_long_prefill_is_interleaved_with_the_others_decoding(chatty):
    """step_tokens = one 16-token chunk: a 300-token prompt takes ~19 iterations, and the
    decoding sequence gets a token in each of them."""
    runtime = RuntimeConfig(progress=False, prefill_chunk=16)
    engine = Recording()
    loop = EngineLoop(chatty, engine=engine, step_tokens=16)
    tok = chatty.tokenizer
    long_ids = tok.encode("word " * 300)
    try:
        short = Session(chatty, RETRIEVAL, runtime)
        long = Session(chatty, RETRIEVAL, runtime)
        out, events = _run_loop(loop, [(short, tok.encode(PROMPTS[0]), 12), (long, long_ids, 2)])
    finally:
        loop.close()
    progress = [k for k, e in enumerate(events) if e[0] == 1 and e[1] == "progress"]
    pieces = [k for k, e in enumerate(events) if e[0] == 0 and e[1] == "piece"]
    assert len(progress) >= 10
    assert sum(progress[0] < k < progress[-1] for k in pieces) >= 5  # decoding went on during the prefill
    assert out[0][0] == direct(chatty, PROMPTS[0], 12, runtime)[0]
    want_long = Session(chatty, RETRIEVAL, runtime)
    want_long.feed(long_ids)
    assert out[1][0] == want_long.generate(2)


def test_a_cancelled_sequence_leaves_and_the_others_finish(chatty):
    loop = EngineLoop(chatty, engine=Recording())
    tok = chatty.tokenizer
    try:
        args = [(Session(chatty, RETRIEVAL, RUNTIME), tok.encode(p), 24) for p in PROMPTS[:3]]
        out, _ = _run_loop(loop, args, cancel_after=(1, 2))
    finally:
        loop.close()
    assert type(out[1][2]).__name__ == "Cancelled" and "disconnected" in str(out[1][2])
    for i in (0, 2):
        assert out[i][0] == direct(chatty, PROMPTS[i], 24)[0] and out[i][2] is None


class PlainOnly(Recording):
    """An engine that, like kvloft.Engine, refuses sessions running their own forward pass."""

    def step(self, pairs):
        if any(type(s) is not Session for s, _ in pairs):
            raise TypeError("runs its own forward pass; decode it alone with session.step()")
        return super().step(pairs)


class OwnForward(Session):
    pass


def test_sessions_the_engine_refuses_are_stepped_alone_and_the_rest_batched(chatty):
    engine = PlainOnly()
    loop = EngineLoop(chatty, engine=engine)
    tok = chatty.tokenizer
    try:
        kinds = [Session, OwnForward, Session]
        args = [(k(chatty, RETRIEVAL, RUNTIME), tok.encode(p), 6) for k, p in zip(kinds, PROMPTS, strict=False)]
        out, _ = _run_loop(loop, args)
    finally:
        loop.close()
    for i in range(3):
        assert out[i][0] == direct(chatty, PROMPTS[i], 6)[0] and out[i][2] is None
    assert engine.sizes.count(2) >= 5  # the two plain sessions went on together


def test_fallback_engine_refuses_a_session_twice(chatty):
    s = Session(chatty, RETRIEVAL, RUNTIME)
    s.feed("hello")
    with pytest.raises(ValueError, match="twice"):
        SequentialFallbackEngine().step([(s, 5), (s, 6)])


# ---- metrics and logs -------------------------------------------------------------------------------


def _metrics(s: Served) -> dict[str, list]:
    import urllib.request

    req = urllib.request.Request(f"{s.url}/metrics", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        text = r.read().decode()
    return {f.name: f.samples for f in parser.text_string_to_metric_families(text)}


def _value(samples, name, **labels):
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_count_requests_tokens_and_latencies(chatty, tmp_path):
    cfg = ServerConfig(api_key=KEY, retrieval=RETRIEVAL, runtime=RUNTIME, spill_dir=str(tmp_path), max_sessions=1)
    with Served(create_app(chatty, cfg)) as s:
        c = client_of(s)
        for i in range(3):
            c.completions.create(model="tiny-chat", prompt=PROMPTS[i], max_tokens=5, temperature=0,
                                 extra_body={"session_id": f"m{i}"})  # room for one: two spills
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model="tiny-chat", prompt="hi", max_tokens=10**6)
        c.completions.create(model="tiny-chat", prompt="word " * 100, max_tokens=3, temperature=0,
                             extra_body={"session_id": "m3"})  # a host tier: the retriever searches
        m = _metrics(s)
        import urllib.error
        import urllib.request

        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{s.url}/metrics", timeout=10)
        assert e.value.code == 401  # behind the API key
    req = m["kvloft_requests"]
    assert _value(req, "kvloft_requests_total", status="200", endpoint="completions") == 4
    assert _value(req, "kvloft_requests_total", status="400", outcome="refused") == 1
    assert _value(m["kvloft_decode_tokens"], "kvloft_decode_tokens_total") >= 3
    assert _value(m["kvloft_prefill_tokens"], "kvloft_prefill_tokens_total") >= 3 * 4
    assert _value(m["kvloft_time_to_first_token_seconds"], "kvloft_time_to_first_token_seconds_count") == 4
    assert _value(m["kvloft_retriever_search_seconds"], "kvloft_retriever_search_seconds_count") == 1
    assert _value(m["kvloft_retriever_search_seconds"], "kvloft_retriever_search_seconds_sum") > 0
    assert _value(m["kvloft_inter_token_latency_seconds"], "kvloft_inter_token_latency_seconds_count") >= 3
    assert _value(m["kvloft_batch_size"], "kvloft_batch_size_count") >= 3
    assert _value(m["kvloft_spills"], "kvloft_spills_total") == 3
    assert _value(m["kvloft_tier_bytes"], "kvloft_tier_bytes", tier="gpu") > 0
    assert _value(m["kvloft_tier_bytes"], "kvloft_tier_bytes", tier="disk") > 0  # the two spilled sessions
    assert _value(m["kvloft_running_sequences"], "kvloft_running_sequences") == 0
    assert _value(m["kvloft_decode_tokens_per_second"], "kvloft_decode_tokens_per_second") > 0
    assert {s.labels["engine"] for s in m["kvloft_engine_info"]} <= {"fallback", "Engine"}


def test_one_json_log_line_per_request(server, caplog):
    c = client_of(server)
    with caplog.at_level(logging.INFO, logger="kvloft.server.requests"):
        r = c.completions.create(model="tiny-chat", prompt=PROMPTS[3], max_tokens=4, temperature=0,
                                 extra_body={"session_id": "logged"})
        list(c.completions.create(model="tiny-chat", prompt="x", max_tokens=2, temperature=0, stream=True))
        deadline = time.monotonic() + 5  # the stream's line comes once its response has ended
        while len([x for x in caplog.records if x.name == "kvloft.server.requests"]) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    lines = [json.loads(x.getMessage()) for x in caplog.records if x.name == "kvloft.server.requests"]
    first = next(x for x in lines if x["id"] == r.id)
    assert first["session"] == "logged" and first["status"] == 200 and first["outcome"] in ("stop", "length")
    assert first["tokens_in"] == r.usage.prompt_tokens and first["tokens_out"] == r.usage.completion_tokens
    assert first["key_id"] and KEY not in json.dumps(first)  # the key's tag, never the key
    assert 0 < first["ttft_s"] <= first["duration_s"]
    assert {x["endpoint"] for x in lines} == {"completions"} and len(lines) == 2


def test_decode_graphs_reach_the_engine_and_bad_modes_are_refused(chatty):
    """ServerConfig.decode_graphs is the Engine's graphs; a name it does not know fails at
    configuration, naming the modes. On the CPU no graph is captured: answers equal alone."""
    with pytest.raises(ValueError, match="decode_graphs must be one of"):
        ServerConfig(decode_graphs="always")
    app = create_app(chatty, ServerConfig(api_key=KEY, retrieval=RETRIEVAL, runtime=RUNTIME, decode_graphs="whole"))
    loop = app.state.loop
    try:
        assert loop.engine.graphs == "whole"
        tok = chatty.tokenizer
        args = [(Session(chatty, RETRIEVAL, RUNTIME), tok.encode(p), 6) for p in PROMPTS[:2]]
        out, _ = _run_loop(loop, args)
    finally:
        loop.close()
    for i, p in enumerate(PROMPTS[:2]):
        assert out[i][0] == direct(chatty, p, 6)[0]


def test_extra_choices_fork_the_first_choice_once_its_prompt_is_in(chatty):
    """n > 1 in the loop: choices 1 and 2 wait for choice 0's prefill and decode from forks of its
    session (no prefill of their own: no progress events, their sessions' prefill counted once);
    each answer equals a session alone with its seed, and choice 0's session is untouched."""
    loop = EngineLoop(chatty, engine=Recording(), step_tokens=512)
    ids = chatty.tokenizer.encode(PROMPTS[1])
    events, done, lock = [], threading.Event(), threading.Lock()

    def sink(ev):
        with lock:
            events.append(ev)
            if sum(e[1] == "end" for e in events) == 3:
                done.set()

    params = [GenerationParams(max_tokens=8, temperature=1.0, seed=7 + i) for i in range(3)]
    adopted = {}
    first = Sequence(Session(chatty, RETRIEVAL, RUNTIME), [ids], params[0], sink, threading.Event(), index=0)
    seqs = [first] + [Sequence(Session(chatty, RETRIEVAL, RUNTIME), [], params[i], sink, threading.Event(),
                               index=i, fork_of=first, adopt=lambda s, i=i: adopted.__setitem__(i, s))
                      for i in (1, 2)]
    try:
        loop.submit(seqs)
        assert done.wait(60)
    finally:
        loop.close()
    assert {e[0] for e in events if e[1] == "progress"} == {0}
    for i, seq in enumerate(seqs):
        want, alone = direct(chatty, PROMPTS[1], 8, temperature=1.0, seed=7 + i)
        text = "".join(e[2][0] for e in events if e[0] == i and e[1] == "piece")
        assert text == want and seq.error is None and seq.session.tokens == alone.tokens, i
        assert seq.session.stats()["timings_s"]["prefill_tokens"] == len(ids)
    assert adopted[1] is seqs[1].session and adopted[2] is seqs[2].session
    with pytest.raises(ValueError, match="no feeds"):
        Sequence(Session(chatty, RETRIEVAL, RUNTIME), [ids], params[1], sink, threading.Event(), fork_of=first)


def test_forks_end_with_their_source_when_it_stops_before_its_prompt_is_in(chatty):
    """The first choice cancelled before its prefill: its forks end too, each exactly once."""
    loop = EngineLoop(chatty, engine=Recording(), step_tokens=512)
    events, done, lock = [], threading.Event(), threading.Lock()

    def sink(ev):
        with lock:
            events.append(ev)
            if sum(e[1] == "end" for e in events) == 3:
                done.set()

    gone = threading.Event()
    gone.set()
    first = Sequence(Session(chatty, RETRIEVAL, RUNTIME), [chatty.tokenizer.encode(PROMPTS[0])],
                     GenerationParams(max_tokens=4), sink, gone, index=0)
    seqs = [first] + [Sequence(Session(chatty, RETRIEVAL, RUNTIME), [], GenerationParams(max_tokens=4), sink,
                               threading.Event(), index=i, fork_of=first) for i in (1, 2)]
    try:
        loop.submit(seqs)
        assert done.wait(60)
        time.sleep(0.2)  # a second end event would come within the loop's next iterations
    finally:
        loop.close()
    ends = [e for e in events if e[1] == "end"]
    assert sorted(e[0] for e in ends) == [0, 1, 2]
    assert all(isinstance(e[2][1], Cancelled) for e in ends)
    assert not any(e[1] in ("piece", "prefilled") for e in events) and not seqs[1].session.tokens

"""Pipelined sessions on a real local Ray cluster (one node, 2 CPUs, 2 stage processes).

Checked against single-process sessions of the same model and retriever: greedy logits and
tokens (the tiny preset, and the SmolLM2 shape with random weights, slow), four sessions
stepped together from four threads, a killed stage replaced by its spare with a bitwise
identical continuation and byte-identical record files, capacity: the module's group splits
the layers by memory (one stage cannot hold the model and its KV at max_tokens, two can), and
refusals (a context past max_tokens, a model + context no split of the stages can hold), and the OpenAI API over
pipelined sessions.
"""

import dataclasses
import filecmp
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

ray = pytest.importorskip("ray")

from cluster_helpers import assert_logits_close, byte_tokenizer, streamed_content
from cluster_helpers import run as run_steps
from served import Served

import kvloft
from kvloft.cluster import PipelineConfig, PipelinedSession, StageGroup

RETRIEVAL = kvloft.RetrievalConfig(method="exact", budget=8, n_sink=4, n_window=16)
RUNTIME = kvloft.RuntimeConfig(progress=False, prefill_chunk=32)
STEPS = 5
# the tiny model's layer holds 0.7 MB of weights + 384 B of KV per token: 39 MB at 100K tokens.
# A stage of 50 MB holds one layer, not two: the group splits them over its two stages.
MAX_TOKENS, STAGE_MEMORY = 100_000, 50_000_000


@pytest.fixture(scope="module")
def model():
    return kvloft.load_model("tiny", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def group(model, tmp_path_factory):
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    g = StageGroup(model, PipelineConfig(directory=str(tmp_path_factory.mktemp("group")), num_cpus=0.5,
                                         max_tokens=MAX_TOKENS, stage_memory=STAGE_MEMORY))
    yield g
    g.close()
    ray.shutdown()


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 512, (150,), generator=torch.Generator().manual_seed(3)).tolist()


def run(session, prompt, steps=STEPS, on_step=None):
    return run_steps(session, prompt, steps, on_step)


def pipelined(model, directory, group, retrieval=RETRIEVAL, **kw):
    return PipelinedSession(model, retrieval, RUNTIME, pipeline=PipelineConfig(directory=str(directory), num_cpus=0.5,
                                                                               **kw), group=group)


@pytest.fixture(scope="module")
def undisturbed(model, prompt, group, tmp_path_factory):
    directory = tmp_path_factory.mktemp("undisturbed")
    with pipelined(model, directory, group) as s:
        logits = run(s, prompt)
        stats = s.stats()
    return logits, stats, directory


def test_pipeline_equals_single_process(model, prompt, undisturbed, group):
    logits, stats, _ = undisturbed
    assert_logits_close(logits, run(kvloft.Session(model, RETRIEVAL, RUNTIME), prompt))
    c = stats["cluster"]
    assert c["layers"] == [[0, 1], [1, 2]] and c["recoveries"] == 0
    assert [s["tokens"] for s in c["stages"]] == [150 + STEPS] * 2
    assert stats["tier_tokens"] == {"static": 20, "host": 150 + STEPS - 20}
    where = group.where()
    assert len({w["pid"] for w in where}) == 2 and [w["layers"] for w in where] == [[0, 1], [1, 2]]


def test_sessions_in_flight_together_equal_each_alone(model, group, tmp_path):
    prompts = [torch.randint(0, 512, (60 + 7 * i,), generator=torch.Generator().manual_seed(i)).tolist()
               for i in range(4)]
    sessions = [pipelined(model, tmp_path / str(i), group) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda sp: [int(t.argmax()) for t in run(*sp, steps=6)], zip(sessions, prompts)))
    for s in sessions:
        s.close(delete_files=True)
    want = [[int(t.argmax()) for t in run(kvloft.Session(model, RETRIEVAL, RUNTIME), p, steps=6)] for p in prompts]
    assert got == want


def test_killed_stage_recovers_identically(model, prompt, undisturbed, group, tmp_path):
    s = pipelined(model, tmp_path, group)
    killed = group.actor(1)

    def kill(i):
        if i == 2:  # mid-generation: the last stage's process dies, its memory with it
            ray.kill(killed)

    logits = run(s, prompt, on_step=kill)
    for got, want in zip(logits, undisturbed[0], strict=True):
        assert torch.equal(got, want)  # bitwise: the same rows, the same calls
    stats = s.stats()["cluster"]
    assert stats["recoveries"] == 1 and group.actor(1) is not killed
    assert stats["recovery_s"] < 10, stats  # a spare takes over: no process start
    s.close()
    want_dir = undisturbed[2]
    names = sorted(str(p.relative_to(want_dir)) for p in want_dir.rglob("*.rec"))
    assert len(names) == 2
    _, mismatch, errors = filecmp.cmpfiles(want_dir, tmp_path, names, shallow=False)
    assert not mismatch and not errors, (mismatch, errors)


def test_capacity_refusals(model, group, tmp_path):
    s = pipelined(model, tmp_path / "a", group, max_tokens=64)
    with pytest.raises(ValueError, match="65 tokens, over the pipeline's max_tokens=64"):
        s.feed(list(range(65)))
    assert len(s) == 0
    s.feed(list(range(30)))  # still usable
    s.close(delete_files=True)
    one = PipelineConfig(directory=str(tmp_path / "c"), n_stages=1, max_tokens=MAX_TOKENS, stage_memory=STAGE_MEMORY)
    with pytest.raises(ValueError, match=r"2 layers x 0\.036 GiB \(weights 0\.001 \+ KV of 100000 tokens 0\.036\) = "
                                         r"0\.07 GiB do not fit 1 stage\(s\) of 0\.05 GiB"):
        StageGroup(model, one)  # refused before anything starts
    with pytest.raises(ValueError, match="split for max_tokens=100000, the session asks 200000"):
        pipelined(model, tmp_path / "b", group, max_tokens=200_000)
    with pytest.raises(ValueError, match="position_mode='exact' only"):
        pipelined(model, tmp_path / "d", group, RETRIEVAL.replace(position_mode="extrapolate"))
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not writable"):
        pipelined(model, tmp_path / "file" / "x", group)
    pipelined(model, tmp_path / "e", group).close()
    with pytest.raises(ValueError, match="earlier session"):
        pipelined(model, tmp_path / "e", group)


def test_budget_changed_between_steps_reaches_the_stages(model, prompt, group, tmp_path):
    from kvloft.server.manager import set_budget

    unchanged = kvloft.Session(model, RETRIEVAL, RUNTIME)
    unchanged.feed(prompt)
    with pipelined(model, tmp_path, group) as s:
        ref = kvloft.Session(model, RETRIEVAL, RUNTIME)
        s.feed(prompt)
        ref.feed(prompt)
        got = []
        for budget in (2, 64):  # the server sets a request's budget this way
            set_budget(s, budget)
            set_budget(ref, budget)
            got.append(s.step(5).clone())
            torch.testing.assert_close(got[-1], ref.step(5), atol=2e-5, rtol=1e-5)
    assert not torch.allclose(got[0], unchanged.step(5), atol=1e-3)  # budget 2 is not budget 8


def test_dense_method_runs_in_the_pipeline(model, prompt, group, tmp_path):
    dense = RETRIEVAL.replace(method="dense")
    with pipelined(model, tmp_path, group, dense) as s:
        got = run(s, prompt, steps=3)
    assert_logits_close(got, run(kvloft.Session(model, dense, RUNTIME), prompt, steps=3))


@pytest.mark.slow
def test_smollm2_shape_pipeline_equals_single_process(tmp_path):
    big = kvloft.load_model("smollm2-135m", device="cpu", dtype="float32")
    rc = RETRIEVAL.replace(budget=32, n_window=32)
    ids = torch.randint(0, big.config.vocab_size, (200,), generator=torch.Generator().manual_seed(1)).tolist()
    want = [int(t.argmax()) for t in run(kvloft.Session(big, rc, RUNTIME), ids, steps=4)]
    cfg = PipelineConfig(directory=str(tmp_path), n_stages=2, num_cpus=0.5)
    with PipelinedSession(big, rc, RUNTIME, pipeline=cfg) as s:
        got = [int(t.argmax()) for t in run(s, ids, steps=4)]
        assert s.stats()["cluster"]["layers"] == [[0, 15], [15, 30]]
    assert got == want


# ---- serving ---------------------------------------------------------------------------------


def test_api_over_pipelined_sessions(model, group, tmp_path):
    pytest.importorskip("uvicorn")
    from kvloft.cluster.serve import PipelinedSessionManager
    from kvloft.server.app import ServerConfig, create_app

    chat_model = dataclasses.replace(model, tokenizer=byte_tokenizer())
    cfg = ServerConfig(retrieval=RETRIEVAL, runtime=RUNTIME, max_tokens_limit=16, default_max_tokens=8)
    pipe = PipelineConfig(directory=str(tmp_path), num_cpus=0.5)
    body = {"model": "tiny", "max_tokens": 6, "session_id": "doc", "stream": True,
            "messages": [{"role": "user", "content": "a long document, " * 12}]}

    def chat(served):
        status, text = served.request("POST", "/v1/chat/completions", body)
        assert status == 200, text
        return streamed_content(text)

    with Served(create_app(chat_model, cfg)) as served:
        plain = chat(served)
    manager = PipelinedSessionManager(chat_model, pipe, group=group, retrieval=RETRIEVAL, runtime=RUNTIME)
    with Served(create_app(chat_model, cfg, manager=manager)) as served:
        assert chat(served) == plain and plain  # the same greedy answer as single-process sessions
        status, info = served.request("GET", "/v1/sessions/doc")
        assert status == 200 and json.loads(info)["stats"]["cluster"]["n_stages"] == 2
        assert (tmp_path / "doc" / "stage-01" / "layer-001.rec").stat().st_size > 0
        assert served.request("GET", "/v1/sessions/nope")[0] == 404
        status, err = served.request("POST", "/v1/chat/completions", b"{not json")
        assert status == 400 and "error" in json.loads(err)
        assert served.request("DELETE", "/v1/sessions/doc")[0] == 200
        assert not (tmp_path / "doc" / "stage-00").exists()


def test_serve_deployment_builds():
    serve = pytest.importorskip("ray.serve")
    from kvloft.cluster.serve import kvloft_deployment
    from kvloft.server.app import ServerConfig

    d = kvloft_deployment("tiny", config=ServerConfig(), name="kvloft-test", num_replicas=1)
    assert isinstance(d, serve.Deployment) and d.name == "kvloft-test" and d.num_replicas == 1
    assert isinstance(d.bind(), serve.Application)
    with pytest.raises(TypeError, match="PipelineConfig"):
        kvloft_deployment("tiny", pipeline={"n_stages": 2})

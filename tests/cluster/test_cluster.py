"""Sharded sessions on a real local Ray cluster (one node, 2 CPUs, 3 shard processes).

Checked against single-process sessions of the same model, retriever and budget: a covering
budget (dense), per-shard top-k (against a retriever that takes the top-k of each token
range), global top-k (against exact top-k); a killed shard is re-created from its files and
the continuation is bitwise identical; a corrupted record stops the session with a clear error.
"""

import dataclasses
import json

import pytest
import torch

ray = pytest.importorskip("ray")

from cluster_helpers import assert_logits_close, byte_tokenizer, streamed_content
from cluster_helpers import run as run_steps
from served import Served

import kvloft
from kvloft.cluster import ShardConfig, ShardedSession, ShardGroup
from kvloft.cluster.shard import ShardStore
from kvloft.index.base import Selection
from kvloft.index.exact import ExactRetriever
from kvloft.server.manager import set_budget

RANGE = 48  # host rows per shard: 150 prompt tokens - 4 sink - 16 window = 130 host rows -> 3 ranges
RETRIEVAL = kvloft.RetrievalConfig(method="exact", budget=1000, n_sink=4, n_window=16)
RUNTIME = kvloft.RuntimeConfig(progress=False, prefill_chunk=32)
STEPS = 5


@pytest.fixture(scope="module")
def group():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    g = ShardGroup(3, num_cpus=0.5)
    yield g
    g.close()
    ray.shutdown()


@pytest.fixture(scope="module")
def model():
    return kvloft.load_model("tiny", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 512, (150,), generator=torch.Generator().manual_seed(3)).tolist()


def run(session, prompt, steps=STEPS, on_step=None):
    return run_steps(session, prompt, steps, on_step)


def sharded(model, tmp_path, group, retrieval=RETRIEVAL, **shard_kw):
    cfg = ShardConfig(directory=str(tmp_path / "shards"), n_shards=3, shard_tokens=RANGE, num_cpus=0.5, **shard_kw)
    return ShardedSession(model, retrieval, RUNTIME, shards=cfg, group=group)


@pytest.fixture(scope="module")
def undisturbed(model, prompt, group, tmp_path_factory):
    s = sharded(model, tmp_path_factory.mktemp("undisturbed"), group)
    logits = run(s, prompt)
    stats = s.stats()
    s.close()
    return logits, stats


def test_covering_budget_equals_single_process(model, prompt, undisturbed, group):
    logits, stats = undisturbed
    assert_logits_close(logits, run(kvloft.Session(model, RETRIEVAL, RUNTIME), prompt))
    assert stats["cluster"]["ranges_open"] == 3 and stats["tier_tokens"]["host"] == 150 + STEPS - 20
    assert [s["rows"] for s in stats["retriever"]["shards"]] == [RANGE, RANGE, 150 + STEPS - 20 - 2 * RANGE]
    where = group.where()
    assert len({w["pid"] for w in where}) == 3 and all(w["node_id"] for w in where)


class RangeTopK(ExactRetriever):
    """Exact scores, top-`budget` per token range of RANGE host rows: what per-shard top-k attends to."""

    def select(self, layer, q, budget):
        s = self.scores(layer, q)  # [H_kv, N]
        parts = [torch.topk(s[:, a : a + RANGE], min(budget, s[:, a : a + RANGE].shape[1]), dim=-1).indices + a
                 for a in range(0, s.shape[1], RANGE)]
        return Selection(ids=torch.cat(parts, dim=1), scanned=s.numel())


def test_per_shard_topk_equals_union_of_range_topk(model, prompt, group, tmp_path):
    small = RETRIEVAL.replace(budget=8)
    ref = kvloft.Session(model, small, RUNTIME)
    ref.backend.retriever = RangeTopK(small, model.config, torch.device("cpu"))
    with sharded(model, tmp_path, group, small) as s:
        assert_logits_close(run(s, prompt), run(ref, prompt))


def test_global_topk_equals_exact_topk(model, prompt, group, tmp_path):
    small = RETRIEVAL.replace(budget=8)
    with sharded(model, tmp_path, group, small, global_topk=True) as s:
        got = run(s, prompt)
    assert_logits_close(got, run(kvloft.Session(model, small, RUNTIME), prompt))


def test_killed_shard_recovers_identically_then_corruption_is_reported(model, prompt, undisturbed, group, tmp_path):
    s = sharded(model, tmp_path, group)

    def kill(i):
        if i == 2:  # mid-generation: shard 1's process dies, its memory with it
            ray.kill(group.actor(1))

    logits = run(s, prompt, on_step=kill)
    for got, want in zip(logits, undisturbed[0], strict=True):
        assert torch.equal(got, want)  # bitwise: the same rows, the same calls, the same merge order
    assert s.stats()["cluster"]["recoveries"] == 1
    spec = s.backend.calls.specs[1]  # its files hold every row: reopened in this process, all there
    assert ShardStore(spec).rows(0) == ShardStore(spec).rows(1) == RANGE

    rec = tmp_path / "shards" / "range-002" / "layer-000.rec"
    data = bytearray(rec.read_bytes())
    data[-10] ^= 0xFF  # inside the last record's values
    rec.write_bytes(bytes(data))
    ray.get(group.actor(2).close.remote(s.backend.calls.specs[2].directory))  # as if restarted: reload
    with pytest.raises(ValueError, match="fails its crc32 check"):
        s.step(int(logits[-1].argmax()))
    s.close(delete_files=True)


def test_refusals(model, group, tmp_path):
    with pytest.raises(ValueError, match="n_shards must be an int >= 1"):
        ShardConfig(directory=str(tmp_path), n_shards=0)
    with pytest.raises(ValueError, match="n_shards >= 1"):
        ShardGroup(0)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not writable"):
        ShardedSession(model, RETRIEVAL, RUNTIME, shards=ShardConfig(directory=str(tmp_path / "file" / "x")),
                       group=group)
    with pytest.raises(ValueError, match="nothing to shard"):
        sharded(model, tmp_path, group, RETRIEVAL.replace(method="dense"))
    s = sharded(model, tmp_path, group)
    with pytest.raises(ValueError, match="over the shards' capacity"):
        s.feed(list(range(4 + 16 + 3 * RANGE + 1)))
    assert len(s) == 0
    s.feed(list(range(30)))  # still usable; 10 rows reach range 0
    zero = RETRIEVAL.replace(budget=0)  # no retrieval: evicted rows still go to their shard
    set_budget(s, 0)
    ref = kvloft.Session(model, zero, RUNTIME)
    ref.feed(list(range(30)))
    torch.testing.assert_close(s.step(7), ref.step(7), atol=2e-5, rtol=1e-5)
    assert s.stats()["retriever"]["shards"][0]["rows"] == 11
    with pytest.raises(ValueError, match="earlier session"):
        sharded(model, tmp_path, group)  # range-000 is still there
    s.close(delete_files=True)


# ---- serving ---------------------------------------------------------------------------------


def test_api_over_sharded_sessions(model, group, tmp_path):
    pytest.importorskip("uvicorn")
    from kvloft.cluster.serve import ShardedSessionManager
    from kvloft.server.app import ServerConfig, create_app

    chat_model = dataclasses.replace(model, tokenizer=byte_tokenizer())
    cfg = ServerConfig(retrieval=RETRIEVAL, runtime=RUNTIME, max_tokens_limit=16, default_max_tokens=8)
    shards = ShardConfig(directory=str(tmp_path), n_shards=3, shard_tokens=128, num_cpus=0.5)
    body = {"model": "tiny", "max_tokens": 6, "session_id": "doc", "stream": True,
            "messages": [{"role": "user", "content": "a long document, " * 12}]}

    def chat(served):
        status, text = served.request("POST", "/v1/chat/completions", body)
        assert status == 200, text
        return streamed_content(text)

    with Served(create_app(chat_model, cfg)) as served:
        plain = chat(served)
    manager = ShardedSessionManager(chat_model, shards, group=group, retrieval=RETRIEVAL, runtime=RUNTIME)
    with Served(create_app(chat_model, cfg, manager=manager)) as served:
        assert chat(served) == plain and plain  # the same greedy answer as single-process sessions
        status, info = served.request("GET", "/v1/sessions/doc")
        assert status == 200 and json.loads(info)["stats"]["cluster"]["ranges_open"] >= 1
        assert (tmp_path / "doc" / "range-000").is_dir()
        assert served.request("GET", "/v1/sessions/nope")[0] == 404
        status, err = served.request("POST", "/v1/chat/completions", b"{not json")
        assert status == 400 and "error" in json.loads(err)
        assert served.request("DELETE", "/v1/sessions/doc")[0] == 200
        assert not (tmp_path / "doc" / "range-000").exists()


def test_serve_deployment_builds():
    serve = pytest.importorskip("ray.serve")
    from kvloft.cluster.serve import kvloft_deployment
    from kvloft.server.app import ServerConfig

    d = kvloft_deployment("tiny", config=ServerConfig(), name="kvloft-test", num_replicas=1)
    assert isinstance(d, serve.Deployment) and d.name == "kvloft-test" and d.num_replicas == 1
    assert isinstance(d.bind(), serve.Application)
    with pytest.raises(TypeError, match="ShardConfig"):
        kvloft_deployment("tiny", shards={"n_shards": 2})

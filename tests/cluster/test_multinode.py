"""Pipelined sessions on a multi-node Ray cluster on this machine, and the API as a live Ray Serve
deployment on it.

One `ray.cluster_utils.Cluster` for the module: a head (the driver's node, no CPUs, so no stage
lands there) and two worker nodes of 1 CPU, all bound to 127.0.0.1. A STRICT_SPREAD group puts
one stage on each worker. Checked: pipelined greedy logits equal the single-process session's;
a killed stage process and a lost node (a new node joins a moment later) are recovered with a
continuation bitwise equal to the undisturbed run and record files byte-identical to its
files; a lost node with no node to take its stage is a clear StageUnavailable; Serve streams
a chat answer equal to a direct session's and answers bad requests with 4xx while it keeps
serving.
"""

import filecmp
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from cluster_helpers import assert_logits_close, run, streamed_content, tiny_chat_model
from ray.cluster_utils import Cluster
from served import free_port, request

import kvloft
from kvloft.cluster import PipelineConfig, PipelinedSession, StageGroup, StageUnavailable

NODE = {"num_cpus": 1, "object_store_memory": 75 << 20, "node_ip_address": "127.0.0.1"}
RETRIEVAL = kvloft.RetrievalConfig(method="exact", budget=8, n_sink=4, n_window=16)
RUNTIME = kvloft.RuntimeConfig(progress=False, prefill_chunk=32)
STEPS = 4


def test_no_cluster_reachable_is_a_clear_error():
    assert not ray.is_initialized()  # the other modules shut their Ray down
    port = free_port()
    model = kvloft.load_model("tiny", device="cpu", dtype="float32")
    with pytest.raises(ValueError, match=f"no Ray cluster reachable at 127.0.0.1:{port}.*ray start --head"):
        StageGroup(model, PipelineConfig(directory="unused", address=f"127.0.0.1:{port}"))
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={**NODE, "num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        c.add_node(**NODE)
    with pytest.MonkeyPatch.context() as mp:
        # ray.init maps a 127.0.0.1 address to the machine's outward IP, where a head bound to
        # 127.0.0.1 does not listen (ray-project/ray#59110); with this flag off it keeps 127.0.0.1.
        mp.setattr(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", False)
        # the Serve replica imports cluster_helpers: this directory on the workers' path
        job = ray.job_config.JobConfig(code_search_path=[str(Path(__file__).parent)])
        ray.init(address=c.address, _node_ip_address="127.0.0.1", job_config=job, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def model():
    return kvloft.load_model("tiny", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def group(cluster, model, tmp_path_factory):
    g = StageGroup(model, config(tmp_path_factory.mktemp("group")))
    yield g
    g.close()


@pytest.fixture(scope="module")
def prompt():
    import torch

    return torch.randint(0, 512, (100,), generator=torch.Generator().manual_seed(5)).tolist()


def config(directory, **kw):
    return PipelineConfig(directory=str(directory), strategy="STRICT_SPREAD", num_cpus=0.5, **kw)


def pipelined(model, directory, group, **kw):
    return PipelinedSession(model, RETRIEVAL, RUNTIME, pipeline=config(directory, **kw), group=group)


@pytest.fixture(scope="module")
def undisturbed(model, prompt, group, tmp_path_factory):
    """The pipelined run nothing happens to: its logits, its stage directories."""
    directory = tmp_path_factory.mktemp("undisturbed")
    with pipelined(model, directory, group) as s:
        logits = run(s, prompt, STEPS)
    return logits, directory


def stage_on_a_worker(cluster, group) -> tuple[int, object]:
    """A stage index and the cluster node it runs on (a worker: the head runs none)."""
    nodes = {n.node_id: n for n in cluster.worker_nodes}
    i, node_id = next((i, w["node_id"]) for i, w in enumerate(group.where()) if w["node_id"] in nodes)
    return i, nodes[node_id]


def assert_same_files(got: Path, want: Path) -> None:
    """Every file of the two session directories byte-identical (records carry crc32s)."""
    names = sorted(p.relative_to(want) for p in want.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(got) for p in got.rglob("*") if p.is_file())
    assert any(n.suffix == ".rec" for n in names)
    _, mismatch, errors = filecmp.cmpfiles(want, got, [str(n) for n in names], shallow=False)
    assert not mismatch and not errors, (mismatch, errors)


def test_stages_on_distinct_nodes_equal_single_process(cluster, group, model, prompt, undisturbed):
    where = group.where()
    workers = {n.node_id for n in cluster.worker_nodes}
    assert len({w["node_id"] for w in where}) == 2 and {w["node_id"] for w in where} == workers
    assert cluster.head_node.node_id not in {w["node_id"] for w in where}
    assert_logits_close(undisturbed[0], run(kvloft.Session(model, RETRIEVAL, RUNTIME), prompt, STEPS))


def test_killed_stage_process_recovers_identically(group, model, prompt, undisturbed, tmp_path):
    s = pipelined(model, tmp_path, group)

    def kill(step):
        if step == 2:
            ray.kill(group.actor(1))

    logits = run(s, prompt, STEPS, on_step=kill)
    assert all(map(lambda a, b: bool((a == b).all()), logits, undisturbed[0]))  # bitwise
    assert s.stats()["cluster"]["recoveries"] == 1
    s.close()
    assert_same_files(tmp_path, undisturbed[1])


def test_lost_node_stage_is_rebuilt_on_a_joining_node(cluster, group, model, prompt, undisturbed, tmp_path):
    s = pipelined(model, tmp_path, group)
    victim, node = stage_on_a_worker(cluster, group)
    lost = threading.Event()

    def lose(step):
        if step == 2:  # both workers hold a stage: the lost one's waits for the node joining below
            cluster.remove_node(node)
            lost.set()

    # generation in a thread: Ray starts a node only from the main thread, which plays the joining node
    with ThreadPoolExecutor(1) as pool:
        t0 = time.perf_counter()
        gen = pool.submit(run, s, prompt, STEPS, lose)
        while not lost.wait(timeout=0.05):
            assert not gen.done(), gen.result()  # re-raises what stopped the generation
        time.sleep(0.5)
        joined = cluster.add_node(**NODE)
        logits = gen.result(timeout=60)
        total = time.perf_counter() - t0
    assert all(map(lambda a, b: bool((a == b).all()), logits, undisturbed[0]))  # bitwise
    stats = s.stats()["cluster"]
    assert stats["recoveries"] >= 1
    where = group.where()
    assert where[victim]["node_id"] == joined.node_id != node.node_id
    assert len({w["node_id"] for w in where}) == 2
    print(f"\nnode loss: stage {victim} rebuilt on the joining node in {stats['recovery_s']:.2f} s "
          f"(the node joined 0.5 s after the loss; prefill and {STEPS} steps: {total:.2f} s)")
    s.close()
    assert_same_files(tmp_path, undisturbed[1])


def test_lost_node_with_no_room_left_is_a_clear_error(cluster, group, model, prompt, tmp_path):
    s = pipelined(model, tmp_path, group, timeout_s=2.0)
    s.feed(prompt)
    _, node = stage_on_a_worker(cluster, group)
    cluster.remove_node(node)  # the other worker holds the other stage, the head has no CPU
    with pytest.raises(StageUnavailable, match=r"lost its node and none of the 2 live node\(s\) has room.*add a node"):
        s.step(1)
    s.close()


def test_serve_deployment_streams_and_refuses_bad_requests(cluster, tmp_path):
    serve = pytest.importorskip("ray.serve")
    from kvloft.cluster.serve import deploy
    from kvloft.server.app import ServerConfig

    cfg = ServerConfig(retrieval=RETRIEVAL.replace(budget=1000), runtime=RUNTIME, max_tokens_limit=16,
                       default_max_tokens=8, max_request_bytes=4096)
    pipeline = PipelineConfig(directory=str(tmp_path), num_cpus=0.2, max_tokens=200)
    port = free_port()
    deploy(tiny_chat_model, config=cfg, pipeline=pipeline, name="kvloft-test", port=port, proxy_location="HeadOnly",
           ray_actor_options={"num_cpus": 0})
    url = f"http://127.0.0.1:{port}"
    messages = [{"role": "user", "content": "a long document, " * 6}]
    body = {"model": "tiny", "max_tokens": 6, "temperature": 0, "session_id": "doc", "stream": True,
            "messages": messages}
    try:
        status, text = request(url, "POST", "/v1/chat/completions", body)
        assert status == 200, text
        direct = kvloft.Session(tiny_chat_model(), cfg.retrieval, RUNTIME)
        direct.feed_chat(messages)
        answer = direct.generate(max_new_tokens=6)
        assert streamed_content(text) == answer and answer
        status, text = request(url, "GET", "/v1/sessions/doc")
        assert status == 200 and json.loads(text)["stats"]["cluster"]["n_stages"] == 2
        assert (tmp_path / "doc" / "stage-01" / "layer-001.rec").stat().st_size > 0  # written by a stage

        status, text = request(url, "GET", "/v1/sessions/nope")
        assert status == 404 and "no session 'nope'" in text
        status, text = request(url, "POST", "/v1/chat/completions", b"{not json")
        assert status == 400 and "not valid JSON" in text
        status, text = request(url, "POST", "/v1/chat/completions", {**body, "messages": [
            {"role": "user", "content": "x" * 5000}]})
        assert status == 413 and "over this server's limit of 4096 bytes" in text
        status, text = request(url, "POST", "/v1/chat/completions", {**body, "session_id": "big", "messages": [
            {"role": "user", "content": "y" * 300}]})
        assert status == 400 and "over the pipeline's max_tokens=200" in text

        status, text = request(url, "POST", "/v1/chat/completions", {**body, "session_id": "again"})
        assert status == 200 and streamed_content(text) == answer  # still serving
    finally:
        serve.shutdown()

"""Pipelined sessions on a multi-node cluster on this machine: per-token time, throughput, recovery.

Per node count n (--nodes 2,3): a `ray.cluster_utils.Cluster` (a head without CPUs for the
driver, n worker nodes of 1 CPU, all on 127.0.0.1), a StageGroup of n stages placed
STRICT_SPREAD (one per node, `--threads` torch threads each) and the same random-weight
preset, prompt and exact retriever in a single-process Session, which is the reference.

  decode      median ms/token of greedy steps, the pipeline and the single process stepped in
              turn (so load from other processes hits both alike), the single process at 1 and
              at 2 torch threads (the faster one is the reference); greedy tokens compared
  in flight   (first node count only) --inflight sessions stepped together from as many
              threads for --steps tokens each: tokens/s, against the single process stepping
              the same sessions one after the other
  recovery    the step right after the last stage's process is killed (its spare takes over,
              the session replays its record files, the step is resent); with --node-loss also
              the step right after a stage's node is removed, a new node joining 0.5 s later

    python bench/cluster.py --preset smollm2-135m --context 1024 --nodes 2,3
Prints a table and one JSON line last; writes JSON to $OUT or bench/results/cluster.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from kvloft import RetrievalConfig, RuntimeConfig, Session, load_model

NODE = {"num_cpus": 1, "object_store_memory": 200 << 20, "node_ip_address": "127.0.0.1"}


class Threads:
    """A single-process session stepped at a given torch thread count."""

    def __init__(self, session: Session, n: int) -> None:
        self.session, self.n = session, n

    def __getattr__(self, name):
        return getattr(self.session, name)

    def feed(self, prompt):
        torch.set_num_threads(self.n)
        return self.session.feed(prompt)

    def step(self, token):
        torch.set_num_threads(self.n)
        return self.session.step(token)


def greedy_in_turn(sessions: dict[str, object], prompt: list[int], steps: int):
    """Feed every session, then step them in turn. Returns {name: ([seconds per step], [logits])}."""
    out = {}
    for name, s in sessions.items():
        s.feed(prompt)
        out[name] = ([], [s.last_logits.clone()])
    for _ in range(steps):
        for name, s in sessions.items():
            times, logits = out[name]
            t0 = time.perf_counter()
            logits.append(s.step(int(logits[-1].argmax())).clone())
            times.append(time.perf_counter() - t0)
    return out


def generate(session, prompt: list[int], steps: int) -> list[int]:
    session.feed(prompt)
    toks = [int(session.last_logits.argmax())]
    for _ in range(steps):
        toks.append(int(session.step(toks[-1]).argmax()))
    return toks


def in_flight(make, prompts: list[list[int]], steps: int, single: Threads) -> dict:
    """tokens/s of len(prompts) pipelined sessions stepped together vs one process in sequence
    (decode only: every session is fed first)."""
    sessions = [make(i) for i in range(len(prompts))]
    for s, p in zip(sessions, prompts):
        s.feed(p)
    start = [int(s.last_logits.argmax()) for s in sessions]

    def decode(i: int) -> list[int]:
        toks = [start[i]]
        for _ in range(steps):
            toks.append(int(sessions[i].step(toks[-1]).argmax()))
        return toks

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(decode, range(len(prompts))))
    wall = time.perf_counter() - t0
    for s in sessions:
        s.close(delete_files=True)
    single_s, want = 0.0, []
    for p in prompts:
        single.session.reset()
        single.feed(p)
        toks = [int(single.last_logits.argmax())]
        t0 = time.perf_counter()
        for _ in range(steps):
            toks.append(int(single.step(toks[-1]).argmax()))
        single_s += time.perf_counter() - t0
        want.append(toks)
    n_tok = len(prompts) * steps
    return {"sequences": len(prompts), "tokens_per_s": n_tok / wall, "single_process_tokens_per_s": n_tok / single_s,
            "speedup": single_s / wall, "greedy_tokens_equal": got == want}


def step_after(session, logits: list, disturb) -> float:
    """Seconds of the greedy step right after `disturb()` (its logits appended)."""
    disturb()
    t0 = time.perf_counter()
    logits.append(session.step(int(logits[-1].argmax())).clone())
    return time.perf_counter() - t0


def one_cluster(n: int, model, rc, rt, prompt, args, first: bool) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from kvloft.cluster import PipelineConfig, PipelinedSession, StageGroup

    head = {**NODE, "num_cpus": 0, "object_store_memory": 1 << 30, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    for _ in range(n):
        cluster.add_node(**NODE)
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False  # keep 127.0.0.1 (ray-project/ray#59110)
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False)
    tmp = tempfile.TemporaryDirectory()
    try:
        cfg = PipelineConfig(directory=tmp.name, n_stages=n, strategy="STRICT_SPREAD", num_cpus=1,
                             torch_threads=args.threads)
        group = StageGroup(model, cfg)
        pipe = PipelinedSession(model, rc, rt, pipeline=cfg.replace(directory=f"{tmp.name}/main"), group=group)
        single = {t: Threads(Session(model, rc, rt), t) for t in (1, 2)}
        runs = greedy_in_turn({"pipeline": pipe, **{f"single {t}": s for t, s in single.items()}}, prompt,
                              args.steps)
        med = {k: statistics.median(v[0]) for k, v in runs.items()}
        best = min((1, 2), key=lambda t: med[f"single {t}"])
        ref = runs[f"single {best}"][1]
        row = {"nodes": n, "layers": [list(r) for r in group.layers], "ms_per_token": 1000 * med["pipeline"],
               "single_1_thread_ms": 1000 * med["single 1"], "single_2_threads_ms": 1000 * med["single 2"],
               "ratio": med["pipeline"] / med[f"single {best}"],
               "greedy_tokens_equal": [int(t.argmax()) for t in runs["pipeline"][1]] == [int(t.argmax()) for t in ref],
               "max_abs_logit_diff": max(float((a - b).abs().max()) for a, b in zip(runs["pipeline"][1], ref))}
        if first and args.inflight > 1:
            gen = torch.Generator().manual_seed(1)
            prompts = [torch.randint(0, model.config.vocab_size, (args.context,), generator=gen).tolist()
                       for _ in range(args.inflight)]
            row["in_flight"] = in_flight(
                lambda i: PipelinedSession(model, rc, rt, pipeline=cfg.replace(directory=f"{tmp.name}/f{i}"),
                                           group=group), prompts, args.steps, single[best])
        logits = runs["pipeline"][1]
        row["recovery_step_s"] = step_after(pipe, logits, lambda: ray.kill(group.actor(n - 1)))
        row["recovery"] = pipe.stats()["cluster"]["last_recovery"]
        if args.node_loss:
            row["node_loss_step_s"] = lose_node(cluster, group, pipe, logits)
        pipe.close()
        group.close()
        return row
    finally:
        ray.shutdown()
        cluster.shutdown()
        tmp.cleanup()


def lose_node(cluster, group, pipe, logits) -> float:
    """The step right after stage 0's node is removed; a node joins 0.5 s later."""
    node_id = group.where()[0]["node_id"]
    node = next(w for w in cluster.worker_nodes if w.node_id == node_id)
    cluster.remove_node(node)
    box: dict = {}
    th = threading.Thread(target=lambda: box.update(s=step_after(pipe, logits, lambda: None)))
    th.start()
    time.sleep(0.5)
    cluster.add_node(**NODE)
    th.join()
    return box["s"]


def print_table(rows: list[dict]) -> None:
    print(f"{'nodes':>5} {'ms/tok':>8} {'1 thr':>8} {'2 thr':>8} {'ratio':>6} {'kill s':>7} {'tokens eq':>9}")
    for r in rows:
        print(f"{r['nodes']:5d} {r['ms_per_token']:8.1f} {r['single_1_thread_ms']:8.1f} "
              f"{r['single_2_threads_ms']:8.1f} {r['ratio']:6.2f} {r['recovery_step_s']:7.2f} "
              f"{r['greedy_tokens_equal']!s:>9}")
        f = r.get("in_flight")
        if f:
            print(f"      {f['sequences']} in flight: {f['tokens_per_s']:.1f} tok/s vs one process "
                  f"{f['single_process_tokens_per_s']:.1f} ({f['speedup']:.2f}x), tokens equal: "
                  f"{f['greedy_tokens_equal']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--nodes", default="2,3")
    ap.add_argument("--inflight", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per stage")
    ap.add_argument("--node-loss", action="store_true")
    ap.add_argument("--budget", type=int, default=128)
    ap.add_argument("--sink", type=int, default=16)
    ap.add_argument("--window", type=int, default=128)
    args = ap.parse_args()

    import ray

    load = os.getloadavg()
    model = load_model(args.preset, device="cpu", dtype="float32")
    rc = RetrievalConfig(method="exact", budget=args.budget, n_sink=args.sink, n_window=args.window)
    rt = RuntimeConfig(progress=False, device="cpu")
    prompt = torch.randint(0, model.config.vocab_size, (args.context,), generator=torch.Generator().manual_seed(0))
    counts = [int(n) for n in args.nodes.split(",")]
    rows = [one_cluster(n, model, rc, rt, prompt.tolist(), args, i == 0) for i, n in enumerate(counts)]
    print_table(rows)
    ncpu = os.cpu_count() or 1
    result = {"bench": "cluster", "design": "pipeline",
              "machine": f"{platform.node()} ({ncpu} CPUs, {platform.processor() or 'cpu'}), shared with other jobs",
              "load_avg_1_5_15": [round(x, 2) for x in load],
              "load_avg_at_end": [round(x, 2) for x in os.getloadavg()], "date": time.strftime("%Y-%m-%d"),
              "preset": args.preset, "context": args.context, "steps": args.steps, "budget": args.budget,
              "n_sink": args.sink, "n_window": args.window, "stage_threads": args.threads, "ray": ray.__version__,
              "rows": rows}
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results") / "cluster.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

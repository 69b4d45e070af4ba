"""Sharded sessions: per-token decode overhead, per-layer round trip, recovery.

A single-process Session and ShardedSessions run the same random-weight preset on the same
prompt and the same exact retriever (global top-k by default: the same rows as the single
process), stepping in turn. Two modes:

  --shards 1,2,3   one local Ray node; groups of 1..n shard processes, all alive at once
  --nodes 2,3      per count n, a multi-node cluster on this machine (ray.cluster_utils.Cluster:
                   a head without CPUs for the driver, n + 1 worker nodes of 1 CPU), n shards
                   placed STRICT_SPREAD (one per node, the last node spare)
  --compiled-graph one local Ray node; per count of --shards, one layer's batch of `step` calls
                   (the session's per-shard top-k call) over the same KVShard actors through
                   `.remote()` and through a Ray compiled graph (ray.dag), `noop` and `attend`
                   as below, median and p90 over --reps calls per path, in alternating blocks;
                   also the CPU seconds per call (driver + shards) and what the shards burn
                   while the compiled graph is alive and idle, and how much slower a fixed driver
                   workload runs then

Measured per setup:
  decode      median ms/token of greedy steps; the sharded logits are checked against the
              single-process ones (max abs difference reported)
  round trip  one layer's batch of shard calls, timed alone: `noop` (q only, budget 0:
              Ray's submit + get for n actors) and `attend` (q, the real budget: retrieval
              and partial attention in the shards); median over --reps batches
  recovery    the step right after a shard process is killed (replacement process start,
              store reload with checksums, index replay); with --nodes also the step right
              after the node of a shard is removed (the bundle re-placed on the spare node)

    python bench/cluster.py --preset smollm2-135m --context 1024 --shards 1,2,3
    python bench/cluster.py --preset smollm2-135m --context 1024 --nodes 2,3
    python bench/cluster.py --preset smollm2-135m --context 1024 --shards 2,3 --compiled-graph --reps 300
Prints a table and one JSON line last; writes JSON to $OUT or bench/results/: cluster.json
(with --per-shard-topk cluster_per_shard_topk.json); --nodes results go under its "multinode" key,
--compiled-graph results under "compiled_graph".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kvloft import RetrievalConfig, RuntimeConfig, Session, load_model


def greedy_in_turn(sessions: dict[str, object], prompt: list[int], steps: int):
    """Feed every session, then step them in turn (one step each per round), so that load from
    other processes hits every setup alike. Returns {name: ([seconds per step], [logits])}."""
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


def round_trip(session, budget: int, reps: int) -> dict[str, float]:
    """Median seconds of one layer's batch of shard calls: q only (noop) and with retrieval."""
    calls = session.backend.calls
    q = torch.randn(session.model.config.n_heads, session.model.config.head_dim).to(session.model.dtype)
    out = {}
    for name, b in (("noop", 0), ("attend", budget)):
        ts = []
        for r in range(reps):
            t0 = time.perf_counter()
            calls.run({i: ("step", (r % session.model.config.n_layers, q, b, None)) for i in calls.specs})
            ts.append(time.perf_counter() - t0)
        out[name] = statistics.median(ts)
    return out


def step_after(session, logits: list, disturb) -> float:
    """Seconds of the greedy step right after `disturb()` (its logits appended)."""
    disturb()
    t0 = time.perf_counter()
    logits.append(session.step(int(logits[-1].argmax())).clone())
    return time.perf_counter() - t0


def shard_row(name: str, n: int, session, group, run, base, args, lose_node=None) -> dict:
    """The figures of one sharded setup after its in-turn run (it is stepped further here)."""
    import ray

    times, logits = run
    diffs = [float((a - b).abs().max()) for a, b in zip(logits, base[1])]  # prefill, then each step
    rt_s = round_trip(session, args.budget, args.reps)
    layers = session.model.config.n_layers
    wait = session.stats()["timings_s"].get("shard_wait", 0.0)
    med, ref = statistics.median(times), statistics.median(base[0])
    row = {"setup": name, "shards": n, "ms_per_token": 1000 * med, "overhead_ms_per_token": 1000 * (med - ref),
           "roundtrip_noop_ms": 1000 * rt_s["noop"], "roundtrip_attend_ms": 1000 * rt_s["attend"],
           "shard_wait_ms_per_layer": 1000 * wait / ((args.steps + 1) * layers),
           "max_abs_logit_diff": max(diffs), "abs_logit_diff_per_step": diffs,
           "greedy_tokens_equal": all(int(a.argmax()) == int(b.argmax()) for a, b in zip(logits, base[1]))}
    row["recovery_step_s"] = step_after(session, logits, lambda: ray.kill(group.actor(n - 1)))
    if lose_node is not None:
        row["node_loss_recovery_step_s"] = step_after(session, logits, lose_node)
        row["nodes_after"] = sorted(w["node_id"][:8] for w in group.where())
    return row


def single_node(model, rc, rt, prompt, args, host: int) -> list[dict]:
    """--shards: groups of 1..n shard processes on one local Ray node, all stepped in turn."""
    import ray

    from kvloft.cluster import ShardConfig, ShardedSession, ShardGroup

    ncpu = os.cpu_count() or 1
    ray.init(num_cpus=ncpu, include_dashboard=False, log_to_driver=False)
    shard_counts = [int(x) for x in args.shards.split(",")]
    cpus = ncpu / sum(shard_counts)  # every group is alive at once; reservations only
    groups = {n: ShardGroup(n, num_cpus=cpus) for n in shard_counts}
    tmp = tempfile.TemporaryDirectory()
    sessions = {"single process": Session(model, rc, rt)}
    for n, group in groups.items():
        cfg = ShardConfig(directory=f"{tmp.name}/{n}", n_shards=n, shard_tokens=-(-host // n), num_cpus=cpus,
                          global_topk=not args.per_shard_topk)
        sessions[f"{n} shard(s)"] = ShardedSession(model, rc, rt, shards=cfg, group=group)
    runs = greedy_in_turn(sessions, prompt, args.steps)
    base = runs["single process"]
    rows = [{"setup": "single process", "shards": 0, "ms_per_token": 1000 * statistics.median(base[0])}]
    for n, group in groups.items():
        name = f"{n} shard(s)"
        rows.append(shard_row(name, n, sessions[name], group, runs[name], base, args))
        sessions[name].close()
        group.close()
    tmp.cleanup()
    ray.shutdown()
    return rows


def multi_node(model, rc, rt, prompt, args, host: int) -> list[dict]:
    """--nodes: per count n, a local multi-node cluster (n + 1 workers) and n STRICT_SPREAD shards."""
    import ray
    from ray.cluster_utils import Cluster

    from kvloft.cluster import ShardConfig, ShardedSession, ShardGroup

    rows = []
    for n in [int(x) for x in args.nodes.split(",")]:
        node = {"num_cpus": 1, "object_store_memory": 100 << 20}
        t0 = time.perf_counter()
        cluster = Cluster(initialize_head=True, head_node_args={**node, "num_cpus": 0, "include_dashboard": False})
        for _ in range(n + 1):
            cluster.add_node(**node)
        ray.init(address=cluster.address, log_to_driver=False)
        group = ShardGroup(n, strategy="STRICT_SPREAD", num_cpus=1)
        start_s = time.perf_counter() - t0
        tmp = tempfile.TemporaryDirectory()
        cfg = ShardConfig(directory=tmp.name, n_shards=n, shard_tokens=-(-host // n), strategy="STRICT_SPREAD",
                          global_topk=not args.per_shard_topk)
        name = f"{n} nodes"
        sessions = {"single process": Session(model, rc, rt), name: ShardedSession(model, rc, rt, shards=cfg,
                                                                                    group=group)}
        runs = greedy_in_turn(sessions, prompt, args.steps)
        base = runs["single process"]
        rows.append({"setup": f"single process ({name} run)", "shards": 0,
                     "ms_per_token": 1000 * statistics.median(base[0])})

        def lose_node(group=group, cluster=cluster):
            held = {w["node_id"] for w in group.where()}
            victim = next(nd for nd in cluster.worker_nodes if nd.node_id in held)
            cluster.remove_node(victim)

        row = shard_row(name, n, sessions[name], group, runs[name], base, args, lose_node)
        row.update(nodes=n + 2, cluster_start_s=start_s)
        rows.append(row)
        sessions[name].close()
        group.close()
        ray.shutdown()
        cluster.shutdown()
        tmp.cleanup()
    return rows


def compile_step_graph(group, calls):
    """A compiled graph of one layer's `step` calls, one per open range, on the group's actors.
    execute(layer, q, budget, block of range 0, ..., block of the last) -> one ref per range."""
    from ray.dag import InputNode, MultiOutputNode

    with InputNode() as inp:
        outs = [group.actor(i).step.bind(calls.specs[i].directory, inp[0], inp[1], inp[2], inp[3 + j])
                for j, i in enumerate(sorted(calls.specs))]
        dag = MultiOutputNode(outs)
    return dag.experimental_compile()


class CpuClock:
    """CPU seconds (user + system) used by the driver and the given shard processes."""

    def __init__(self, pids: list[int]) -> None:
        import psutil

        self.procs = [psutil.Process()] + [psutil.Process(p) for p in pids]

    def __call__(self) -> float:
        return sum(t.user + t.system for t in (p.cpu_times() for p in self.procs))


def timed_block(call, reps: int, n_layers: int, clock: CpuClock) -> tuple[list[float], float]:
    """Seconds of each of `reps` calls call(layer) (layers cycled; 3 warm-up calls not kept)
    and the CPU seconds they used in all."""
    for r in range(3):
        call(r % n_layers)
    c0 = clock()
    ts = []
    for r in range(reps):
        t0 = time.perf_counter()
        call(r % n_layers)
        ts.append(time.perf_counter() - t0)
    return ts, clock() - c0


def driver_work_ms(reps: int = 5) -> float:
    """Median ms of a fixed driver-side workload (matmuls of a small model's MLP size), to see
    what shard processes busy on the same cores cost the driver."""
    x, w = torch.randn(64, 576), torch.randn(576, 1536)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(50):
            x @ w
        ts.append(time.perf_counter() - t0)
    return 1000 * statistics.median(ts)


def compiled_vs_remote(session, group, budget: int, reps: int, rounds: int = 3) -> dict:
    """One layer's batch of `step` calls through `.remote()` (ShardCalls, as the session sends
    them) and through a compiled graph, noop (budget 0) and attend; `rounds` alternating
    blocks of reps / rounds calls per path and method, the graph compiled for its blocks
    and torn down after them (an idle live graph keeps the shard processes busy)."""
    import ray

    calls, cfg = session.backend.calls, session.model.config
    q = torch.randn(cfg.n_heads, cfg.head_dim).to(session.model.dtype)  # [H_q, D], as sent per layer
    nones = (None,) * len(calls.specs)  # no evicted row: the round trip alone
    where = group.where()
    clock = CpuClock([where[i]["pid"] for i in sorted(calls.specs)])
    ts = {(p, m): [] for p in ("remote", "compiled") for m in ("noop", "attend")}
    cpu = dict.fromkeys(ts, 0.0)
    out = {"compile_s": [], "teardown_s": [], "idle_shard_cpu_s_per_s": [], "driver_work_ms_no_graph": [],
           "driver_work_ms_graph_live": [], "outputs_equal": True}
    per = max(1, reps // rounds)

    def remote(layer: int, b: int):
        return calls.run({i: ("step", (layer, q, b, None)) for i in calls.specs})

    for _ in range(rounds):
        for m, b in (("noop", 0), ("attend", budget)):
            t, c = timed_block(lambda layer, b=b: remote(layer, b), per, cfg.n_layers, clock)
            ts["remote", m] += t
            cpu["remote", m] += c
        t0 = time.perf_counter()
        graph = compile_step_graph(group, calls)
        out["compile_s"].append(time.perf_counter() - t0)
        for m, b in (("noop", 0), ("attend", budget)):
            t, c = timed_block(lambda layer, b=b, g=graph: ray.get(g.execute(layer, q, b, *nones)), per,
                               cfg.n_layers, clock)
            ts["compiled", m] += t
            cpu["compiled", m] += c
        got = ray.get(graph.execute(0, q, budget, *nones))
        want = remote(0, budget)
        out["outputs_equal"] &= all(torch.equal(g[0], w[0]) and torch.equal(g[1], w[1])
                                    for g, w in zip(got, want.values(), strict=True))
        c0 = clock()
        time.sleep(1.0)
        out["idle_shard_cpu_s_per_s"].append(clock() - c0)  # the driver idles: ~all of it is the shards
        out["driver_work_ms_graph_live"].append(driver_work_ms())
        t0 = time.perf_counter()
        graph.teardown()
        out["teardown_s"].append(time.perf_counter() - t0)
        out["driver_work_ms_no_graph"].append(driver_work_ms())
    for (p, m), t in ts.items():
        out[f"{p}_{m}_ms"] = {"median": 1000 * statistics.median(t),
                              "p90": 1000 * statistics.quantiles(t, n=10)[-1],
                              "cpu_ms_per_call": 1000 * cpu[p, m] / len(t), "calls": len(t)}
    return out


def compiled_graph(model, rc, rt, prompt, args, host: int) -> list[dict]:
    """--compiled-graph: per shard count (one group at a time), `.remote()` vs compiled graph."""
    import ray

    from kvloft.cluster import ShardConfig, ShardedSession, ShardGroup

    ncpu = os.cpu_count() or 1
    ray.init(num_cpus=ncpu, include_dashboard=False, log_to_driver=False)
    rows = []
    for n in [int(x) for x in args.shards.split(",")]:
        group = ShardGroup(n, num_cpus=ncpu / n)
        with tempfile.TemporaryDirectory() as tmp:
            cfg = ShardConfig(directory=tmp, n_shards=n, shard_tokens=-(-host // n), num_cpus=ncpu / n)
            session = ShardedSession(model, rc, rt, shards=cfg, group=group)
            session.feed(prompt)
            load = os.getloadavg()
            row = {"setup": f"{n} shard(s)", "shards": n, "ranges_open": len(session.backend.calls.specs),
                   "load_avg_1_5_15": [round(x, 2) for x in load],
                   **compiled_vs_remote(session, group, args.budget, args.reps)}
            rows.append(row)
            session.close()
        group.close()
    ray.shutdown()
    return rows


def print_compiled_table(rows: list[dict]) -> None:
    print(f"{'setup':12} {'call':7} {'remote med':>10} {'p90':>6} {'cpu':>6} {'compiled med':>12} {'p90':>6} "
          f"{'cpu':>6} {'change':>7}")
    for r in rows:
        for m in ("noop", "attend"):
            a, b = r[f"remote_{m}_ms"], r[f"compiled_{m}_ms"]
            print(f"{r['setup']:12} {m:7} {a['median']:10.2f} {a['p90']:6.2f} {a['cpu_ms_per_call']:6.2f} "
                  f"{b['median']:12.2f} {b['p90']:6.2f} {b['cpu_ms_per_call']:6.2f} "
                  f"{100 * (b['median'] / a['median'] - 1):+6.0f}%")
        print(f"{'':12} compile {statistics.mean(r['compile_s']):.2f} s, teardown "
              f"{statistics.mean(r['teardown_s']):.2f} s, idle live graph: shards use "
              f"{statistics.mean(r['idle_shard_cpu_s_per_s']):.2f} CPU s/s; outputs equal: "
              f"{r['outputs_equal']}")
        no_graph, live = (statistics.median(r[f"driver_work_ms_{k}"]) for k in ("no_graph", "graph_live"))
        print(f"{'':12} driver work: {no_graph:.1f} ms without a graph, {live:.1f} ms with an idle live graph")


def print_table(rows: list[dict]) -> None:
    print(f"{'setup':28} {'ms/tok':>8} {'+ms/tok':>8} {'rt noop':>8} {'rt attend':>9} {'kill s':>7} "
          f"{'node s':>7} {'diff':>8}")
    for r in rows:
        print(f"{r['setup']:28} {r['ms_per_token']:8.1f} {r.get('overhead_ms_per_token', 0):8.1f} "
              f"{r.get('roundtrip_noop_ms', 0):8.2f} {r.get('roundtrip_attend_ms', 0):9.2f} "
              f"{r.get('recovery_step_s', 0):7.2f} {r.get('node_loss_recovery_step_s', 0):7.2f} "
              f"{r.get('max_abs_logit_diff', 0):8.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--shards", default="1,2,3")
    ap.add_argument("--nodes", default=None, help="node counts for the multi-node mode, e.g. 2,3")
    ap.add_argument("--budget", type=int, default=128)
    ap.add_argument("--sink", type=int, default=16)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--compiled-graph", action="store_true",
                    help="per count of --shards: one layer's calls through .remote() vs a Ray compiled graph")
    ap.add_argument("--per-shard-topk", action="store_true",
                    help="each shard attends to its own top-budget (default: global top-k, the single "
                         "process's rows, so the logits can be compared)")
    args = ap.parse_args()

    import ray

    load = os.getloadavg()
    model = load_model(args.preset, device="cpu", dtype="float32")
    rc = RetrievalConfig(method="exact", budget=args.budget, n_sink=args.sink, n_window=args.window)
    rt = RuntimeConfig(progress=False, device="cpu")
    prompt = torch.randint(0, model.config.vocab_size, (args.context,), generator=torch.Generator().manual_seed(0))
    prompt = prompt.tolist()
    host = args.context + args.steps + 3 - args.sink - args.window  # room for the recovery steps
    measure = compiled_graph if args.compiled_graph else multi_node if args.nodes else single_node
    rows = measure(model, rc, rt, prompt.copy(), args, host)
    (print_compiled_table if args.compiled_graph else print_table)(rows)
    load_end = os.getloadavg()

    ncpu = os.cpu_count() or 1
    result = {"bench": "cluster", "machine": f"{platform.node()} ({ncpu} CPUs, {platform.processor() or 'cpu'})",
              "load_avg_1_5_15": [round(x, 2) for x in load], "load_avg_at_end": [round(x, 2) for x in load_end],
              "date": time.strftime("%Y-%m-%d"),
              "preset": args.preset, "context": args.context, "steps": args.steps, "budget": args.budget,
              "n_sink": args.sink, "n_window": args.window,
              "global_topk": not args.per_shard_topk, "ray": ray.__version__, "rows": rows}
    name = "cluster_per_shard_topk.json" if args.per_shard_topk else "cluster.json"
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results") / name
    out.parent.mkdir(parents=True, exist_ok=True)
    whole = json.loads(out.read_text()) if out.exists() else {}
    key = "compiled_graph" if args.compiled_graph else "multinode" if args.nodes else None
    if key:  # kept next to the single-node figures of the same file
        if args.compiled_graph:  # one layer's KVShard.step calls (per-shard top-k), no decode steps
            result = {**{k: v for k, v in result.items() if k not in ("steps", "global_topk")},
                      "call": "KVShard.step", "reps": args.reps}
        whole[key] = result
        out.write_text(json.dumps(whole, indent=1))
    else:
        kept = {k: whole[k] for k in ("multinode", "compiled_graph") if k in whole}
        out.write_text(json.dumps({**result, **kept}, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

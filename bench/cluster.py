"""Sharded sessions on one machine: per-token decode overhead, per-layer round trip, recovery.

A single-process Session and ShardedSessions over 1..n shard processes (a local Ray
cluster) run the same random-weight preset on the same prompt and the same exact retriever
(global top-k by default: the same rows as the single process), stepping in turn:

  decode      median ms/token of greedy steps, per setup; the sharded logits are checked
              against the single-process ones (max abs difference reported)
  round trip  one layer's batch of shard calls, timed alone: `noop` (q only, budget 0:
              Ray's submit + get for n actors) and `attend` (q, the real budget: retrieval
              and partial attention in the shards); median over --reps batches
  recovery    the step right after a shard process is killed (replacement process start,
              store reload with checksums, index replay), against the median step

    python bench/cluster.py --preset smollm2-135m --context 1024 --shards 1,2,3
Prints a table and one JSON line last; writes JSON to $OUT or bench/results/ (cluster.json,
with --per-shard-topk cluster_per_shard_topk.json).
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--shards", default="1,2,3")
    ap.add_argument("--budget", type=int, default=128)
    ap.add_argument("--sink", type=int, default=16)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--per-shard-topk", action="store_true",
                    help="each shard attends to its own top-budget (default: global top-k, the single "
                         "process's rows, so the logits can be compared)")
    args = ap.parse_args()

    import ray

    from kvloft.cluster import ShardConfig, ShardedSession, ShardGroup

    ncpu = os.cpu_count() or 1
    ray.init(num_cpus=ncpu, include_dashboard=False, log_to_driver=False)
    model = load_model(args.preset, device="cpu", dtype="float32")
    rc = RetrievalConfig(method="exact", budget=args.budget, n_sink=args.sink, n_window=args.window)
    rt = RuntimeConfig(progress=False, device="cpu")
    prompt = torch.randint(0, model.config.vocab_size, (args.context,), generator=torch.Generator().manual_seed(0))
    prompt = prompt.tolist()
    host = args.context + args.steps + 1 - args.sink - args.window

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
    base, ref = runs["single process"]
    rows = [{"setup": "single process", "shards": 0, "ms_per_token": 1000 * statistics.median(base)}]
    for n, group in groups.items():
        s = sessions[f"{n} shard(s)"]
        times, logits = runs[f"{n} shard(s)"]
        diff = max(float((a - b).abs().max()) for a, b in zip(logits, ref))
        rt_s = round_trip(s, args.budget, args.reps)
        wait = s.stats()["timings_s"].get("shard_wait", 0.0)
        ray.kill(group.actor(n - 1))
        t0 = time.perf_counter()
        s.step(int(logits[-1].argmax()))
        recover = time.perf_counter() - t0
        s.close()
        group.close()
        med = statistics.median(times)
        rows.append({"setup": f"{n} shard(s)", "shards": n, "ms_per_token": 1000 * med,
                     "overhead_ms_per_token": 1000 * (med - statistics.median(base)),
                     "roundtrip_noop_ms": 1000 * rt_s["noop"], "roundtrip_attend_ms": 1000 * rt_s["attend"],
                     "shard_wait_ms_per_layer": 1000 * wait / ((args.steps + 1) * model.config.n_layers),
                     "recovery_step_s": recover, "max_abs_logit_diff": diff})
    tmp.cleanup()
    ray.shutdown()

    print(f"{'setup':16} {'ms/tok':>8} {'+ms/tok':>8} {'rt noop':>8} {'rt attend':>9} {'recover s':>9} {'diff':>8}")
    for r in rows:
        print(f"{r['setup']:16} {r['ms_per_token']:8.1f} {r.get('overhead_ms_per_token', 0):8.1f} "
              f"{r.get('roundtrip_noop_ms', 0):8.2f} {r.get('roundtrip_attend_ms', 0):9.2f} "
              f"{r.get('recovery_step_s', 0):9.2f} {r.get('max_abs_logit_diff', 0):8.1e}")
    result = {"bench": "cluster", "machine": f"{platform.node()} ({ncpu} CPUs, {platform.processor() or 'cpu'})",
              "preset": args.preset, "context": args.context, "steps": args.steps, "budget": args.budget,
              "n_sink": args.sink, "n_window": args.window,
              "global_topk": not args.per_shard_topk, "ray": ray.__version__, "rows": rows}
    name = "cluster_per_shard_topk.json" if args.per_shard_topk else "cluster.json"
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results") / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""CPU decode step of a dense and an exact session side by side: ms/token, same process.

SmolLM2-135M fp32 on the CPU (torch path), a random prompt of --tokens, one dense session and
one exact session (--budget, sink 64, window 512: the demo's tiers), decode steps alternating
between the two so that both see the same load; median of --steps. Compare code versions by
running it with each on PYTHONPATH.

    taskset -c 0,1 python bench/cpu_decode_step.py --tokens 2048 --budget 1024
    python bench/cpu_decode_step.py --tokens 6000 --budget 256 --threads 1
Prints one JSON line: wall and process-CPU ms per token of each, the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import kvloft
from kvloft.config import RetrievalConfig, RuntimeConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model = kvloft.load_model("smollm2")
    ids = torch.randint(100, 40000, (a.tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    rt = RuntimeConfig(device="cpu", progress=False)
    sessions = {"dense": RetrievalConfig(method="dense"),
                "exact": RetrievalConfig(method="exact", budget=a.budget, n_sink=64, n_window=512)}
    for name, rcfg in sessions.items():
        s = sessions[name] = kvloft.Session(model, rcfg, rt)
        s.feed(ids)
        for t in range(3):  # warm up (the compiled CPU scan is built at the first step)
            s.step(7 + t)
    wall: dict[str, list[float]] = {n: [] for n in sessions}
    cpu: dict[str, list[float]] = {n: [] for n in sessions}
    load0 = os.getloadavg()[0]
    for i in range(a.steps):
        for name, s in sessions.items():
            t0, c0 = time.perf_counter(), time.process_time()
            s.step(11 + i)
            wall[name].append(1e3 * (time.perf_counter() - t0))
            cpu[name].append(1e3 * (time.process_time() - c0))
    med = {k: {n: round(statistics.median(v), 1) for n, v in d.items()} for k, d in (("wall", wall), ("cpu", cpu))}
    print(json.dumps({"tokens": a.tokens, "budget": a.budget, "threads": torch.get_num_threads(),
                      "load": [round(load0, 2), round(os.getloadavg()[0], 2)],
                      "wall_ms_per_token": med["wall"], "cpu_ms_per_token": med["cpu"]}))


if __name__ == "__main__":
    main()

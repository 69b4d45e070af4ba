"""Exact decode on the CPU with its ranking and row gather compiled or through torch: ms/token.

SmolLM2-135M fp32, the `kvloft demo` prompt (passkey, 6000 tokens, seed 0, depth 0.4), two exact
sessions (budget 256, sink 64, window 512), each fed the prompt once: one decodes with
kernels/cpu_rank.py and cpu_decode's compiled gather, the other through torch (the flags off);
their steps alternate so that both see the same load. Median and mean of --steps steps (after
2 warm-up steps each).

    python bench/exact_rank_step.py --steps 12
Prints one JSON line: wall ms per token of each variant, the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import kvloft
from kvloft.config import RetrievalConfig, RuntimeConfig
from kvloft.eval.tasks import build_prompt, generate
from kvloft.kernels import cpu_decode, cpu_rank


def _variant(on: bool) -> None:
    cpu_rank.enabled = on
    cpu_decode.compiled_gather = on


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--torch-first", action="store_true", help="step the torch variant first in each pair")
    a = p.parse_args()
    model = kvloft.load_model("smollm2")
    prompt = build_prompt(generate("passkey", model.tokenizer, 6000, seed=0, depth=0.4))
    rt = RuntimeConfig(device="cpu", progress=False)
    rcfg = RetrievalConfig(method="exact", budget=256, n_sink=64, n_window=512)
    sessions = {}
    for name in ("torch", "compiled") if a.torch_first else ("compiled", "torch"):
        sessions[name] = s = kvloft.Session(model, rcfg, rt)
        s.feed(prompt)
        for t in range(2):
            _variant(name == "compiled")
            s.step(7 + t)
    wall: dict[str, list[float]] = {n: [] for n in sessions}
    load0 = os.getloadavg()[0]
    for i in range(a.steps):
        for name, s in sessions.items():
            _variant(name == "compiled")
            t0 = time.perf_counter()
            s.step(11 + i)
            wall[name].append(1e3 * (time.perf_counter() - t0))
    _variant(True)
    print(json.dumps({"steps": a.steps, "first": next(iter(sessions)), "load": [round(load0, 2), round(os.getloadavg()[0], 2)],
                      "median_ms_per_token": {n: round(statistics.median(v), 1) for n, v in wall.items()},
                      "mean_ms_per_token": {n: round(statistics.mean(v), 1) for n, v in wall.items()}}))


if __name__ == "__main__":
    main()

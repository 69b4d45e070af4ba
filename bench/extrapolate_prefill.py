"""Prefill seconds per chunk in extrapolation mode (exact+x) beside dense, on the same tokens.

    python bench/extrapolate_prefill.py --model smollm2 --lengths 6k,16k            # CPU or GPU
    python bench/extrapolate_prefill.py --model qwen2.5-coder-0.5b --lengths 64k --profile

Each row: one Session.feed of random token ids (seed 1) after one short warm-up feed; budget
2048, sink 64, window 512 unless given. --profile prints the top functions (cProfile, by own
time) of the exact+x run. Prints a table; --out writes extrapolate_prefill.json.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
from pathlib import Path

import torch

from kvloft import RetrievalConfig, RuntimeConfig, Session, load_model
from kvloft.config import parse_tokens


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def feed_seconds(model, rcfg: RetrievalConfig, chunk: int, ids: list[int], profile: bool) -> float:
    s = Session(model, rcfg, RuntimeConfig(prefill_chunk=chunk, progress=False))
    prof = cProfile.Profile() if profile else None
    sync()
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    s.feed(ids)
    sync()
    if prof:
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--lengths", default="6k")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--modes", default="dense,exact+x", help="comma list of dense, exact+x")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    model = load_model(a.model)
    cfgs = {"dense": RetrievalConfig(method="dense"),
            "exact+x": RetrievalConfig(method="exact", budget=a.budget, n_sink=64, n_window=512,
                                       position_mode="extrapolate")}
    g = torch.Generator().manual_seed(1)
    feed_seconds(model, cfgs["exact+x"], a.chunk, torch.randint(0, 1000, (2 * a.chunk,), generator=g).tolist(), False)
    rows = []
    for n in (parse_tokens(x) for x in a.lengths.split(",")):
        ids = torch.randint(0, 1000, (n,), generator=g).tolist()
        for mode in a.modes.split(","):
            secs = feed_seconds(model, cfgs[mode], a.chunk, ids, a.profile and mode != "dense")
            rows.append({"tokens": n, "mode": mode, "seconds": secs, "per_chunk": secs / -(-n // a.chunk)})
            print(f"{n:>8} {mode:>8} {secs:9.2f} s {rows[-1]['per_chunk']:8.3f} s/chunk", flush=True)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "extrapolate_prefill.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

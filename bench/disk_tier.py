"""Decode latency with the host tier spilled to disk (CacheConfig.disk_dir) vs in memory.

Random weights in real shapes on the CPU and a synthetic context written straight into
the tiers (bench/common.py's `fill_context`, same seed for every mode, so every
mode decodes over the same keys and values). Modes:

  memory     no host budget: every host chunk in RAM
  disk_warm  host budget of `--resident` chunks per layer, the rest spilled to files under
             --disk-dir; their pages still sit in the OS page cache (the usual case right
             after spilling, or when the machine has RAM the budget keeps from kvloft)
  disk_cold  the same, but before every step the spilled pages are dropped from this
             process (madvise DONTNEED) and from the page cache (fsync, fadvise DONTNEED),
             so every selected row comes back from the device: the worst case

The three sessions step in turn (memory, warm, cold, memory, ...) so that load from other
processes on a shared machine hits every mode alike. Rows report median ms/token over the
timed steps, the retrieved-attention part (gather + attention over the selected host rows,
where reads of spilled rows happen), bytes read from storage per token (/proc/self/io) and
resident/disk bytes. The logits of every mode are checked equal to the memory mode's.

    python bench/disk_tier.py --preset smollm2-135m --context 4096 --budgets 128,1024
Prints a table and one JSON line last; writes JSON to $OUT or bench/results/.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fill_context

from kvloft import CacheConfig, RetrievalConfig, RuntimeConfig, Session, load_model
from kvloft.config import parse_tokens

MODES = ("memory", "disk_warm", "disk_cold")
MADV_DONTNEED = 4


def drop_spilled_pages(session: Session) -> None:
    """Evict every spilled chunk from this process and from the page cache (Linux)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for tiers in session.backend.cache.layers:
        for store in (tiers.host_k, tiers.host_v, tiers.host_pos):
            for chunk in store.chunks[: store.n_spilled]:
                nbytes = chunk.numel() * chunk.element_size()
                if libc.madvise(ctypes.c_void_p(chunk.data_ptr()), ctypes.c_size_t(nbytes), MADV_DONTNEED):
                    raise OSError(ctypes.get_errno(), "madvise failed")
    for path in session.backend.cache.spill_dir.path.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def storage_read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def make_session(model, mode: str, budget: int, args, disk_dir: str) -> tuple[Session, dict]:
    cfg = model.config
    rcfg = RetrievalConfig(method=args.method, budget=budget, n_sink=args.sink, n_window=args.window)
    row_bytes = 2 * cfg.n_kv_heads * cfg.head_dim * model.dtype.itemsize + 8
    host_budget = 0 if mode == "memory" else args.resident * args.chunk * row_bytes * cfg.n_layers
    s = Session(model, rcfg, RuntimeConfig(progress=False, host_memory_budget=host_budget),
                CacheConfig(host_chunk_tokens=args.chunk, disk_dir=None if mode == "memory" else disk_dir))
    torch.manual_seed(0)
    t0 = time.perf_counter()
    fill_context(s, args.context)
    row = {"mode": mode, "budget": budget, "context": args.context,
           "fill_s": round(time.perf_counter() - t0, 2), "host_budget_mib": round(host_budget / 2**20, 1)}
    return s, row


def step(session: Session, token: int, cold: bool) -> tuple[float, int, torch.Tensor]:
    """One timed decode step: ms, storage bytes read, the logits."""
    if cold:
        drop_spilled_pages(session)
    r0, t0 = storage_read_bytes(), time.perf_counter()
    logits = session.step(token).clone()
    return 1000 * (time.perf_counter() - t0), storage_read_bytes() - r0, logits


def run_budget(model, budget: int, args, disk_dir: str) -> list[dict]:
    made = [make_session(model, mode, budget, args, disk_dir) for mode in MODES]
    for s, _ in made:  # warm-up
        for i in range(2):
            s.step(i + 1)
        s.backend.timers.seconds.clear()
    ms = {m: [] for m in MODES}
    read = dict.fromkeys(MODES, 0)
    logits = {m: [] for m in MODES}
    for i in range(args.steps):
        for mode, (s, _) in zip(MODES, made):
            t, r, lg = step(s, i % 1000 + 3, cold=mode == "disk_cold")
            ms[mode].append(t)
            read[mode] += r
            logits[mode].append(lg)
    rows = []
    for mode, (s, row) in zip(MODES, made):
        st = s.stats()
        timer_ms = {k: round(1000 * v / args.steps, 2) for k, v in st["timings_s"].items()}
        row.update({
            "ms_per_token": round(statistics.median(ms[mode]), 2),
            "retrieved_attention_ms": timer_ms.get("retrieved_attention", 0.0),
            "search_ms": timer_ms.get("search", 0.0),
            "storage_read_mib_per_token": round(read[mode] / args.steps / 2**20, 2),
            "host_mib": round(st["bytes"]["host"] / 2**20, 1),
            "disk_mib": round(st["bytes"]["disk"] / 2**20, 1),
            "logits_equal_memory": all(torch.equal(a, b) for a, b in zip(logits[mode], logits["memory"])),
        })
        row["slowdown"] = round(row["ms_per_token"] / rows[0]["ms_per_token"], 3) if rows else 1.0
        rows.append(row)
        s.reset()  # removes the spill files
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--context", default="4096")
    ap.add_argument("--method", default="exact")
    ap.add_argument("--budgets", default="128,1024")
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=256, help="host chunk tokens")
    ap.add_argument("--resident", type=int, default=2, help="host chunks per layer kept in memory")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--disk-dir", default=None, help="default: a temporary directory under the current one")
    ap.add_argument("--machine", default=platform.processor() or platform.machine())
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.context = parse_tokens(args.context)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.preset, device="cpu", dtype="float32")
    disk_dir = args.disk_dir or tempfile.mkdtemp(prefix="kvloft-bench-", dir=".")
    rows = []
    for budget in [int(b) for b in args.budgets.split(",")]:
        for row in run_budget(model, budget, args, disk_dir):
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.disk_dir is None:
        os.rmdir(disk_dir)
    result = {"machine": args.machine, "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
              "preset": args.preset, "method": args.method, "host_chunk_tokens": args.chunk,
              "resident_chunks_per_layer": args.resident, "steps": args.steps, "rows": rows}
    print(f"\n{'mode':<10} {'budget':>6} {'ms/tok':>8} {'x':>6} {'retr ms':>8} {'read MiB/tok':>12} "
          f"{'host MiB':>9} {'disk MiB':>9}")
    for r in rows:
        print(f"{r['mode']:<10} {r['budget']:>6} {r['ms_per_token']:>8} {r['slowdown']:>6} "
              f"{r['retrieved_attention_ms']:>8} {r['storage_read_mib_per_token']:>12} {r['host_mib']:>9} "
              f"{r['disk_mib']:>9}")
    out = Path(args.out or os.environ.get("OUT", "bench/results")) / f"disk_tier_{args.preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

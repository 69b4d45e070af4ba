"""HiP's search for the rows of a batched decode step: each row alone against select_batch.

G HiP retrievers (one per session) over contexts of their own lengths, one layer searched
over --steps decode steps (a row arriving between steps; the steps walk through every phase
of the refresh cycle, as the layers of one step do). Per step and mode:

  ms         wall time of the G rows' search (per-row select() loop, or one select_batch)
  launches   device work the search would launch on CUDA: aten ops dispatched (a
             TorchDispatchMode count; views and aliases, which launch nothing, left out)
             plus the stage kernels, each counted as one launch
             (here they run as their torch twins, uncounted inside). On CUDA a launch costs
             the host ~5-10 us, so this count is the search's host time there.

The two modes alternate step by step on twin retrievers (identical state), and their ids
are checked equal every step. CPU by default: the torch search is what runs here; launch
counts are those of the Triton path (use_kernel on, kernels replaced by their twins).

    python bench/batch_search.py --rows 8 --contexts 32768,24576,16384 --steps 32
JSON to --out (default bench/results/) as batch_search-<tag>.json; one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kvloft.config import ModelConfig, RetrievalConfig
from kvloft.index.base import make_retriever
from kvloft.index.hip import HipRetriever
from kvloft.kernels import hip_stage as hip_stage_mod

_NO_LAUNCH = {torch.ops.aten.detach.default, torch.ops.aten.alias.default, torch.ops.aten.lift_fresh.default}


class _Count(TorchDispatchMode):
    """Counts aten ops dispatched while active (paused inside a kernel twin)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and not func.is_view and func not in _NO_LAUNCH:
            self.ops += 1  # views and aliases launch nothing
        return func(*args, **(kwargs or {}))


_CHUNKS: dict[int, torch.Tensor] = {}  # data_ptr -> store chunk, for the batched twin's address table


def _rows_of(chunks, ids: torch.Tensor) -> torch.Tensor:
    """Rows ids [P] of a store of equal chunks [R, H_kv, D] -> [P, H_kv, D]."""
    per = chunks[0].shape[0]
    out = torch.empty((ids.numel(), *chunks[0].shape[1:]), dtype=chunks[0].dtype)
    for ci, c in enumerate(chunks):
        m = (ids // per) == ci
        out[m] = c[ids[m] - ci * per]
    return out


def _search_chunks(chunks, cand: torch.Tensor, q: torch.Tensor, probe: str, bias=None):
    return hip_stage_mod.hierarchical_top1(cand, lambda ids: _rows_of(chunks, ids), q, probe, bias)


@contextmanager
def kernel_twins(counter: _Count):
    """The stage kernels replaced by torch twins that count one launch each (CPU: no Triton)."""
    from kvloft.index import hip_stages as hip_mod  # the stage scores call the kernels from there
    from kvloft.kernels import hip_batched as hb

    def one_launch(fn):
        def run(*args, **kw):
            counter.ops += 1
            counter.paused += 1
            try:
                return fn(*args, **kw)
            finally:
                counter.paused -= 1
        return run

    def batched(table, k0, q, meta, n_cols, chunk, cand=None, probe="first", bias=None):
        n_chunks, offs = meta[0].tolist(), meta[1].tolist() + [table.numel()]
        rep = torch.full((q.shape[0], n_cols), -1, dtype=torch.long)
        score = torch.full((q.shape[0], n_cols), float("-inf"))
        for g, m in enumerate(n_chunks):
            chunks = [_CHUNKS[a] for a in table[offs[g] : offs[g + 1]].tolist()]
            rows = torch.arange(m * chunk).view(m, chunk) if cand is None else cand[g, :m]
            rep[g, :m], score[g, :m] = _search_chunks(chunks, rows, q[g], probe, None if bias is None else bias[g])
        return rep, score

    def stage(chunks, cand, q, probe="first", table=None, bias=None):
        return _search_chunks(chunks, cand, q, probe, bias)

    saved = (hip_mod.hip_stage, hip_mod.hip_stage1, hb.hip_stage_batched)
    hip_mod.hip_stage = one_launch(stage)
    hip_mod.hip_stage1 = one_launch(hip_stage_mod.hip_stage1_reference)
    hb.hip_stage_batched = one_launch(batched)
    try:
        yield
    finally:
        hip_mod.hip_stage, hip_mod.hip_stage1, hb.hip_stage_batched = saved


def make_rows(cfg: ModelConfig, lengths: list[int], seed: int) -> list[HipRetriever]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        hip = make_retriever(RetrievalConfig(method="hip", options={"kernel": "torch"}), cfg, "cpu")
        hip.build(0, torch.randn(cfg.n_kv_heads, n, cfg.head_dim, generator=gen), None)
        out.append(hip)
    return out


def search(mode: str, rows: list[HipRetriever], q: torch.Tensor, budget: int):
    if mode == "row":
        return [h.select(0, q[g], budget) for g, h in enumerate(rows)]
    return HipRetriever.select_batch(rows, 0, q, [budget] * len(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama3-8b", help="model preset whose head shape the keys take")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--contexts", default="32768,24576,16384", help="host rows per session, cycled over the rows")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = ModelConfig.from_name(args.shape)
    ctx = [int(c) for c in args.contexts.split(",")]
    lengths = [ctx[g % len(ctx)] for g in range(args.rows)]
    twins = {"row": make_rows(cfg, lengths, 0), "batch": make_rows(cfg, lengths, 0)}
    gen = torch.Generator().manual_seed(1)
    ms = {"row": [], "batch": []}
    launches = {"row": [], "batch": []}
    for step in range(args.steps):
        q = torch.randn(args.rows, cfg.n_heads, cfg.head_dim, generator=gen)
        got = {}
        for mode, rows in twins.items():
            t0 = time.perf_counter()
            got[mode] = search(mode, rows, q, args.budget)
            ms[mode].append((time.perf_counter() - t0) * 1e3)
        assert all(torch.equal(a.ids, b.ids) for a, b in zip(got["row"], got["batch"], strict=True)), step
        new = torch.randn(cfg.n_kv_heads, 1, cfg.head_dim, generator=gen)
        for rows in twins.values():
            for h in rows:
                h.add(0, new, torch.arange(1))
    # launch counts of the Triton path: a second pass over fresh twins, kernels as counted twins
    twins = {"row": make_rows(cfg, lengths, 0), "batch": make_rows(cfg, lengths, 0)}
    for rows in twins.values():
        for h in rows:
            h.use_kernel = True
    gen = torch.Generator().manual_seed(1)
    for step in range(args.steps):
        q = torch.randn(args.rows, cfg.n_heads, cfg.head_dim, generator=gen)
        for mode, rows in twins.items():
            _CHUNKS.update({c.data_ptr(): c for h in rows for c in h._keys_of(0).chunks})
            counter = _Count()
            with kernel_twins(counter), counter:
                search(mode, rows, q, args.budget)
            launches[mode].append(counter.ops)
        new = torch.randn(cfg.n_kv_heads, 1, cfg.head_dim, generator=gen)
        for rows in twins.values():
            for h in rows:
                h.add(0, new, torch.arange(1))
    result = {"shape": args.shape, "rows": args.rows, "lengths": lengths, "budget": args.budget,
              "steps": args.steps, "threads": args.threads, "device": "cpu", "torch": torch.__version__}
    for mode in ("row", "batch"):
        result[mode] = {"ms_median": round(statistics.median(ms[mode]), 3), "ms_mean": round(statistics.mean(ms[mode]), 3),
                        "launches_mean": round(statistics.mean(launches[mode]), 1),
                        "launches_max": max(launches[mode])}
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"batch_search-{args.tag}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Decode speed and memory at 32K-1M tokens: kvloft under a GPU budget against dense attention.

Random weights in real model shapes (DESIGN.md allows it for speed) and a synthetic
context written straight into the tiers (bench/common.py's fill_context), then the
indexes are built and decode steps are timed through the whole model. Per row:

  ms_per_token     median over the timed steps (CUDA synchronized around each step only)
  tokens_per_s     1000 / ms_per_token
  ms_mean          mean over the timed steps: with the steps that refresh a retriever's cached
                   search (HiP) or move a batch of window tokens to the host tier (every
                   CacheConfig.evict_batch steps); time enough steps (--steps 64) to cover them
  breakdown_ms     a second pass that synchronizes around each region (RuntimeConfig.profile
                   semantics): search, static / retrieved attention (retrieved rows are read
                   zero-copy from pinned host memory inside the attention kernel, so that
                   region holds the transfers), index add, and "model" = the rest of the step
                   (projections, MLP, norms, sampling, Python)
  hit_rate         GPU row-cache hit rate (methods run with the scheduler, "name@overlap")
  peak_gpu_gib     torch.cuda.max_memory_allocated over the row; under_budget against --gpu-budget
  peak_host_gib    the process's resident memory after the timed steps (pinned tiers included)
  plan_host_gib    the memory plan's host bytes of the row's sessions (host tier, K/V in the
                   model dtype or --host-dtype's codes + scales, and a host index copy where one
                   is kept: scheduler/budget.py host_kv + host_index), what --host-memory is held to
  vs_dense         ms_per_token / dense ms_per_token at the same context (dense: every key on the
                   GPU, the split-K decode kernel over the whole KV; run wherever it fits the card)

Before running a row its memory plan (scheduler/budget.py) is checked: a method whose plan
exceeds the GPU budget, or whose host tier exceeds the machine's free memory, is reported
as not fitting with the plan's numbers, not run. Also measured: HBM copy bandwidth and the
floor weight_bytes / bandwidth (one read of the weights per token), and optionally real
prefill (--prefill: Session.feed of random ids, chunked and offloaded) in tokens/s.

Methods: a retriever name, optional ":key=value" retriever options, optional "@overlap" to
decode through the scheduler (GPU row cache), optional "@eager" to launch every kernel from
Python (no CUDA graphs for the dense parts of a step), e.g. `hip:keys_on=host`,
`exact@overlap`, `dense@eager`; "@staged" is "@overlap" with the row cache's misses fetched
through pinned staging buffers and H2D copies instead of the zero-copy gather kernel;
"@split" attends the static tier and the selection in two launches and merges them (the
path before runtime/rowspace.py), "@nocache" keeps no device copy of a selection's stable
rows (every selected row read from the host tier each step).

    python bench/decode.py --preset llama3-8b --contexts 32k,128k,512k,1m \
        --methods dense,exact,tokenselect,hip,hip:keys_on=host --time-limit 500
--batch B decodes B sessions of each row together through kvloft.Engine (one forward pass
per step, each session through its own tiers and retriever): ms_per_step is the median
step, ms_per_token the same (each session gets one token per step), tokens_per_s = B / step.
Sessions on the one-launch route (rows read in place from the pinned host tier) share one
attention launch per layer (runtime/batch_attention.py); "@rowlaunch" launches each
session's own instead, e.g. --methods hip,hip@rowlaunch --batch 8 compares the two. Sessions
whose retrievers search together (HiP: index/hip_batch.py) make one search per layer for the
batch (runtime/batch_search.py); "@rowsearch" searches each session alone, e.g.
--methods hip:keys_on=host,hip:keys_on=host@rowsearch --batch 8.

    python bench/decode.py --preset llama3-8b --contexts 32k --methods dense,hip --batch 8
"@wholegraph" decodes through kvloft.Engine(graphs="whole") (at any --batch, 1 included): a
batch whose rows' attention can take fixed shapes (dense) runs each step as ONE CUDA graph
replay, attention inside (runtime/whole_step.py); other methods fall back to the segmented
graphs and the row says why ("graph_route", "not_whole"). "@engine" runs --batch 1 through
the Engine too, with the segmented graphs: the comparison at batch 1, e.g.

    python bench/decode.py --preset llama3-8b --contexts 32k,128k --methods dense@engine,dense@wholegraph
JSON (rewritten after every row, so a stopped run keeps its rows) and a markdown table go to
$OUT or bench/results/ as decode-<tag>.json / .md.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_decode_args, fill_context, timed_steps, token_stream

from kvloft import CacheConfig, RetrievalConfig, RuntimeConfig, Session, load_model
from kvloft.config import parse_bytes, parse_tokens
from kvloft.eval.runner import parse_method as method_options
from kvloft.runtime.scheduled import ScheduledAttention, use_scheduler
from kvloft.scheduler.budget import plan_memory, resolve_cache_bytes
from kvloft.scheduler.params import SchedulerParams

GiB = 2**30
REGIONS = ("search", "retrieved_attention", "static_attention", "attention", "index_add")


def parse_method(spec: str) -> tuple[str, dict, set[str]]:
    """'hip:keys_on=host@overlap@eager' -> ('hip', {'keys_on': 'host'}, {'overlap', 'eager'})."""
    spec, *flags = spec.split("@")
    bad = set(flags) - {"overlap", "staged", "eager", "split", "nocache", "rowlaunch", "rowsearch", "wholegraph",
                        "engine"}
    if bad:
        raise SystemExit(f"method {spec}: unknown suffix @{bad.pop()} (@overlap: the scheduler; "
                         "@staged: the scheduler, fetching through pinned staging buffers and H2D "
                         "copies; @eager: no CUDA graphs; @split: static tier and selection in two "
                         "launches + merge; @nocache: no device copy of a selection's stable rows; "
                         "@rowlaunch: with --batch, one attention launch per session and layer; "
                         "@rowsearch: with --batch, one retriever search per session and layer; "
                         "@wholegraph: through Engine(graphs='whole'), the whole step one graph where the "
                         "rows allow; @engine: --batch 1 through the Engine, segmented graphs)")
    name, options, mode = method_options(spec)  # the "name:key=value" form kvloft eval reads
    if mode != "exact":
        raise SystemExit(f"method {spec}: +x (extrapolation) is not a decode-speed row here")
    return name, options, set(flags)


CUDA = torch.cuda.is_available()  # a script, not the library: checking at start is fine
DEVICE = "cuda" if CUDA else "cpu"  # CPU: a smoke run of the script itself (tiny preset)


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def peak_gpu() -> int:
    return torch.cuda.max_memory_allocated() if CUDA else 0


def reset_gpu() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        host_empty = getattr(torch._C, "_host_emptyCache", None)
        if host_empty is not None:  # pinned blocks cached by torch's host allocator go back to the OS
            host_empty()


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def host_available() -> int:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info.get("MemAvailable", 0)


def hbm_bandwidth(gib: float = 4.0) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted), median of 10."""
    n = int(gib * GiB) // 2
    a = torch.empty(n, dtype=torch.bfloat16, device=DEVICE)
    b = torch.empty_like(a)
    times = []
    for _ in range(11):
        sync()
        t0 = time.perf_counter()
        b.copy_(a)
        sync()
        times.append(time.perf_counter() - t0)
    del a, b
    return 2 * n * 2 / statistics.median(times[1:])


def row_plan(model, rcfg: RetrievalConfig, n: int, args, dense: bool):
    """The memory plan (scheduler/budget.py) of one session of the row, as new_session makes it."""
    runtime = RuntimeConfig(gpu_memory_budget=0 if dense else args.gpu_budget)
    return plan_memory(model.config, rcfg, runtime, n + 64, model.dtype, check=False,
                       cache_cfg=CacheConfig(host_chunk_tokens=args.decode_host_chunk or max(n, 1),
                                             host_dtype=args.host_dtype))


def fits(model, rcfg: RetrievalConfig, n: int, args, dense: bool) -> str | None:
    """Why this row cannot run (its plan's numbers), or None."""
    plan = row_plan(model, rcfg, n, args, dense)
    gpu_limit = args.device_bytes * 0.92 if dense else args.gpu_budget
    # the context is written into the tiers, not prefilled: the decode side of the plan
    b = args.batch  # sessions of the row: each holds its own tiers and index, the weights are shared
    need = plan.weights + b * (plan.static + plan.row_cache + plan.index + plan.decode_workspace)
    if dense:  # preallocated to n + 64 (preallocate_dense); the decode kernel needs no copy of the KV
        c = model.config
        need = plan.weights + b * (n + 64) * 2 * c.n_kv_heads * c.head_dim * 2 * c.n_layers + 2 * GiB
    if need > gpu_limit:
        what = "the card" if dense else "the GPU budget"
        return (f"decode plan needs {need / GiB:.1f} GiB on the GPU (weights {plan.weights / GiB:.1f}, "
                f"static/KV {plan.static / GiB:.1f}, index {plan.index / GiB:.1f}, workspace "
                f"{plan.decode_workspace / GiB:.1f}), over {what} ({gpu_limit / GiB:.1f} GiB)")
    host = b * (plan.host_kv + plan.host_index)
    if host > 0.9 * args.host_memory:
        return (f"{b} x (host tier {plan.host_kv / GiB:.1f} GiB + host index {plan.host_index / GiB:.1f} GiB) exceed "
                f"90% of this machine's memory ({args.host_memory / GiB:.0f} GiB)")
    return None


def preallocate_dense(s: Session, capacity: int) -> None:
    """Dense KV buffers of their final size: growing a 64 GiB buffer by doubling would need
    the old and the new one at once."""
    from kvloft.tiers.kvcache import DenseKV

    m = s.model
    s.backend.layers = [DenseKV(m.config, m.device, m.dtype, capacity=capacity) for _ in s.backend.layers]


def new_session(model, rcfg: RetrievalConfig, flags: set[str], n: int, args) -> Session:
    """A session of the row's method with n synthetic tokens written into its tiers."""
    s = Session(model, rcfg, RuntimeConfig(progress=False, cuda_graphs="eager" not in flags),
                CacheConfig(host_chunk_tokens=args.decode_host_chunk or max(n, 1), host_dtype=args.host_dtype))
    if hasattr(s.backend, "one_launch"):  # runtime/rowspace.py (TieredAttention)
        s.backend.one_launch = "split" not in flags
        s.backend.cache_selections = "nocache" not in flags
    if rcfg.method == "dense":
        # room for every token the row decodes (warmup, timed, breakdown, profiles): a
        # buffer that has to grow doubles, and at 512K that is 64 GiB more
        preallocate_dense(s, n + args.warmup + 2 * args.steps + args.profile + args.cprofile + 64)
    fill_context(s, n)
    return s


def run_row(model, spec: str, n: int, args) -> dict:
    name, options, flags = parse_method(spec)
    overlap, graphs = bool(flags & {"overlap", "staged"}), "eager" not in flags
    dense = name == "dense"
    rcfg = RetrievalConfig(method=name, budget=args.budget, n_sink=args.sink, n_window=args.window, options=options)
    row = {"method": spec, "context": n, "budget": n if dense else args.budget}
    plan = row_plan(model, rcfg, n, args, dense)
    row["plan_host_gib"] = round(args.batch * (plan.host_kv + plan.host_index) / GiB, 1)
    why = fits(model, rcfg, n, args, dense)
    if why:
        row["not_run"] = why
        return row
    if args.batch > 1 or flags & {"wholegraph", "engine"}:
        return run_batch_row(model, rcfg, flags, row, n, args)
    reset_gpu()
    s = None
    try:
        t0 = time.perf_counter()
        s = new_session(model, rcfg, flags, n, args)
        row["fill_s"] = round(time.perf_counter() - t0, 1)
        if overlap:
            rt = RuntimeConfig(gpu_memory_budget=args.gpu_budget, scheduler="overlap", cuda_graphs=graphs)
            cache = resolve_cache_bytes(model.config, rcfg, rt, SchedulerParams(), model.dtype, DEVICE,
                                        n_tokens=n + 64)
            use_scheduler(s, SchedulerParams(cache_bytes=cache, fetch="staged" if "staged" in flags else "auto"))
        timed_steps(s, token_stream(args.warmup))
        hits0 = _cache_totals(s.backend)
        ms = timed_steps(s, token_stream(args.steps, args.warmup))
        hits1 = _cache_totals(s.backend)
        row["ms_per_token"] = round(statistics.median(ms), 2)
        row["tokens_per_s"] = round(1000 / row["ms_per_token"], 1)
        row["ms_min_max"] = [round(min(ms), 2), round(max(ms), 2)]
        row["ms_mean"] = round(statistics.mean(ms), 2)  # with the steps that refresh or move rows down
        if overlap:
            seen = (hits1[0] - hits0[0]) + (hits1[1] - hits0[1])
            row["hit_rate"] = round((hits1[0] - hits0[0]) / seen, 3) if seen else 0.0
            row["row_cache_gib"] = round(s.backend.rows.nbytes / GiB, 2)
        row["peak_gpu_gib"] = round(peak_gpu() / GiB, 2)
        row["under_budget"] = dense or peak_gpu() <= args.gpu_budget
        row["peak_host_gib"] = round(rss_bytes() / GiB, 1)
        row["breakdown_ms"] = breakdown(s, args)
        spaces = getattr(s.backend, "_spaces", {})
        if spaces:  # one-launch decode: times the selection cache was filled (all layers)
            row["selection_fills"] = sum(sp.fills for sp in spaces.values())
        run = functools.partial(timed_steps, s)
        if args.profile:
            profile_steps(run, args.profile, f"{spec} at {n // 1024}K")
        if args.cprofile:
            cprofile_steps(run, args.cprofile, f"{spec} at {n // 1024}K")
        st = s.stats()
        if "retriever" in st:
            row["retriever"] = {k: v for k, v in st["retriever"].items() if not isinstance(v, (list, dict))}
    except (torch.OutOfMemoryError, RuntimeError, ValueError) as e:
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        traceback.print_exc()
    finally:
        if s is not None and isinstance(s.backend, ScheduledAttention):
            s.backend.close()
        del s
        reset_gpu()
    return row


def run_batch_row(model, rcfg: RetrievalConfig, flags: set[str], row: dict, n: int, args) -> dict:
    """args.batch sessions at context n decoded together through kvloft.Engine: one forward
    pass per step, each session through its own tiers and retriever. ms_per_step is the
    median step; every session gets a token per step, so ms_per_token (its latency) equals it
    and tokens_per_s = batch * 1000 / ms_per_step."""
    from kvloft import Engine

    row["batch"] = args.batch
    if flags & {"overlap", "staged"}:
        row["not_run"] = "--batch with @overlap/@staged: each session's row cache is sized for one session"
        return row
    reset_gpu()
    sessions: list[Session] = []
    try:
        t0 = time.perf_counter()
        sessions = [new_session(model, rcfg, flags, n, args) for _ in range(args.batch)]
        row["fill_s"] = round(time.perf_counter() - t0, 1)
        mode = "whole" if "wholegraph" in flags else "off" if "eager" in flags else "auto"
        engine = Engine(model, max_batch=args.batch, graphs=mode, shared_attention="rowlaunch" not in flags,
                        shared_search="rowsearch" not in flags)
        warm = args.warmup + (pattern_period(sessions[0]) if "wholegraph" in flags else 0)
        timed_batch_steps(engine, sessions, token_stream(warm))
        before = engine.whole_graphs()["captures"]
        ms = timed_batch_steps(engine, sessions, token_stream(args.steps, warm))
        # graphs of the whole step, one per HiP refresh pattern (runtime/whole_graphs.py); captures
        # inside the timed steps would be in ms (warm covers one period of the refresh schedule)
        row["whole_graphs"] = engine.whole_graphs() | {"captured_while_timed": engine.whole_graphs()["captures"] - before}
        row["ms_per_step"] = row["ms_per_token"] = round(statistics.median(ms), 2)
        row["tokens_per_s"] = round(args.batch * 1000 / row["ms_per_step"], 1)
        row["ms_min_max"] = [round(min(ms), 2), round(max(ms), 2)]
        row["ms_mean"] = round(statistics.mean(ms), 2)
        row["peak_gpu_gib"] = round(peak_gpu() / GiB, 2)
        row["under_budget"] = rcfg.method == "dense" or peak_gpu() <= args.gpu_budget
        row["peak_host_gib"] = round(rss_bytes() / GiB, 1)
        run = functools.partial(timed_batch_steps, engine, sessions)
        title = f"{row['method']} x{args.batch} at {n // 1024}K"
        if args.profile:
            profile_steps(run, args.profile, title)
        if args.cprofile:
            cprofile_steps(run, args.cprofile, title)
        row["graph_route"] = dict(engine.route_counts)  # steps run as one whole graph / segments / eagerly
        if engine.last_route_why:
            row["not_whole"] = engine.last_route_why
        if getattr(engine, "last_read_why", None):  # a whole step's HiP row read all its selection in place
            row["read_in_place"] = engine.last_read_why
        wholes = list(getattr(engine, "_wholes", {}).values())
        if wholes:  # the whole steps' tables, masks and stable buffers (one set per bucket and width: once)
            stables = [b for w in wholes for b in (w.stable_buffers, w.z_buffers) if b is not None]
            total = sum(w.buffer_bytes for w in wholes) - sum(s.nbytes for s in stables) \
                + sum({id(s): s.nbytes for s in stables}.values())
            row["whole_buffers_mib"] = round(total / 2**20, 1)
    except (torch.OutOfMemoryError, RuntimeError, ValueError) as e:
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        traceback.print_exc()
    finally:
        del sessions
        reset_gpu()
    return row


def pattern_period(s: Session) -> int:
    """Steps in which a HiP row's staggered refresh schedule runs through every pattern (the lcm
    of its refresh_steps, as many whole-step graphs), 0 for other rows."""
    params = getattr(s.backend.retriever, "params", None) if hasattr(s.backend, "retriever") else None
    steps = getattr(params, "refresh_steps", None)
    return math.lcm(*steps) if steps else 0


def timed_batch_steps(engine, sessions: list[Session], tokens: list[int]) -> list[float]:
    """ms of each batched step (every session appends the step's token; device synchronized
    around each step only)."""
    out = []
    for t in tokens:
        sync()
        t0 = time.perf_counter()
        engine.step([(s, t) for s in sessions])
        sync()
        out.append(1000 * (time.perf_counter() - t0))
    return out


def _cache_totals(backend) -> tuple[int, int]:
    if not isinstance(backend, ScheduledAttention):
        return 0, 0
    t = backend.rows.totals()
    return t.hits, t.misses


def profile_steps(run, steps: int, title: str) -> None:
    """Print the ops that take a step's time (torch profiler, self time, top 25) to stderr."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    with profile(activities=acts) as prof:
        run(token_stream(steps, 200))
    for key in ["self_cpu_time_total"] + (["self_cuda_time_total"] if CUDA else []):
        print(f"\n== profile of {steps} steps, {title}, by {key}", file=sys.stderr)
        print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60), file=sys.stderr)


def cprofile_steps(run, steps: int, title: str) -> None:
    """Print where the host's time per step goes (cProfile, Python functions, top 40 by own
    time and by cumulative time) to stderr: decode at long context is bound by the host
    issuing work when the GPU is idle between launches."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    run(token_stream(steps, 300))
    prof.disable()
    for key in ("tottime", "cumulative"):
        print(f"\n== cProfile of {steps} steps, {title}, by {key}", file=sys.stderr)
        pstats.Stats(prof, stream=sys.stderr).sort_stats(key).print_stats(40)


def breakdown(s: Session, args) -> dict[str, float]:
    """ms per token by region from a synchronized pass; 'model' is the rest of the step."""
    timers = s.backend.timers
    timers.sync = CUDA
    timers.seconds.clear()
    t0 = time.perf_counter()
    timed_steps(s, token_stream(args.steps, 500))
    total = 1000 * (time.perf_counter() - t0) / args.steps
    timers.sync = False
    out = {k: round(1000 * v / args.steps, 2) for k, v in timers.seconds.items()}
    out["model"] = round(total - sum(out.values()), 2)
    out["step_synced"] = round(total, 2)
    return out


def prefill_row(model, spec: str, n: int, args) -> dict:
    """Real prefill of n random ids through the model (chunked; KV streamed to the host tier)."""
    name, options, _ = parse_method(spec)
    rcfg = RetrievalConfig(method=name, budget=args.budget, n_sink=args.sink, n_window=args.window, options=options)
    row = {"method": spec, "context": n, "prefill": True, "prefill_chunk": args.prefill_chunk}
    reset_gpu()
    s = None
    try:
        chunk = None if args.prefill_chunk == "auto" else int(args.prefill_chunk)  # auto: the plan's choice
        s = Session(model, rcfg, RuntimeConfig(progress=False, prefill_chunk=chunk, gpu_memory_budget=args.gpu_budget),
                    CacheConfig(host_chunk_tokens=args.host_chunk))
        ids = torch.randint(1, model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(0))
        sync()
        t0 = time.perf_counter()
        s.feed(ids)
        sync()
        secs = time.perf_counter() - t0
        row["prefill_s"] = round(secs, 1)
        row["prefill_tokens_per_s"] = round(n / secs)
        row["prefill_chunk"] = s.prefill_chunk
        row["peak_gpu_gib"] = round(peak_gpu() / GiB, 2)
        row["under_budget"] = peak_gpu() <= args.gpu_budget
        st = s.stats()
        for k in ("prefill", "sparse_prefill_chunks"):
            if k in st:
                row[k] = st[k]
    except (torch.OutOfMemoryError, RuntimeError, ValueError) as e:
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        del s
        reset_gpu()
    return row


def add_ratios(rows: list[dict]) -> None:
    dense = {(r["preset"], r["context"]): r["ms_per_token"] for r in rows
             if r["method"] == "dense" and "ms_per_token" in r}
    for r in rows:
        d = dense.get((r.get("preset"), r["context"]))
        if d and "ms_per_token" in r and r["method"] != "dense":
            r["vs_dense"] = round(r["ms_per_token"] / d, 2)


def markdown(result: dict) -> str:
    lines = [(f"Machine: {result['device']}, torch {result['torch']}; HBM copy {result['hbm_gb_s']} GB/s; "
              f"GPU budget {result['gpu_budget_gib']} GiB; budget {result['budget']} retrieved + "
              f"{result['sink']} sink + {result['window']} window tokens per step; median of {result['steps']} steps."),
             "", ("| preset | context | method | ms/token | tok/s | vs dense | floor ms | peak GPU GiB | <= budget "
                  "| host GiB | hit rate | search | transfer | retrieved | static | model |"),
             "|---|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if r.get("prefill"):
            continue
        ctx = f"{r['context'] // 1024}K"
        if "ms_per_token" not in r:
            lines.append(f"| {r['preset']} | {ctx} | {r['method']} | {r.get('not_run') or r.get('error')} |"
                         + " |" * 12)
            continue
        b = r.get("breakdown_ms", {})
        att = b.get("retrieved_attention", b.get("attention", "-"))
        method = f"{r['method']} x{r['batch']}" if r.get("batch", 1) > 1 else r["method"]
        lines.append(
            f"| {r['preset']} | {ctx} | {method} | {r['ms_per_token']} | {r['tokens_per_s']} | "
            f"{r.get('vs_dense', '-')} | {r['floor_ms']} | {r['peak_gpu_gib']} | "
            f"{'yes' if r['under_budget'] else '**no**'} | {r['peak_host_gib']} | {r.get('hit_rate', '-')} | "
            f"{b.get('search', '-')} | {b.get('transfer', '-')} | {att} | {b.get('static_attention', '-')} | {b.get('model', '-')} |")
    pre = [r for r in result["rows"] if r.get("prefill")]
    if pre:
        lines += ["", "| preset | prompt | method | prefill s | tokens/s | peak GPU GiB | <= budget |",
                  "|---|---:|---|---:|---:|---:|---|"]
        for r in pre:
            if "prefill_s" not in r:
                lines.append(f"| {r['preset']} | {r['context'] // 1024}K | {r['method']} | {r.get('error')} | | | |")
                continue
            lines.append(f"| {r['preset']} | {r['context'] // 1024}K | {r['method']} | {r['prefill_s']} | "
                         f"{r['prefill_tokens_per_s']} | {r['peak_gpu_gib']} | "
                         f"{'yes' if r['under_budget'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def quant_backends(model) -> str:
    """How the quantized linears run ("tinygemm", "triton", "reference"; "dense" for bf16 weights)."""
    from kvloft.runtime.quant_linear import QuantLinear

    return "+".join(sorted({m.backend for m in model.net.modules() if isinstance(m, QuantLinear)})) or "dense"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="llama3-8b")
    ap.add_argument("--contexts", default="32k,128k")
    ap.add_argument("--methods", default="dense,exact,tokenselect,hip")
    add_decode_args(ap)
    ap.add_argument("--prefill", default="", help="contexts for real prefill rows, e.g. 32k,128k")
    ap.add_argument("--prefill-method", default="hip")
    ap.add_argument("--prefill-chunk", default="4096", help="tokens per prefill chunk, or auto (the memory plan's)")
    ap.add_argument("--host-chunk", type=int, default=65536, help="host chunk tokens of the prefill rows")
    ap.add_argument("--decode-host-chunk", type=int, default=0,
                    help="host chunk tokens of the decode rows (0 = the whole context in one chunk; "
                         "4096 = the library's default, a tier of many chunks)")
    ap.add_argument("--host-memory", default=None,
                    help="host memory to plan with (default MemAvailable; VMs whose memory grows on use "
                         "report less at start, e.g. pass 240GiB)")
    ap.add_argument("--time-limit", type=float, default=0, help="seconds; rows not started by then are skipped")
    ap.add_argument("--profile", type=int, default=0, help="steps to run under the torch profiler per row "
                    "(top ops printed to stderr)")
    ap.add_argument("--cprofile", type=int, default=0, help="steps to run under cProfile per row "
                    "(host time by Python function, printed to stderr)")
    ap.add_argument("--batch", type=int, default=1, help="sessions decoded together through kvloft.Engine "
                    "(one forward pass per step; ms_per_step, tokens_per_s = batch / step time)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default; on a busy "
                    "small CPU, 1 keeps few-row GEMMs from thrashing threads)")
    ap.add_argument("--weights", default="bf16", choices=["bf16", "int4", "int8"],
                    help="linear weights (load_model(weights=...)); int4 on CUDA runs PyTorch's tinygemm kernel")
    ap.add_argument("--host-dtype", default=None, choices=["int8", "fp8"],
                    help="8-bit host tier (CacheConfig.host_dtype); default: the model dtype")
    ap.add_argument("--gpu-route", default="auto", choices=["auto", "off"],
                    help="the GPU few-row layer route (kernels/gpu_layer.py): as declared at load, or off (the modules)")
    ap.add_argument("--tag", default="h200")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.batch < 1:
        raise SystemExit(f"--batch must be >= 1, got {args.batch}")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.gpu_budget = parse_bytes(args.gpu_budget)
    args.host_memory = parse_bytes(args.host_memory) if args.host_memory else host_available()
    args.device_bytes = torch.cuda.get_device_properties(0).total_memory if CUDA else host_available()
    t_start = time.perf_counter()
    out_dir = Path(args.out or os.environ.get("OUT", "bench/results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    bw = hbm_bandwidth(4.0 if CUDA else 0.25)
    result = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "torch": torch.__version__, "hbm_gb_s": round(bw / 1e9),
              "gpu_budget_gib": args.gpu_budget / GiB, "budget": args.budget, "sink": args.sink,
              "window": args.window, "steps": args.steps, "batch": args.batch,
              "host_memory_gib": round(args.host_memory / GiB),
              "rows": []}

    def emit(row: dict) -> None:
        result["rows"].append(row)
        add_ratios(result["rows"])
        (out_dir / f"decode-{args.tag}.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(row), flush=True)

    for preset in args.presets.split(","):
        model = load_model(preset, device=DEVICE, dtype="bfloat16" if CUDA else "float32", weights=args.weights)
        if args.gpu_route == "off":
            model.net.declare_kernels(model.net.compiled_cpu, model.net.split_cpu, fused_gpu=False)
        linears = quant_backends(model)
        floor = round(1000 * model.weight_bytes / bw, 2)
        for n in [parse_tokens(c) for c in args.contexts.split(",")]:
            for spec in args.methods.split(","):
                if args.time_limit and time.perf_counter() - t_start > args.time_limit:
                    emit({"preset": preset, "method": spec, "context": n, "not_run": "time limit of the run"})
                    continue
                row = run_row(model, spec, n, args)
                row.update(preset=preset, weights=args.weights, host_dtype=args.host_dtype, linears=linears,
                           gpu_route=any(b.gpu is not None for b in model.net.layers),
                           weights_gib=round(model.weight_bytes / GiB, 2), floor_ms=floor)
                emit(row)
        for n in [parse_tokens(c) for c in args.prefill.split(",") if c]:
            if args.time_limit and time.perf_counter() - t_start > args.time_limit:
                continue
            row = prefill_row(model, args.prefill_method, n, args)
            row.update(preset=preset)
            emit(row)
        del model
        reset_gpu()
    md = markdown(result)
    (out_dir / f"decode-{args.tag}.md").write_text(md)
    print("\n" + md)


if __name__ == "__main__":
    main()

"""Check and time kvloft's Triton kernels on a GPU (one script, JSON out).

1. checks every kernel against an fp64 oracle and the same-precision torch baseline
   (flash-attention rule: kernel error <= 2x torch error + 1e-3), bf16 and fp16, head dims
   64/80/96/128, GQA shapes of Llama-3-8B (32/8) and Qwen2.5-7B (28/4);
2. measures the copy bandwidths (HBM device-to-device, pinned host-to-device);
3. with --sweep, sweeps the gather kernel's launch parameters and times the best too;
4. times, on Llama-3-8B's layer shape (8 KV heads, D=128, bf16, 1M-token row buffer),
   fused-gather decode at n selected rows vs the naive path (reference gather_kv + SDPA),
   contiguous decode at 128K vs SDPA, score_topk vs matmul + topk, B sequences' slot-table
   attention in one launch vs one launch each (a batched decode step's layer), and the zero-copy
   pinned-host gather vs CPU gather + copy. Two clocks (see Timer): GPU time from CUDA-graph
   replay (the figure held against bandwidth) and eager do_bench medians (L2 flushed);
5. prints a table last and writes $OUT/gpu_kernels.json (default bench/results/;
   gpu_kernels_smoke.json for --smoke, so a smoke run never overwrites GPU figures).

    PYTHONPATH=. python3 bench/gpu_kernels.py --sweep    # on the GPU machine
    PYTHONPATH=. python3 bench/gpu_kernels.py --smoke    # tiny shapes; CPU via the interpreter
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

GB = 1e9


@dataclass
class Workload:
    """Sizes of one benchmark run (named presets below)."""

    n_buffer: int = 1 << 20  # tokens in the row buffer the ids point into
    rows: tuple[int, ...] = (1024, 4096, 8192, 32768, 131072)
    decode_len: int = 131072
    score_keys: tuple[int, ...] = (131072, 1 << 20)
    score_topk: int = 2048
    host_buffer: int = 1 << 18  # tokens of the pinned-host buffer
    host_rows: tuple[int, ...] = (1024, 4096, 32768)
    check_rows: int = 6000
    check_dims: tuple[int, ...] = (64, 80, 96, 128)
    copy_bytes: int = 2 << 30
    sweep_rows: tuple[int, ...] = (4096, 32768, 131072)
    hq: int = 32
    hkv: int = 8
    d: int = 128
    batches: tuple[int, ...] = (1, 4, 8, 32)  # sequences of a batched decode step (section "batch")
    batch_rows: int = 2048 + 640  # keys per sequence there: a budget + sink and window
    slot_rows: int = 256  # rows per slot of the sequences' tables


WORKLOADS = {
    "h200": Workload(),
    "smoke": Workload(
        n_buffer=2048,
        rows=(64, 300),
        decode_len=500,
        score_keys=(700,),
        score_topk=16,
        host_buffer=512,
        host_rows=(64,),
        check_rows=200,
        check_dims=(16, 40),
        copy_bytes=1 << 20,
        sweep_rows=(),
        hq=8,
        hkv=2,
        d=32,
        batches=(1, 3),
        batch_rows=200,
        slot_rows=32,
    ),
}
CHECK_SHAPES = ((32, 8), (28, 4))  # Llama-3-8B, Qwen2.5-7B
SMOKE_CHECK_SHAPES = ((9, 3),)


@dataclass
class Report:
    machine: dict = field(default_factory=dict)
    bandwidth: dict = field(default_factory=dict)
    checks: list = field(default_factory=list)
    timings: list = field(default_factory=list)
    sweep: list = field(default_factory=list)
    notes: list = field(default_factory=list)


# ---------------------------------------------------------------- timing helpers


class Timer:
    """Two clocks, both medians, in ms per call.

    eager: triton.testing.do_bench, L2 flushed before each call; includes the Python launch
           cost whenever that exceeds the GPU time (small calls).
    graph: GPU time only: a CUDA graph of calls cycling through `fns` (distinct inputs, so
           rows read by one call are not L2 hits for the next) is replayed and timed.
    On the CPU (smoke runs) both are wall-clock medians.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def eager(self, fn) -> float:
        if self.cuda:
            from triton.testing import do_bench

            return do_bench(fn, warmup=10, rep=40, return_mode="median")
        fn()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    def graph(self, fns, target_ms: float = 8.0, max_calls: int = 512) -> float:
        if not self.cuda:
            return self.eager(fns[0])
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (compile, workspaces) off the capture
            for f in fns:
                f()
        torch.cuda.synchronize()
        est = self._per_call_ms(fns)
        calls = len(fns) * max(1, min(max_calls // len(fns), math.ceil(target_ms / est / len(fns))))
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(calls):
                fns[i % len(fns)]()
        g.replay()
        times = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            g.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / calls)
        del g
        return statistics.median(times)

    @staticmethod
    def _per_call_ms(fns) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for f in fns:
            f()
        end.record()
        torch.cuda.synchronize()
        return max(start.elapsed_time(end) / len(fns), 1e-3)


def n_variants(nbytes: int, device) -> int:
    """Distinct inputs per graph so that their rows together exceed L2 three times over."""
    l2 = (
        getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
        if device.type == "cuda"
        else 0
    )
    return max(1, min(32, math.ceil(3 * l2 / max(nbytes, 1))))


def copy_bandwidth(report: Report, wl: Workload, device, timer: Timer) -> None:
    n = wl.copy_bytes
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timer.eager(partial(dst.copy_, src))
    report.bandwidth["hbm_copy_gbs"] = 2 * n / (ms * 1e-3) / GB  # read + write
    if device.type == "cuda":
        host = torch.empty(n // 2, dtype=torch.uint8).pin_memory()
        dev = torch.empty(n // 2, dtype=torch.uint8, device=device)
        ms = timer.eager(partial(dev.copy_, host, non_blocking=True))
        report.bandwidth["h2d_pinned_gbs"] = (n // 2) / (ms * 1e-3) / GB
        del host, dev


# ---------------------------------------------------------------- checks


def oracle_attend(q, k, v, ids, scale):
    """fp64 attention over rows ids ([H_kv, n] / [n], -1 ignored) of k, v [N, H_kv, D]."""
    from kvloft.kernels import reference

    hq, hkv = q.shape[0], k.shape[1]
    ids = ids.long() if ids.dim() == 2 else ids.long()[None].expand(hkv, -1)
    g = hq // hkv
    kk = reference.gather_kv(k, ids).double().transpose(0, 1).repeat_interleave(g, 0)  # [H_q, n, D]
    vv = reference.gather_kv(v, ids).double().transpose(0, 1).repeat_interleave(g, 0)
    logits = torch.einsum("hd,hnd->hn", q.double(), kk) * scale
    logits = logits.masked_fill((ids < 0).repeat_interleave(g, 0), -math.inf)
    lse = torch.logsumexp(logits, -1)
    return torch.einsum("hn,hnd->hd", torch.exp(logits - lse[:, None]), vv), lse


def lowp_attend(q, k, v, ids, scale):
    """The same attention computed with torch ops in q's dtype (the same-precision baseline)."""
    from kvloft.kernels import reference

    hq, hkv = q.shape[0], k.shape[1]
    ids = ids.long() if ids.dim() == 2 else ids.long()[None].expand(hkv, -1)
    g = hq // hkv
    kk = reference.gather_kv(k, ids).transpose(0, 1).repeat_interleave(g, 0)
    vv = reference.gather_kv(v, ids).transpose(0, 1).repeat_interleave(g, 0)
    logits = (torch.einsum("hd,hnd->hn", q, kk) * scale).masked_fill(
        (ids < 0).repeat_interleave(g, 0), -math.inf
    )
    return torch.einsum("hn,hnd->hd", torch.softmax(logits, -1), vv), torch.logsumexp(logits, -1)


def rule(got, base, exact, floor=1e-3) -> dict:
    """Flash-attention tolerance: error vs fp64 at most 2x the torch baseline's, + floor."""
    err = (got.double() - exact.double()).abs().max().item()
    base_err = (base.double() - exact.double()).abs().max().item()
    return {"err": err, "torch_err": base_err, "ok": err <= 2 * base_err + floor}


def check_attention(report, dtype, d, hq, hkv, n_rows, device) -> None:
    from kvloft.kernels.sparse_decode import decode_attend, gather_attend

    q = torch.randn(hq, d, dtype=dtype, device=device)
    k = torch.randn(n_rows, hkv, d, dtype=dtype, device=device)
    v = torch.randn(n_rows, hkv, d, dtype=dtype, device=device)
    scale = d**-0.5
    per_head = torch.stack([torch.randperm(n_rows, device=device)[: n_rows // 2] for _ in range(hkv)])
    per_head[:, -7:] = -1
    cases = {
        "gather_attend/per_head": (
            per_head,
            lambda: gather_attend(q, k, v, per_head, scale=scale, check_ids=True),
        ),
        "gather_attend/shared": (
            per_head[0, :-7],
            lambda: gather_attend(q, k, v, per_head[0, :-7], scale=scale),
        ),
        "decode_attend": (torch.arange(n_rows, device=device), lambda: decode_attend(q, k, v, scale=scale)),
    }
    for op, (ids, run) in cases.items():
        out, lse = run()
        ex_out, ex_lse = oracle_attend(q, k, v, ids, scale)
        base_out, base_lse = lowp_attend(q, k, v, ids, scale)
        for what, got, base, ex in (("out", out, base_out, ex_out), ("lse", lse, base_lse, ex_lse)):
            report.checks.append({"op": op, "value": what, "dtype": str(dtype)[6:], "d": d, "hq": hq, "hkv": hkv,
                                  **rule(got, base, ex)})  # fmt: skip


def check_merge(report, dtype, d, hq, device) -> None:
    from kvloft.kernels.merge import merge

    outs = [torch.randn(hq, d, dtype=dtype, device=device) for _ in range(3)]
    lses = [3 * torch.randn(hq, device=device) for _ in range(3)]
    outs[1].zero_()
    lses[1].fill_(-math.inf)
    out, lse = merge(outs, lses)
    w = torch.softmax(torch.stack(lses).double(), 0)
    ex = sum(wi[:, None] * o.double() for wi, o in zip(w, outs))
    base = sum(wi[:, None] * o for wi, o in zip(w.to(dtype), outs))
    ex_lse = torch.logsumexp(torch.stack(lses).double(), 0)
    for what, got, b, e in (
        ("out", out, base, ex),
        ("lse", lse, torch.logsumexp(torch.stack(lses), 0), ex_lse),
    ):
        report.checks.append({"op": "merge", "value": what, "dtype": str(dtype)[6:], "d": d, "hq": hq, "hkv": 0,
                              **rule(got, b, e)})  # fmt: skip


def check_scoring(report, dtype, d, hq, hkv, n_rows, device) -> None:
    from kvloft.kernels import reference
    from kvloft.kernels.scoring import score, score_topk

    q = torch.randn(hq, d, dtype=dtype, device=device)
    k = torch.randn(n_rows, hkv, d, dtype=dtype, device=device)
    cand = torch.randperm(n_rows, device=device)[: n_rows // 2]
    for reduce in ("none", "max"):
        for ids in (None, cand):
            s = score(q, k, reduce=reduce, scale=d**-0.5, ids=ids)
            keys = k if ids is None else k[ids]
            ex = (
                torch.einsum("hd,mhd->hm", q.double(), keys.double().repeat_interleave(hq // hkv, 1))
                * d**-0.5
            )
            base = torch.einsum("hd,mhd->hm", q, keys.repeat_interleave(hq // hkv, 1)) * d**-0.5
            if reduce != "none":
                ex, base = reference.reduce_group(ex, hkv, reduce), reference.reduce_group(base, hkv, reduce)
            _, top = score_topk(q, k, 64, reduce=reduce, scale=d**-0.5, ids=ids)
            _, ref_top = reference.score_topk(q, k, 64, reduce=reduce, scale=d**-0.5, ids=ids)
            recall = (
                sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top, ref_top)) / ref_top.numel()
            )
            report.checks.append({"op": f"score_topk/{reduce}/{'ids' if ids is not None else 'all'}", "value": "scores",
                                  "dtype": str(dtype)[6:], "d": d, "hq": hq, "hkv": hkv, "topk_recall": recall,
                                  **rule(s, base, ex)})  # fmt: skip


def run_checks(report: Report, wl: Workload, device, smoke: bool) -> None:
    shapes = SMOKE_CHECK_SHAPES if smoke else CHECK_SHAPES
    dtypes = (torch.float32,) if device.type == "cpu" else (torch.bfloat16, torch.float16)
    for dtype in dtypes:
        for d in wl.check_dims:
            for hq, hkv in shapes:
                torch.manual_seed(d * 131 + hq)
                check_attention(report, dtype, d, hq, hkv, wl.check_rows, device)
                check_scoring(report, dtype, d, hq, hkv, wl.check_rows, device)
            check_merge(report, dtype, d, shapes[0][0], device)


# ---------------------------------------------------------------- timings


def naive_gather_sdpa(q, k_rows, v_rows, ids, scale):
    """reference.gather_kv of K and V, then torch SDPA (one decode token, GQA)."""
    from kvloft.kernels import reference

    k = reference.gather_kv(k_rows, ids).transpose(0, 1)[None]  # [1, H_kv, n, D]
    v = reference.gather_kv(v_rows, ids).transpose(0, 1)[None]
    return sdpa(q, k, v, scale)


def sdpa(q, k, v, scale):
    """q [H_q, D]; k, v [1, H_kv, n, D] -> [1, H_q, 1, D]."""
    qq = q[None, :, None, :]
    try:
        return F.scaled_dot_product_attention(qq, k, v, scale=scale, enable_gqa=True)
    except TypeError:  # torch < 2.5: no enable_gqa
        g = q.shape[0] // k.shape[1]
        return F.scaled_dot_product_attention(
            qq, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), scale=scale
        )


def row_bytes(wl: Workload, n_rows: int, itemsize: int) -> int:
    return n_rows * wl.hkv * wl.d * itemsize * 2  # K and V


def measure(timer: Timer, fns) -> dict:
    return {"eager_ms": timer.eager(fns[0]), "graph_ms": timer.graph(fns)}


def add_row(report, name, n, nbytes, peak, kern, naive=None, against="hbm_copy", **extra) -> None:
    """One timed op; GB/s and % of the measured copy bandwidth (`against`) from GPU time."""
    gbs = nbytes / (kern["graph_ms"] * 1e-3) / GB
    row = {"name": name, "n": n, "bytes": nbytes, **kern, "gbs": gbs, "pct_peak": 100 * gbs / peak,
           "gbs_eager": nbytes / (kern["eager_ms"] * 1e-3) / GB, "against": against, **extra}  # fmt: skip
    if naive:
        row.update({f"naive_{k}": v for k, v in naive.items()})
        row.update(
            speedup=naive["graph_ms"] / kern["graph_ms"], speedup_eager=naive["eager_ms"] / kern["eager_ms"]
        )
    report.timings.append(row)
    sp = f"  naive x{row['speedup']:.2f} (eager x{row['speedup_eager']:.2f})" if naive else ""
    print(f"  {name:<32} n={n:<8} gpu {kern['graph_ms'] * 1e3:8.1f} us {gbs:7.0f} GB/s {row['pct_peak']:5.1f}%"
          f"  eager {kern['eager_ms'] * 1e3:8.1f} us{sp}", flush=True)  # fmt: skip


def random_ids(wl, n, per_head, device):
    if per_head:
        return torch.stack([torch.randperm(wl.n_buffer, device=device)[:n] for _ in range(wl.hkv)])
    return torch.randperm(wl.n_buffer, device=device)[:n]


def time_gather(report, wl, device, timer, kv, q, peak, launches) -> None:
    from kvloft.kernels.sparse_decode import gather_attend

    scale = wl.d**-0.5
    for n in wl.rows:
        nbytes = row_bytes(wl, n, kv[0].element_size())
        for label in ("shared", "per_head"):
            sets = [random_ids(wl, n, label == "per_head", device) for _ in range(n_variants(nbytes, device))]
            nbytes_ids = nbytes + sets[0].numel() * sets[0].element_size()
            naive = measure(timer, [partial(naive_gather_sdpa, q, *kv, ids, scale) for ids in sets])
            extra = {}
            if label == "shared":
                extra["index_select_sdpa"] = measure(
                    timer, [partial(index_select_sdpa, q, *kv, ids, scale) for ids in sets]
                )
            for lname, launch in launches.items():
                fns = [
                    partial(gather_attend, q, *kv, ids, scale=scale, check_ids=False, launch=launch)
                    for ids in sets
                ]
                name = f"gather_attend/{label}" + ("" if lname == "default" else f"@{lname}")
                add_row(
                    report,
                    name,
                    n,
                    nbytes_ids,
                    peak,
                    measure(timer, fns),
                    naive,
                    launch=asdict(launch),
                    **extra,
                )


def index_select_sdpa(q, k_rows, v_rows, ids, scale):
    """The strongest plain-torch path for shared ids: index_select whole rows, then SDPA."""
    k = k_rows.index_select(0, ids).transpose(0, 1)[None]
    v = v_rows.index_select(0, ids).transpose(0, 1)[None]
    return sdpa(q, k, v, scale)


def time_decode(report, wl, device, timer, kv, q, peak, launches) -> None:
    from kvloft.kernels.sparse_decode import decode_attend

    k, v = kv[0][: wl.decode_len], kv[1][: wl.decode_len]
    scale = wl.d**-0.5
    naive = measure(timer, [lambda: sdpa(q, k.transpose(0, 1)[None], v.transpose(0, 1)[None], scale)])
    for lname, launch in launches.items():
        kern = measure(timer, [partial(decode_attend, q, k, v, scale=scale, launch=launch)])
        name = "decode_attend/contiguous" + ("" if lname == "default" else f"@{lname}")
        add_row(
            report, name, wl.decode_len, row_bytes(wl, wl.decode_len, k.element_size()), peak, kern, naive
        )


def torch_score_topk(q, k, topk, hkv):
    """Baseline: batched matmul per KV head, max over the group, topk."""
    qg = q.view(hkv, -1, q.shape[-1])  # [H_kv, G, D]
    s = torch.matmul(k.transpose(0, 1), qg.transpose(1, 2))  # [H_kv, N, G]
    return torch.topk(s.amax(-1).float(), topk, dim=-1)


def time_scoring(report, wl, device, timer, kv, q, peak, launches) -> None:
    from kvloft.kernels.scoring import score, score_topk

    for n in wl.score_keys:
        k = kv[0][:n]
        nbytes = n * wl.hkv * wl.d * k.element_size()
        only = measure(timer, [partial(score, q, k, reduce="max")])
        kern = measure(timer, [partial(score_topk, q, k, wl.score_topk, reduce="max")])
        naive = measure(timer, [partial(torch_score_topk, q, k, wl.score_topk, wl.hkv)])
        add_row(report, "score_topk/max", n, nbytes, peak, kern, naive, score_only=only,
                score_only_gbs=nbytes / (only["graph_ms"] * 1e-3) / GB)  # fmt: skip


def time_host(report, wl, device, timer, q) -> None:
    """Zero-copy: the kernel reads pinned host rows over PCIe (q and ids on the GPU).

    Eager clock only: the naive path (CPU index_select + H2D copy) cannot be graph-captured."""
    from kvloft.kernels.sparse_decode import gather_attend

    k_host = torch.randn(wl.host_buffer, wl.hkv, wl.d, dtype=q.dtype).pin_memory()
    v_host = torch.randn(wl.host_buffer, wl.hkv, wl.d, dtype=q.dtype).pin_memory()
    peak = report.bandwidth["h2d_pinned_gbs"]
    for n in wl.host_rows:
        ids = torch.randperm(wl.host_buffer, device=device)[:n]
        ids_cpu = ids.cpu()
        ms = timer.eager(partial(gather_attend, q, k_host, v_host, ids, scale=0.1, check_ids=False))

        def naive(ids_cpu=ids_cpu):  # CPU gather of whole rows, one H2D copy each for K and V, SDPA
            kk = k_host.index_select(0, ids_cpu).to(device, non_blocking=True)
            vv = v_host.index_select(0, ids_cpu).to(device, non_blocking=True)
            return sdpa(q, kk.transpose(0, 1)[None], vv.transpose(0, 1)[None], 0.1)

        nbytes = ids.numel() * ids.element_size() + row_bytes(wl, n, k_host.element_size())
        naive_ms = timer.eager(naive)
        kern, nv = {"eager_ms": ms, "graph_ms": ms}, {"eager_ms": naive_ms, "graph_ms": naive_ms}
        add_row(report, "gather_attend/pinned_host", n, nbytes, peak, kern, nv, against="h2d_pinned")


def table_launches(wl, kv, q, nb, device):
    """nb sequences' decode attention as runtime/batch_attention.py prepares it: each over its own
    table of slots (slot_rows rows) into the row buffer, batch_rows random ids per KV head."""
    from kvloft.kernels.checks import address_table
    from kvloft.runtime.batch_attention import TableLaunch
    from kvloft.runtime.dense import Timers

    r, span = wl.slot_rows, wl.n_buffer // nb // wl.slot_rows * wl.slot_rows  # rows of each sequence
    out = []
    for b in range(nb):
        k, v = kv[0][b * span : (b + 1) * span], kv[1][b * span : (b + 1) * span]
        tables = (address_table([k[j : j + r] for j in range(0, span, r)], device),
                  address_table([v[j : j + r] for j in range(0, span, r)], device))
        ids = torch.stack([torch.randperm(span, device=device)[: wl.batch_rows] for _ in range(wl.hkv)])
        out.append(TableLaunch(q[b], k, v, [ids], tables, r, wl.d**-0.5, Timers()))
    return out


def time_batch(report, wl, device, timer, kv, q, peak, launches) -> None:
    """A batched decode step's attention for one layer: B sequences in one launch
    (batch_attention.run_launches: tables and ids concatenated, one split kernel + merge)
    against each sequence's own launch (TableLaunch.run, B of each). Eager clock only: the
    shared launch copies its per-row metadata to the device (no graph capture), and the
    launches saved are what it is for."""
    from kvloft.runtime.batch_attention import run_launches

    for nb in wl.batches:
        qb = torch.randn(nb, wl.hq, wl.d, dtype=q.dtype, device=device)
        rows = table_launches(wl, kv, qb, nb, device)
        out = torch.empty_like(qb)
        shared = timer.eager(lambda rows=rows, out=out: run_launches(dict(enumerate(rows)), out))
        alone = timer.eager(lambda rows=rows: [ln.run() for ln in rows])
        nbytes = nb * (row_bytes(wl, wl.batch_rows, kv[0].element_size()) + wl.hkv * wl.batch_rows * 8)
        add_row(report, f"table_batched/B{nb}", wl.batch_rows, nbytes, peak, {"eager_ms": shared, "graph_ms": shared},
                {"eager_ms": alone, "graph_ms": alone}, batch=nb)


def run_sweep(report, wl, device, timer, kv, q):
    """Launch-parameter sweep of the gather kernel (shared ids, GPU time); returns the config
    with the best geometric-mean time relative to the per-size best."""
    from kvloft.kernels.sparse_decode import DecodeLaunch, gather_attend

    configs = [DecodeLaunch(block_n=b, num_warps=w, num_stages=st, programs_per_sm=p)
               for b in (32, 64, 128) for w in (2, 4, 8) for st in (1, 2, 3) for p in (2, 4, 8)]  # fmt: skip
    times = {}
    for n in wl.sweep_rows:
        nbytes = row_bytes(wl, n, kv[0].element_size())
        sets = [random_ids(wl, n, False, device) for _ in range(n_variants(nbytes, device))]
        for c in configs:
            ms = timer.graph(
                [partial(gather_attend, q, *kv, ids, scale=0.1, check_ids=False, launch=c) for ids in sets]
            )
            times[(n, c)] = ms
            report.sweep.append({"n": n, **asdict(c), "graph_ms": ms, "gbs": nbytes / (ms * 1e-3) / GB})
    best_at = {n: min(times[(n, c)] for c in configs) for n in wl.sweep_rows}
    score = {c: sum(math.log(times[(n, c)] / best_at[n]) for n in wl.sweep_rows) for c in configs}
    best = min(configs, key=score.get)
    print(f"  sweep best: {best}  (slowdown vs per-size best: "
          f"{[round(times[(n, best)] / best_at[n], 3) for n in wl.sweep_rows]})", flush=True)  # fmt: skip
    return best


# ---------------------------------------------------------------- main


def machine_info(device) -> dict:
    import triton

    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
            "device": str(device)}  # fmt: skip
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, sms=p.multi_processor_count, gpu_mem_gib=round(p.total_memory / 2**30, 1))
    return info


def print_table(report: Report) -> None:
    fails = [c for c in report.checks if not c["ok"]]
    print(f"\nchecks: {len(report.checks) - len(fails)}/{len(report.checks)} pass the 2x-torch-error rule")
    for c in fails[:10]:
        print("  FAIL", c)
    print(f"bandwidth (GB/s): {json.dumps({k: round(v, 1) for k, v in report.bandwidth.items()})}")
    print(
        "gpu = CUDA-graph replay (GPU time); eager = do_bench incl. Python launch; % of measured copy bandwidth"
    )
    print(
        f"{'op':<32} {'n':>8} {'gpu us':>8} {'GB/s':>7} {'%peak':>6} {'eager us':>9} {'naive gpu':>9} {'speedup':>7}"
    )
    for t in report.timings:
        naive = f"{t['naive_graph_ms'] * 1e3:9.1f} {t['speedup']:7.2f}" if "naive_graph_ms" in t else ""
        print(f"{t['name']:<32} {t['n']:>8} {t['graph_ms'] * 1e3:8.1f} {t['gbs']:7.0f} {t['pct_peak']:6.1f}"
              f" {t['eager_ms'] * 1e3:9.1f} {naive}")  # fmt: skip


def save(report: Report, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    smoke = report.machine.get("preset") == "smoke"
    path = os.path.join(out_dir, "gpu_kernels_smoke.json" if smoke else "gpu_kernels.json")
    with open(path, "w") as f:
        json.dump(asdict(report), f, indent=1)
    return path


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU: through the Triton interpreter)")
    p.add_argument("--sweep", action="store_true", help="also sweep the gather kernel's launch parameters")
    p.add_argument(
        "--skip", default="", help="comma list of sections to skip: checks,gather,decode,score,batch,host"
    )
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        if not args.smoke:
            sys.exit("no CUDA device: run with --smoke (tiny shapes through the Triton interpreter)")
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    wl = WORKLOADS["smoke" if args.smoke else "h200"]
    skip = set(filter(None, args.skip.split(",")))
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    report = Report(machine=machine_info(device))
    report.machine["preset"] = "smoke" if args.smoke else "h200"
    report.machine["workload"] = asdict(wl)
    timer = Timer(device)
    torch.manual_seed(0)
    copy_bandwidth(report, wl, device, timer)
    print(f"bandwidth: {report.bandwidth}", flush=True)
    if "checks" not in skip:
        run_checks(report, wl, device, args.smoke)
        save(report, out_dir)
    run_timings(report, wl, device, timer, skip, args.sweep, out_dir)
    path = save(report, out_dir)
    print_table(report)
    print(f"wrote {path}")


def run_timings(report, wl, device, timer, skip, sweep, out_dir) -> None:
    from kvloft.kernels.sparse_decode import DEFAULT_LAUNCH

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = report.bandwidth["hbm_copy_gbs"]
    q = torch.randn(wl.hq, wl.d, dtype=dtype, device=device)
    kv = (torch.randn(wl.n_buffer, wl.hkv, wl.d, dtype=dtype, device=device),
          torch.randn(wl.n_buffer, wl.hkv, wl.d, dtype=dtype, device=device))  # fmt: skip
    launches = {"default": DEFAULT_LAUNCH}
    if sweep:
        print("sweep:", flush=True)
        best = run_sweep(report, wl, device, timer, kv, q)
        report.machine["sweep_best"] = asdict(best)
        if best != DEFAULT_LAUNCH:
            launches["tuned"] = best
        save(report, out_dir)
    sections = {"gather": time_gather, "decode": time_decode, "score": time_scoring, "batch": time_batch}
    for name, fn in sections.items():
        if name not in skip:
            print(f"{name}:", flush=True)
            fn(report, wl, device, timer, kv, q, peak, launches)
            save(report, out_dir)
    del kv
    if "host" not in skip and device.type == "cuda":
        print("host (zero-copy):", flush=True)
        try:
            time_host(report, wl, device, timer, q)
        except (RuntimeError, ValueError) as e:  # report, keep the rest of the run
            report.notes.append(f"zero-copy pinned-host gather failed: {type(e).__name__}: {e}")
            print(report.notes[-1], flush=True)


if __name__ == "__main__":
    main()

"""Index quality vs search work: every retriever against exact top-k and dense attention.

For each workload, the host tier (tokens between the first `n_sink` and the last
`n_window`) is indexed once with `build(keys, prefill queries)`; each decode query then
calls `select(q, budget)`. Per (method, search effort) it reports, averaged over decode
queries:

- top-k recall: overlap with the exact top-`budget` per KV head (group-max logits, the
  `exact` retriever's ranking);
- mass recall: the softmax mass (over host keys, per query head, scale 1/sqrt(D)) of the
  selected rows, averaged over query heads;
- output relative error: ||o - o_dense|| / ||o_dense||, o = the static part (sink +
  window) merged (reference.merge, exact lse) with attention over the selected rows;
- scanned: keys whose score the search computed / (host keys x KV heads);
- build time (numba is compiled beforehand on a toy build, so it is not counted) and
  select latency per query and per KV head (CPU wall clock);
- scaling: graph and HNSW at a fixed effort over host sizes N/4, N/2, N.

Methods: exact, attention_graph (sweep of ef = L), faiss flat / ivf (sweep of nprobe) /
hnsw (sweep of efSearch), and tokenselect / recycled / hip / actqkv at their default
options when their modules import (the ones that fail are listed as skipped).

Workloads: "synthetic-ood" (kvloft.index.synthetic, always) and a real trace when
`--trace PATH` is given (safetensors with q{layer} [T, H_q, D], k{layer} [T, H_kv, D]
after RoPE, v{layer} [T, H_kv, D]): the last `--steps` tokens' queries are the decode
queries, attending to the first T - steps tokens; the index learns from the prefill
queries of those tokens (at most `--queries`).

Writes bench/results/index_recall.json, docs/index_recall.md and
docs/index_recall.png (recall vs scanned; needs matplotlib, a bench-only dependency).

    python bench/index_recall.py                        # short synthetic pass (N = 20K, CPU)
    python bench/index_recall.py --trace bench/traces/smollm2_4k.safetensors --layers 15
    python bench/index_recall.py --tokens 131072 --queries 131072 --steps 128
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kvloft.config import ModelConfig, RetrievalConfig
from kvloft.index.base import METHOD_MODULES, make_retriever
from kvloft.index.synthetic import ood_attention_data
from kvloft.kernels import reference

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "index_recall.json"
DOC = ROOT / "docs" / "index_recall.md"
PLOT = ROOT / "docs" / "index_recall.png"


@dataclass
class Workload:
    """keys, values [T, H_kv, D] (token-major); train_q [H_q, M, D]; test_q [S, H_q, D]."""

    label: str
    keys: Tensor
    values: Tensor
    train_q: Tensor
    test_q: Tensor
    n_sink: int
    n_window: int

    @property
    def host(self) -> slice:
        return slice(self.n_sink, self.keys.shape[0] - self.n_window)

    @property
    def model_cfg(self) -> ModelConfig:
        _, hkv, d = self.keys.shape
        hq = self.test_q.shape[1]
        return ModelConfig(name="bench", hidden_size=hq * d, n_heads=hq, n_kv_heads=hkv, head_dim=d)


def synthetic_workload(args: argparse.Namespace, n_host: int) -> Workload:
    total = args.n_sink + n_host + args.n_window
    d = ood_attention_data(total, args.queries or n_host, args.steps, dim=args.dim,
                           n_kv_heads=args.kv_heads, group=args.group, seed=args.seed)
    return Workload(d.label, d.keys.transpose(0, 1).contiguous(), d.values.transpose(0, 1).contiguous(),
                    d.train_queries, d.test_queries.transpose(0, 1).contiguous(), args.n_sink, args.n_window)


def trace_workloads(args: argparse.Namespace) -> list[Workload]:
    from safetensors import safe_open

    out = []
    with safe_open(str(args.trace), "pt") as f:
        names = set(f.keys())
        layers = [int(x) for x in args.layers.split(",")] if args.layers else sorted(
            int(n[1:]) for n in names if n.startswith("q") and n[1:].isdigit())
        for layer in layers:
            q, k, v = (f.get_tensor(f"{p}{layer}").float() for p in "qkv")  # [T, H, D]
            ctx = q.shape[0] - args.steps
            train = q[:ctx]
            if args.queries and train.shape[0] > args.queries:  # an even sample of prefill queries
                train = train[torch.linspace(0, ctx - 1, args.queries).long()]
            out.append(Workload(f"trace {args.trace.name} layer {layer} (T={ctx})", k[:ctx], v[:ctx],
                                train.transpose(0, 1).contiguous(), q[ctx:], args.n_sink, args.n_window))
    return out


@dataclass
class Truth:
    """Per decode query: exact top-k ids [H_kv, k], host softmax [H_q, N], dense out, static part."""

    ids: list[Tensor]
    probs: list[Tensor]
    dense: list[Tensor]
    static: list[tuple[Tensor, Tensor]]


def ground_truth(w: Workload, budget: int) -> Truth:
    host_k = w.keys[w.host]
    static_idx = torch.cat([torch.arange(w.n_sink), torch.arange(w.host.stop, w.keys.shape[0])])
    scale = w.keys.shape[2] ** -0.5
    t = Truth([], [], [], [])
    for q in w.test_q:  # [H_q, D]
        logits = reference.score(q, host_k)  # [H_q, N]
        group_max = reference.reduce_group(logits, w.keys.shape[1], "max")
        t.ids.append(torch.topk(group_max, min(budget, host_k.shape[0]), dim=1).indices)
        t.probs.append(torch.softmax(logits * scale, dim=1))
        t.dense.append(reference.decode_attend(q, w.keys, w.values, scale=scale)[0])
        t.static.append(reference.decode_attend(q, w.keys[static_idx], w.values[static_idx], scale=scale))
    return t


def step_metrics(w: Workload, truth: Truth, i: int, ids: Tensor) -> dict[str, float]:
    hkv, hq = w.keys.shape[1], w.test_q.shape[1]
    if ids.dim() == 1:
        ids = ids[None].expand(hkv, -1)
    true_ids = truth.ids[i]
    rec = [len(set(ids[h][ids[h] >= 0].tolist()) & set(true_ids[h].tolist())) / max(1, true_ids.shape[1])
           for h in range(hkv)]
    mass = []
    for qh in range(hq):
        row = ids[qh // (hq // hkv)]
        mass.append(float(truth.probs[i][qh][row[row >= 0]].sum()))
    q = w.test_q[i]
    scale = w.keys.shape[2] ** -0.5
    part = reference.gather_attend(q, w.keys[w.host], w.values[w.host], ids, scale=scale)
    out, _ = reference.merge([truth.static[i][0], part[0]], [truth.static[i][1], part[1]])
    err = float((out - truth.dense[i]).norm() / truth.dense[i].norm())
    return {"recall": float(np.mean(rec)), "mass": float(np.mean(mass)), "out_err": err}


SWEEPS: dict[str, tuple[str, list[int]]] = {  # label -> (option swept, values)
    "attention_graph": ("ef", [100, 150, 200, 300, 500, 1000]),
    "attention_graph-mean": ("ef", [100, 150, 200, 300, 500, 1000]),
    "faiss-ivf": ("nprobe", [1, 2, 4, 8, 16, 32]),
    "faiss-hnsw": ("ef_search", [100, 150, 200, 400, 800, 1600]),
}


def method_configs(group: int) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, method, build options) for every retriever the registry can reach."""
    out = [("exact", "exact", {}), ("attention_graph", "attention_graph", {})]
    if group > 1:  # GQA: one search per query head (default) vs one with the group mean
        out.append(("attention_graph-mean", "attention_graph", {"gqa_search": "mean"}))
    out += [("faiss-flat", "faiss", {"index": "flat"}), ("faiss-ivf", "faiss", {"index": "ivf"}),
            ("faiss-hnsw", "faiss", {"index": "hnsw"})]
    for name in ("tokenselect", "recycled", "hip", "actqkv"):
        if name in METHOD_MODULES:
            out.append((name, name, {}))
    return out


def warm_up() -> None:
    """Compile the graph's numba kernels on a toy build, so build times exclude it."""
    mc = ModelConfig(name="warm", hidden_size=16, n_heads=1, n_kv_heads=1, head_dim=16)
    r = make_retriever(RetrievalConfig(method="attention_graph"), mc)
    r.build(0, torch.randn(1, 300, 16), torch.randn(1, 200, 16))
    r.add(0, torch.randn(1, 5, 16), torch.arange(5))
    r.select(0, torch.randn(1, 16), 10)


def run_method(w: Workload, truth: Truth, label: str, method: str, options: dict[str, Any],
               budget: int) -> list[dict[str, Any]]:
    cfg = RetrievalConfig(method=method, budget=budget, n_sink=w.n_sink, n_window=w.n_window, options=options)
    r = make_retriever(cfg, w.model_cfg)
    host_keys = w.keys[w.host].transpose(0, 1).contiguous()  # [H_kv, N, D]
    t0 = time.perf_counter()
    r.build(0, host_keys, w.train_q)
    build_s = time.perf_counter() - t0
    knob, values = SWEEPS.get(label, (None, [None]))
    rows = []
    for value in values:
        if knob is not None:
            r.params = dataclasses.replace(r.params, **{knob: value})
        rows.append(measure(w, truth, r, budget, build_s) | {"method": label, "effort": knob, "value": value})
    return rows


def measure(w: Workload, truth: Truth, r: Any, budget: int, build_s: float) -> dict[str, Any]:
    n, hkv = w.host.stop - w.host.start, w.keys.shape[1]
    steps, lat, scanned = [], [], []
    for i, q in enumerate(w.test_q):
        t0 = time.perf_counter()
        sel = r.select(0, q, budget)
        lat.append(time.perf_counter() - t0)
        scanned.append(sel.scanned / (n * hkv))
        steps.append(step_metrics(w, truth, i, sel.ids.cpu()))
    return {
        "recall": statistics.mean(s["recall"] for s in steps),
        "mass_recall": statistics.mean(s["mass"] for s in steps),
        "out_rel_err": statistics.mean(s["out_err"] for s in steps),
        "scanned": statistics.mean(scanned),
        "build_s": build_s,
        "select_ms": 1e3 * statistics.median(lat),
        "us_per_query_head": 1e6 * statistics.median(lat) / hkv,
    }


def scaling(args: argparse.Namespace, budget: int) -> list[dict[str, Any]]:
    rows = []
    for frac in (4, 2, 1):
        n = args.tokens // frac
        w = synthetic_workload(args, n)
        truth = ground_truth(w, budget)
        for label, method, opts in (("attention_graph", "attention_graph", {"ef": math.ceil(1.5 * budget)}),
                                    ("faiss-hnsw", "faiss", {"index": "hnsw", "ef_search": math.ceil(1.5 * budget)})):
            cfg = RetrievalConfig(method=method, budget=budget, options=opts)
            r = make_retriever(cfg, w.model_cfg)
            t0 = time.perf_counter()
            r.build(0, w.keys[w.host].transpose(0, 1).contiguous(), w.train_q)
            row = measure(w, truth, r, budget, time.perf_counter() - t0)
            rows.append(row | {"method": label, "n_host": n})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=20480, help="host-tier keys of the synthetic workload")
    ap.add_argument("--queries", type=int, default=0, help="prefill queries the index learns from (0: = tokens)")
    ap.add_argument("--steps", type=int, default=32, help="decode queries")
    ap.add_argument("--budget", type=int, default=100, help="top-k per KV head")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--group", type=int, default=1)
    ap.add_argument("--n-sink", type=int, default=64)
    ap.add_argument("--n-window", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trace", type=Path, help="safetensors trace with q{l}, k{l}, v{l}")
    ap.add_argument("--layers", default="", help="trace layers, e.g. 0,15 (default: all)")
    ap.add_argument("--no-scaling", action="store_true")
    ap.add_argument("--replot", action="store_true", help="rewrite the doc and plot from the JSON only")
    args = ap.parse_args()
    if args.replot:
        results = json.loads(RESULTS.read_text())
        write_doc(results)
        plot(results)
        return

    torch.manual_seed(args.seed)
    warm_up()
    workloads = [synthetic_workload(args, args.tokens)] + (trace_workloads(args) if args.trace else [])
    configs = method_configs(max(args.group, workloads[-1].model_cfg.group_size))
    results: dict[str, Any] = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                               "workloads": [], "skipped": {}}
    for w in workloads:
        truth = ground_truth(w, args.budget)
        rows = []
        for label, method, opts in configs:
            if label.endswith("-mean") and w.model_cfg.group_size == 1:
                continue  # one query head per KV head: the mean search is the same search
            try:
                rows += run_method(w, truth, label, method, opts, args.budget)
            except Exception as e:  # noqa: BLE001 - a method that cannot run here is listed, not fatal
                results["skipped"][label] = f"{type(e).__name__}: {e}"
                continue
            print(json.dumps({"workload": w.label, **rows[-1]}))
        n = w.host.stop - w.host.start
        results["workloads"].append({"label": w.label, "n_host": n, "n_train": w.train_q.shape[1],
                                     "steps": w.test_q.shape[0], "rows": rows})
    if not args.no_scaling:
        results["scaling"] = scaling(args, args.budget)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))
    write_doc(results)
    plot(results)
    print(json.dumps({"results": str(RESULTS), "doc": str(DOC), "skipped": results["skipped"]}))


def machine() -> dict[str, Any]:
    import os

    return {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}


def _fmt(row: dict[str, Any]) -> str:
    effort = "" if row.get("effort") is None else f"{row['effort']}={row['value']}"
    return (f"| {row['method']} | {effort} | {row['recall']:.3f} | {row['mass_recall']:.3f} | "
            f"{row['out_rel_err']:.4f} | {100 * row['scanned']:.2f}% | {row['build_s']:.2f} | "
            f"{row['us_per_query_head']:.0f} |")


def write_doc(results: dict[str, Any]) -> None:
    a = results["args"]
    lines = [
        "# Index recall vs keys scanned",
        "",
        ("Produced by `bench/index_recall.py` (see its docstring for the metrics). Machine: "
         f"{results['machine']['cpu']}, {results['machine']['cores']} cores "
         "(shared with other jobs: latencies and build times are indicative), torch "
         f"{results['machine']['torch']}. Top-k = {a['budget']} per KV head; sink {a['n_sink']}, "
         f"window {a['n_window']}."),
        "",
        ("Columns: top-k recall vs exact; attention-mass recall (host softmax mass captured); "
         "relative error of the merged (static + retrieved) attention output vs dense; "
         "keys scanned / host keys; build time; median select latency per query per KV head."),
        "",
    ]
    head = ("| method | effort | top-k recall | mass recall | out rel err | scanned | build s | us/query/head |\n"
            "|---|---|---|---|---|---|---|---|")
    for w in results["workloads"]:
        about = f"{w['n_host']} host keys, {w['n_train']} prefill queries learned from, {w['steps']} decode queries."
        lines += [f"## {w['label']}", "", about, "", head]
        lines += [_fmt(r) for r in w["rows"]] + [""]
    if results.get("scaling"):
        lines += ["## Scaling with host size (synthetic-ood, L = efSearch = 1.5 k)", "",
                  "| method | host keys | top-k recall | scanned | build s | us/query/head |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['n_host']} | {r['recall']:.3f} | {100 * r['scanned']:.2f}% | "
                  f"{r['build_s']:.2f} | {r['us_per_query_head']:.0f} |" for r in results["scaling"]]
        lines.append("")
    lines += ["## Notes", "",
              ("- Synthetic figures use kvloft.index.synthetic (labelled synthetic-ood): keys and queries "
              "from different distributions; trace figures use real SmolLM2 queries and keys."),
              "- attention_graph learns from the prefill queries; faiss indexes see keys only.",
              ("- `scanned` of the graph counts distinct keys per KV head (one GQA group's searches "
              "overlap); faiss ivf/hnsw sum the group's per-search counts (an upper bound, capped at N)."),
              ("- tokenselect, recycled, hip and actqkv run once at their default options with this "
              "top-k budget on a static host tier (no add() between decode queries); they select "
              "tokens or blocks for other budgets and schedules: docs/methods.md and "
              "docs/methods_hip_actqkv.md have their own measurements."), ""]
    if results["skipped"]:
        lines += ["## Skipped", ""] + [f"- {k}: {v}" for k, v in results["skipped"].items()] + [""]
    if PLOT.exists() or _has_matplotlib():
        lines += [f"![recall vs scanned]({PLOT.name})", ""]
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(lines))


def _has_matplotlib() -> bool:
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        return False
    return True


COLORS = {name: i for i, name in enumerate(  # one colour per method across panels
    ["exact", "attention_graph", "attention_graph-mean", "faiss-flat", "faiss-ivf", "faiss-hnsw",
     "tokenselect", "recycled", "hip", "actqkv"])}


def plot(results: dict[str, Any]) -> None:
    if not _has_matplotlib():
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ws = results["workloads"]
    cols = min(2, len(ws))
    rows_n = math.ceil(len(ws) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(6.5 * cols, 4.4 * rows_n), squeeze=False)
    for ax in axes.flat[len(ws):]:
        ax.set_visible(False)
    for ax, w in zip(axes.flat, ws):
        by: dict[str, list[dict[str, Any]]] = {}
        for r in w["rows"]:
            by.setdefault(r["method"], []).append(r)
        for name, rows in by.items():
            rows = sorted(rows, key=lambda r: r["scanned"])
            xs = [max(100 * r["scanned"], 1e-2) for r in rows]
            color = f"C{COLORS[name] % 10}" if name in COLORS else None
            ax.plot(xs, [r["recall"] for r in rows], marker="o", ms=4, label=name, color=color)
        ax.set_xscale("log")
        ax.set_xlabel("keys scanned (% of host keys)")
        ax.set_ylabel(f"top-{results['args']['budget']} recall")
        ax.set_title(w["label"], fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)


if __name__ == "__main__":
    main()

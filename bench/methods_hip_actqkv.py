"""Attention quality and search cost of HiP and ActQKV, with exact top-k as the reference.

Replays decode steps the way the runtime drives a retriever: the first `n_sink` tokens
and a ring of the last `n_window` are the static tier; older tokens are the host tier,
given to `build` after the prefill and to `add` as they leave the window. Steps are
replayed step-major (every layer at step t before any layer at t + 1), as in a model's
forward pass, which ActQKV's cross-layer budget split relies on. Each step and layer is
measured against dense attention over every key up to it (helpers shared with
bench/methods_quality.py):

- mass recall: host-tier softmax mass carried by the selected rows (mean over heads);
- output relative error: ||o - o_dense|| / ||o_dense|| of static + selected parts
  (exact lse merge) against dense attention;
- keys read: key vectors the search read (Selection.scanned; exact reads all of them),
  per step and layer, and as a fraction of host keys x KV heads;
- attended: host rows attended per KV head / host rows;
- select latency (median), next to one dense decode attention timed in the same run.

Data: a synthetic multi-layer context (always; layers differ in how peaked their
attention is) and a real trace if passed (`--trace PATH`: safetensors with q{l}
[T, H_q, D], k{l} [T, H_kv, D] after RoPE, v{l}). Writes
bench/results/methods_hip_actqkv.json and docs/methods_hip_actqkv.md.

    python bench/methods_hip_actqkv.py                       # short synthetic pass (CPU)
    python bench/methods_hip_actqkv.py --tokens 131072 --steps 128 --budget 2048 --device cuda
    python bench/methods_hip_actqkv.py --trace smollm2_trace.safetensors --layers 0,8,16,24
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvloft.config import RetrievalConfig
from kvloft.index.base import make_retriever

sys.path.insert(0, str(Path(__file__).resolve().parent))
from methods_quality import (  # sibling bench module: shared data and metrics
    Dataset,
    _quantile,
    add_replay_args,
    load_trace,
    parse_replay_args,
    replay_device,
    replay_meta,
    replay_tokens,
    step_quality,
    sync,
    synthetic_topics,
    timed_select,
    trace_layers,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "methods_hip_actqkv.json"
DOC = ROOT / "docs" / "methods_hip_actqkv.md"


@dataclass(frozen=True)
class Variant:
    name: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    scaled: bool = False  # HiP kept tokens scaled to the context (see variants())


def variants(tokens: int) -> list[Variant]:
    """Paper defaults, plus HiP with stage sizes scaled so that every stage prunes at `tokens`.

    InfiniteHiP's kept tokens (32768, 8192) exceed a short context, where stages 1-2 would
    keep everything; the scaled variant keeps 1/4 and 1/16 of the host tier instead.
    """
    first, second = max(tokens // 4, 256), max(tokens // 16, 32)
    scaled = {"kept_tokens": (first, second, second)}  # the last entry is replaced by the budget
    return [
        Variant("exact (reference)", "exact"),
        Variant("hip (256,32,8) paper kept", "hip"),
        Variant(f"hip (256,32,8) kept {scaled['kept_tokens'][:2]}", "hip", scaled, scaled=True),
        Variant("hip probe=middle, scaled kept", "hip", {**scaled, "probe": "middle"}, scaled=True),
        Variant("actqkv dynamic cut-off", "actqkv"),
        Variant("actqkv fixed budget", "actqkv", {"dynamic_cutoff": False}),
    ]


def synthetic_layers(tokens: int, n_layers: int, span: int) -> Dataset:
    """`n_layers` synthetic-topics layers, from peaked (few topics, strong queries) to flat.

    span: tokens per topic block; 8 scatters the relevant keys, 128 gives them locality.
    """
    layers, labels = {}, []
    for i in range(n_layers):
        frac = i / max(n_layers - 1, 1)
        gain, topics = 10.0 - 6.0 * frac, 8 + int(24 * frac)
        one = synthetic_topics(tokens, query_gain=gain, n_topics=topics, span=span, seed=i)
        layers[i] = one.layers[0]
        labels.append(f"L{i}: query_gain={gain:.1f}, topics={topics}")
    base = one.label.split(", topics=")[0]
    label = f"{base}, span={span}, seeds 0..{n_layers - 1}); " + "; ".join(labels)
    return Dataset(f"synthetic span {span}", label, layers)


def _warm_up(cfg: RetrievalConfig, data: Dataset, qkv, args, device: torch.device) -> None:
    """One select on a throwaway retriever, so that Triton's compile stays out of the timings."""
    q, k, _ = qkv
    warm = make_retriever(cfg, data.model_cfg, device)
    host_end = q.shape[0] - args.steps - args.n_window  # the replay's host tier: every stage runs
    warm.build(0, k[args.n_sink : host_end].transpose(0, 1), q[:64].transpose(0, 1))
    warm.select(0, q[-1], args.budget)
    sync(device)


def replay(variant: Variant, data: Dataset, args, device: torch.device) -> list[dict[str, float]]:
    """Build every layer after the prefill, then per step: add to every layer, select in layer order."""
    cfg = RetrievalConfig(method=variant.method, budget=args.budget, n_sink=args.n_sink,
                          n_window=args.n_window, options=dict(variant.options))
    layers = [data.layers[name] for name in sorted(data.layers)]  # retriever layers 0..L-1
    retriever = make_retriever(cfg, data.model_cfg, device)
    t = layers[0].q.shape[0]
    prefill = t - args.steps
    host_end = prefill - args.n_window
    qkv = [tuple(x.to(device) for x in (tr.q, tr.k, tr.v)) for tr in layers]
    _warm_up(cfg, data, qkv[0], args, device)
    for i, (q, k, _) in enumerate(qkv):
        sample = q[max(args.n_sink, prefill - args.query_sample) : prefill].transpose(0, 1)  # [H_q, M, D]
        retriever.build(i, k[args.n_sink : host_end].transpose(0, 1), sample)
    records = []
    for p in range(prefill, t):
        for i, (_, k, _) in enumerate(qkv):
            retriever.add(i, k[host_end : host_end + 1].transpose(0, 1), torch.tensor([host_end]))
        host_end += 1
        for i, (q, k, v) in enumerate(qkv):
            sel, ms = timed_select(retriever, i, q[p], args.budget, device)
            quality = step_quality(q[p], k[: p + 1], v[: p + 1], sel.ids, slice(args.n_sink, host_end), args.budget)
            records.append({"layer": i, "select_ms": ms, "scanned": sel.scanned,
                            "host_keys": (host_end - args.n_sink) * k.shape[1],
                            "selected": int((sel.ids >= 0).sum()) / (1 if sel.shared else sel.ids.shape[0]),
                            **quality})
    return records


def summarize(variant: Variant, data: Dataset, recs: list[dict[str, float]]) -> dict[str, Any]:
    n_layers = len(data.layers)
    per_layer_rows = [statistics.fmean(r["selected"] for r in recs if r["layer"] == i) for i in range(n_layers)]
    return {
        "variant": variant.name, "method": variant.method, "options": {k: list(v) if isinstance(v, tuple) else v
                                                                       for k, v in variant.options.items()},
        "data": data.name, "data_label": data.label, "steps_x_layers": len(recs),
        "mass_recall": statistics.fmean(r["mass_recall"] for r in recs),
        "mass_recall_p10": _quantile([r["mass_recall"] for r in recs], 0.1),
        "rel_err": statistics.fmean(r["rel_err"] for r in recs),
        "rel_err_p90": _quantile([r["rel_err"] for r in recs], 0.9),
        "keys_read": statistics.fmean(r["scanned"] for r in recs),
        "keys_read_frac": sum(r["scanned"] for r in recs) / sum(r["host_keys"] for r in recs),
        "attended_frac": statistics.fmean(r["attended"] for r in recs),
        "selected_per_layer": [round(x, 1) for x in per_layer_rows],
        "select_ms_median": statistics.median(r["select_ms"] for r in recs),
        "select_ms_mean": statistics.fmean(r["select_ms"] for r in recs),
        "per_layer_mass_recall": [round(statistics.fmean(r["mass_recall"] for r in recs if r["layer"] == i), 4)
                                  for i in range(n_layers)],
    }


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# HiP and ActQKV: measured quality and cost",
        "",
        f"Measured by `bench/methods_hip_actqkv.py` on {meta['machine']}; budget {meta['budget']} host tokens "
        f"(per KV head for exact, shared by all heads for HiP and ActQKV; ActQKV's per-layer share varies "
        f"around it), sink {meta['n_sink']}, window {meta['n_window']}, {meta['steps']} decode steps, "
        f"layers replayed step-major. {meta['note']}".rstrip(),
        "",
        *(f"- `{name}`: {label}; one dense decode attention over all its keys (torch reference op, same "
          f"run): {meta['dense_ms'][name]:.2f} ms" for name, label in meta["datasets"].items()),
        "",
        ("| data | variant | mass recall (p10) | out rel. err (p90) | keys read / step | read frac | attended "
         "| rows per layer (per KV head) | select ms median (mean) |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows = ", ".join(f"{x:.0f}" for x in r["selected_per_layer"])
        lines.append(
            f"| {r['data']} | {r['variant']} | {r['mass_recall']:.3f} ({r['mass_recall_p10']:.3f}) "
            f"| {r['rel_err']:.4f} ({r['rel_err_p90']:.4f}) | {r['keys_read']:.0f} | {r['keys_read_frac']:.3f} "
            f"| {r['attended_frac']:.3f} | {rows} | {r['select_ms_median']:.2f} ({r['select_ms_mean']:.2f}) |"
        )
    lines += [
        "",
        ("Variants: `hip ... paper kept` uses InfiniteHiP's kept tokens (32768, 8192, budget); where the host "
         "tier is shorter than a stage's kept tokens that stage keeps everything and reads nothing, so at "
         "short contexts only the last stage (chunks of 8) prunes. `hip ... kept (a, b)` scales the first two "
         "stages to 1/4 and 1/16 of the host tier so that all three prune. `actqkv dynamic cut-off` splits "
         "n_layers x budget across layers by block-score entropy; `fixed budget` gives each layer `budget`. "
         "The synthetic data's span is the length of its topic blocks: 8 scatters the relevant keys, 128 "
         "gives them the locality HiP's probes rely on."),
        "",
        ("Keys read counts key vectors (a token's key in one KV head): HiP's probes, 2 log2(l_c) rows per "
         "chunk at each stage recomputed that step (cached stages read nothing); ActQKV's block vectors "
         "(one per block and KV head); exact reads every host key."),
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_replay_args(ap, tokens=8192, steps=32, out=RESULTS, doc=DOC)
    ap.add_argument("--layers-synthetic", type=int, default=4, help="synthetic layers")
    ap.add_argument("--spans", default="8,128", help="comma-separated topic-block lengths of the synthetic data")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return parse_replay_args(ap, argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = replay_device(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    datasets = [synthetic_layers(args.tokens, args.layers_synthetic, int(s)) for s in args.spans.split(",")]
    if args.trace:
        datasets.append(load_trace(args.trace, trace_layers(args)))
    results = []
    for data in datasets:
        t = replay_tokens(data, args)
        for v in variants(t - args.steps - args.n_sink - args.n_window):
            results.append(summarize(v, data, replay(v, data, args, device)))
    meta = replay_meta(args, device, datasets)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text(markdown(results, meta))
    brief = {f"{r['variant']} | {r['data']}": round(r["mass_recall"], 3) for r in results}
    print(json.dumps({"out": str(args.out), "mass_recall": brief}))
    return {"meta": meta, "results": results}


if __name__ == "__main__":
    main()

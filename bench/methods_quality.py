"""Attention quality and search cost of TokenSelect and Recycled Attention, with exact top-k.

Replays decode steps against a retriever the way the runtime drives it: the first
`n_sink` tokens and a ring of the last `n_window` form the static tier; older tokens
form the host tier, given to `build` after the prefill and to `add` one by one as they
leave the window; every step calls `select` with that step's query. Each step is
measured against dense attention over every key up to it:

- mass recall: the host-tier attention mass (softmax over host keys, per query head,
  scale 1/sqrt(D)) that the selected rows carry, averaged over heads;
- top-k recall: overlap of the selected rows with exact top-`budget` per KV head
  (group-max logits, the `exact` retriever's ranking);
- output relative error: ||o - o_dense|| / ||o_dense|| of the static part merged with
  the selected part (exact lse merge) against dense attention;
- scanned fraction: keys scored by the search / (host keys x KV heads);
- attended fraction: host rows attended per KV head / host rows;
- select latency, with a dense attention over all keys timed in the same run;
- TokenSelect's selection-cache hit rate, Recycled Attention's full-step rate.

Data: "synthetic-topics" (always; see `synthetic_topics`) and a real trace if one is
passed (`--trace PATH`: safetensors with q{layer} [T, H_q, D], k{layer} [T, H_kv, D]
(after RoPE), v{layer} [T, H_kv, D]; the last `--steps` tokens are the decode steps).
Writes JSON to bench/results/methods_tokenselect_recycled.json and one section per
method into docs/methods.md (between markers; the rest of that page is kept).

    python bench/methods_quality.py                               # short synthetic pass, CPU
    python bench/methods_quality.py --tokens 131072 --steps 256 --budget 2048 --device cuda
    python bench/methods_quality.py --trace smollm2_trace.safetensors --layers 0,10,20
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kvloft.config import ModelConfig, RetrievalConfig
from kvloft.index.base import make_retriever
from kvloft.kernels import reference

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "methods_tokenselect_recycled.json"
DOC = ROOT / "docs" / "methods.md"


@dataclass
class LayerTrace:
    q: Tensor  # [T, H_q, D] queries after RoPE
    k: Tensor  # [T, H_kv, D] keys after RoPE
    v: Tensor  # [T, H_kv, D]


@dataclass
class Dataset:
    name: str  # short, for tables: "synthetic" or "trace:<file>"
    label: str  # what it is, with its parameters
    layers: dict[int, LayerTrace]

    @property
    def model_cfg(self) -> ModelConfig:
        tr = next(iter(self.layers.values()))
        hq, d = tr.q.shape[1:]
        return ModelConfig(name="trace", n_heads=hq, n_kv_heads=tr.k.shape[1], head_dim=d,
                           hidden_size=hq * d, n_layers=len(self.layers))


@dataclass(frozen=True)
class Variant:
    name: str  # row label
    method: str  # RetrievalConfig.method
    section: str  # docs/methods.md section it is reported in
    options: dict[str, Any] = field(default_factory=dict)


VARIANTS = (
    Variant("exact (reference)", "exact", "all"),
    Variant("tokenselect theta=0.9", "tokenselect", "tokenselect"),
    Variant("tokenselect no cache", "tokenselect", "tokenselect", {"selection_cache": False}),
    Variant("recycled stride S=50", "recycled", "recycled"),
    Variant("recycled dynamic QC=5 s=0.85", "recycled", "recycled", {"schedule": "dynamic"}),
)

SECTIONS = {
    "tokenselect": "TokenSelect (arXiv 2411.02886)",
    "recycled": "Recycled Attention (arXiv 2411.05787)",
}


def synthetic_topics(
    tokens: int, *, n_kv_heads: int = 3, group: int = 3, dim: int = 64, n_topics: int = 16,
    span: int = 8, informative: float = 0.25, topic_gain: float = 5.0, query_gain: float = 8.0,
    dwell: int = 24, seed: int = 0,
) -> Dataset:
    """One layer of a context made of topics, with decode queries that dwell on one.

    Keys: N(0, 1) noise; a quarter of the `span`-token blocks are informative and carry
    `topic_gain` x their topic's unit direction (per KV head). Queries: `query_gain` x
    the direction of the current topic (one per `dwell` positions), a fixed per-head
    offset (heads of a group differ) and N(0, 0.3^2) per-step noise. Attention then
    concentrates on the blocks of the current topic, consecutive queries are alike
    within a dwell and unlike across it.
    """
    gen = torch.Generator().manual_seed(seed)
    u = F.normalize(torch.randn(n_topics, n_kv_heads, dim, generator=gen), dim=-1)
    n_blocks = -(-tokens // span)
    block_topic = torch.randint(n_topics, (n_blocks,), generator=gen).repeat_interleave(span)[:tokens]
    gain = (torch.rand(n_blocks, generator=gen) < informative).float().repeat_interleave(span)[:tokens]
    k = torch.randn(tokens, n_kv_heads, dim, generator=gen) + topic_gain * gain[:, None, None] * u[block_topic]
    v = torch.randn(tokens, n_kv_heads, dim, generator=gen)
    z = torch.randint(n_topics, (-(-tokens // dwell),), generator=gen).repeat_interleave(dwell)[:tokens]
    head_offset = 0.5 * torch.randn(n_kv_heads * group, dim, generator=gen)
    q = query_gain * u[z].repeat_interleave(group, dim=1) + head_offset  # [T, H_q, D]
    q = q + 0.3 * torch.randn(q.shape, generator=gen)
    label = (f"synthetic-topics(T={tokens}, H_q={n_kv_heads * group}, H_kv={n_kv_heads}, D={dim}, "
             f"topics={n_topics}, dwell={dwell}, seed={seed})")
    return Dataset("synthetic", label, {0: LayerTrace(q, k, v)})


def load_trace(path: Path, layers: list[int] | None) -> Dataset:
    """Read q{l}, k{l}, v{l} tensors of the chosen layers (all present if None)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        present = sorted(int(m.group(1)) for n in names if (m := re.fullmatch(r"q(\d+)", n)))
        chosen = present if layers is None else layers
        missing = [l for l in chosen if not {f"q{l}", f"k{l}", f"v{l}"} <= names]
        if not chosen or missing:
            raise ValueError(f"{path}: need q{{l}}, k{{l}}, v{{l}} for layers {missing or chosen}; "
                             f"layers with queries: {present}")
        data = {l: LayerTrace(*(f.get_tensor(f"{x}{l}").float() for x in "qkv")) for l in chosen}
    return Dataset(f"trace:{path.name}", f"trace {path} (layers {chosen})", data)


@dataclass
class StepRecord:
    mass_recall: float
    topk_recall: float
    rel_err: float
    scanned: int
    host_keys: int  # host rows x KV heads
    attended: float  # attended host rows per KV head / host rows
    select_ms: float


def selection_mask(ids: Tensor, n_kv: int, n: int) -> Tensor:
    """ids [H_kv, k] (-1 pads) or shared [k] -> bool [H_kv, n]."""
    if ids.dim() == 1:
        ids = ids[None].expand(n_kv, -1)
    mask = torch.zeros(n_kv, n + 1, dtype=torch.bool, device=ids.device)
    mask.scatter_(1, torch.where(ids < 0, n, ids), True)  # pads land in the spare column
    return mask[:, :n]


def step_quality(q: Tensor, k: Tensor, v: Tensor, ids: Tensor, host: slice, budget: int) -> dict[str, float]:
    """q [H_q, D]; k, v [p+1, H_kv, D] (every key up to this step); host: the host-tier positions."""
    hq, d = q.shape
    hkv, scale = k.shape[1], d**-0.5
    t = k.shape[0]
    static = torch.cat([torch.arange(0, host.start), torch.arange(host.stop, t)]).to(k.device)
    kh, vh = k[host], v[host]  # [N, H_kv, D]
    o_s, l_s = reference.decode_attend(q, k[static], v[static], scale=scale)
    o_r, l_r = reference.gather_attend(q, kh, vh, ids, scale=scale)
    out, _ = reference.merge([o_s, o_r], [l_s, l_r])
    dense, _ = reference.decode_attend(q, k, v, scale=scale)
    logits = reference.score(q, kh, scale=scale)  # [H_q, N]
    mask = selection_mask(ids, hkv, kh.shape[0])  # [H_kv, N]
    mass = (torch.softmax(logits, -1) * mask.repeat_interleave(hq // hkv, 0)).sum(-1).mean()
    top = torch.topk(reference.reduce_group(logits, hkv, "max"), min(budget, kh.shape[0]), -1).indices
    exact = selection_mask(top, hkv, kh.shape[0])
    topk = ((mask & exact).sum(-1).float() / exact.sum(-1).clamp_min(1)).mean()
    return {
        "mass_recall": float(mass),
        "topk_recall": float(topk),
        "rel_err": float((out - dense).norm() / dense.norm()),
        "attended": float(mask.sum(-1).float().mean() / max(kh.shape[0], 1)),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_select(retriever, layer: int, q: Tensor, budget: int, device: torch.device) -> tuple[Any, float]:
    """retriever.select(layer, q, budget) and its milliseconds (the device synchronized around it)."""
    sync(device)
    t0 = time.perf_counter()
    sel = retriever.select(layer, q, budget)
    sync(device)
    return sel, 1e3 * (time.perf_counter() - t0)


def replay_layer(retriever, layer: int, tr: LayerTrace, args, device: torch.device) -> list[StepRecord]:
    """Build after the prefill, then add/select/measure for the last `args.steps` tokens."""
    t = tr.q.shape[0]
    prefill = t - args.steps
    q, k, v = (x.to(device) for x in (tr.q, tr.k, tr.v))
    host_end = prefill - args.n_window
    sample = q[max(args.n_sink, prefill - args.query_sample) : prefill].transpose(0, 1)  # [H_q, M, D]
    retriever.build(layer, k[args.n_sink : host_end].transpose(0, 1), sample)
    records = []
    for p in range(prefill, t):  # token p enters the window, token p - n_window leaves it
        retriever.add(layer, k[host_end : host_end + 1].transpose(0, 1), torch.tensor([host_end]))
        host_end += 1
        sel, ms = timed_select(retriever, layer, q[p], args.budget, device)
        quality = step_quality(q[p], k[: p + 1], v[: p + 1], sel.ids, slice(args.n_sink, host_end), args.budget)
        records.append(StepRecord(scanned=sel.scanned, host_keys=(host_end - args.n_sink) * k.shape[1],
                                  select_ms=ms, **quality))
    return records


def dense_ms(data: Dataset, device: torch.device, repeats: int = 5) -> float:
    """Median time of one dense decode attention over every key of the first layer."""
    tr = next(iter(data.layers.values()))
    q, k, v = (x.to(device) for x in (tr.q[-1], tr.k, tr.v))
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        reference.decode_attend(q, k, v, scale=q.shape[-1] ** -0.5)
        sync(device)
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def run_variant(variant: Variant, data: Dataset, args, device: torch.device) -> dict[str, Any]:
    cfg = RetrievalConfig(method=variant.method, budget=args.budget, n_sink=args.n_sink,
                          n_window=args.n_window, options=dict(variant.options))
    retriever = make_retriever(cfg, data.model_cfg, device)
    recs = [r for layer, tr in data.layers.items() for r in replay_layer(retriever, layer, tr, args, device)]
    stats = retriever.stats()
    summary = {
        "variant": variant.name, "method": variant.method, "section": variant.section,
        "options": variant.options, "data": data.name, "data_label": data.label, "layers": sorted(data.layers), "steps": len(recs),
        "mass_recall": statistics.fmean(r.mass_recall for r in recs),
        "mass_recall_p10": _quantile([r.mass_recall for r in recs], 0.1),
        "topk_recall": statistics.fmean(r.topk_recall for r in recs),
        "rel_err": statistics.fmean(r.rel_err for r in recs),
        "rel_err_p90": _quantile([r.rel_err for r in recs], 0.9),
        "scanned_frac": sum(r.scanned for r in recs) / sum(r.host_keys for r in recs),
        "attended_frac": statistics.fmean(r.attended for r in recs),
        "select_ms_median": statistics.median(r.select_ms for r in recs),
        "select_ms_mean": statistics.fmean(r.select_ms for r in recs),
        "cache_hit_rate": stats.get("cache_hit_rate"),
        "full_step_rate": stats.get("full_step_rate"),
        "stats": stats,
        "per_step": {"mass_recall": [round(r.mass_recall, 5) for r in recs],
                     "rel_err": [round(r.rel_err, 6) for r in recs],
                     "scanned": [r.scanned for r in recs]},
    }
    return summary


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def machine(device: torch.device) -> str:
    cpu = f"{platform.machine()} {platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (search on GPU); host {cpu}"
    return f"CPU only: {cpu}"


def _fmt(x: float | None, pattern: str) -> str:
    return "-" if x is None else format(x, pattern)


def section_markdown(section: str, results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    rows = [r for r in results if r["section"] in (section, "all")]
    lines = [
        f"## {SECTIONS[section]}",
        "",
        (
            f"Measured by `bench/methods_quality.py` on {meta['machine']}; budget {meta['budget']} host "
            f"tokens per KV head, sink {meta['n_sink']}, window {meta['n_window']}, {meta['steps']} decode "
            f"steps per layer. {meta['note']}"
        ).rstrip(),
        "",
        *(
            f"- `{name}`: {label}; one dense decode attention over all its keys (torch reference op, "
            f"same run): {meta['dense_ms'][name]:.2f} ms"
            for name, label in meta["datasets"].items()
        ),
        "",
        (
            "| data | variant | mass recall (p10) | top-k recall | out rel. err (p90) | scanned | attended "
            "| select ms (median) | cache hits | full steps |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['data']} | {r['variant']} | {r['mass_recall']:.3f} ({r['mass_recall_p10']:.3f}) "
            f"| {r['topk_recall']:.3f} | {r['rel_err']:.4f} ({r['rel_err_p90']:.4f}) "
            f"| {r['scanned_frac']:.3f} | {r['attended_frac']:.3f} | {r['select_ms_median']:.2f} "
            f"| {_fmt(r['cache_hit_rate'], '.2f')} | {_fmt(r['full_step_rate'], '.2f')} |"
        )
    return "\n".join(lines) + "\n"


def write_doc(path: Path, results: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """Replace this bench's sections of docs/methods.md (between markers); keep everything else."""
    text = path.read_text() if path.exists() else "# Retrieval methods: measured quality and cost\n"
    for section in SECTIONS:
        begin, end = f"<!-- methods_quality:{section}:begin -->", f"<!-- methods_quality:{section}:end -->"
        block = f"{begin}\n{section_markdown(section, results, meta)}{end}"
        i, j = text.find(begin), text.find(end)
        if 0 <= i < j:
            text = text[:i] + block + text[j + len(end) :]
        else:
            text = text.rstrip("\n") + f"\n\n{block}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def add_replay_args(ap: argparse.ArgumentParser, *, tokens: int, steps: int, out: Path, doc: Path) -> None:
    """The options every replay benchmark takes (this one and methods_hip_actqkv.py)."""
    ap.add_argument("--tokens", type=int, default=tokens, help="synthetic context length")
    ap.add_argument("--steps", type=int, default=steps, help="decode steps replayed per layer")
    ap.add_argument("--budget", type=int, default=256, help="host tokens per step and layer (k, K)")
    ap.add_argument("--n-sink", type=int, default=64)
    ap.add_argument("--n-window", type=int, default=256)
    ap.add_argument("--query-sample", type=int, default=256, help="prefill queries passed to build")
    ap.add_argument("--trace", type=Path, help="safetensors with q{l}, k{l}, v{l} per layer")
    ap.add_argument("--layers", help="comma-separated trace layers (default: all)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda")
    ap.add_argument("--out", type=Path, default=out)
    ap.add_argument("--doc", type=Path, default=doc)
    ap.add_argument("--note", default="", help="sentence added to the doc (e.g. what the run is)")


def parse_replay_args(ap: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = ap.parse_args(argv)
    if args.steps < 1 or args.tokens <= args.steps + args.n_sink + args.n_window:
        ap.error("need --tokens > --steps + --n-sink + --n-window and --steps >= 1")
    return args


def replay_device(args: argparse.Namespace) -> torch.device:
    """--device: auto is CUDA when present, else the CPU."""
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


def trace_layers(args: argparse.Namespace) -> list[int] | None:
    return [int(x) for x in args.layers.split(",")] if args.layers else None


def replay_tokens(data: Dataset, args: argparse.Namespace) -> int:
    """Tokens of the data set's layers, checked to hold the replayed steps after sink and window."""
    t = next(iter(data.layers.values())).q.shape[0]
    if t <= args.steps + args.n_sink + args.n_window:
        raise ValueError(f"{data.label}: {t} tokens; need more than --steps + --n-sink + --n-window")
    return t


def replay_meta(args: argparse.Namespace, device: torch.device, datasets: list[Dataset]) -> dict[str, Any]:
    """The settings and machine of a replay run, with dense attention's time per data set."""
    return {"machine": machine(device), "device": str(device), "torch": torch.__version__,
            "budget": args.budget, "n_sink": args.n_sink, "n_window": args.n_window, "steps": args.steps,
            "tokens": args.tokens, "datasets": {d.name: d.label for d in datasets}, "note": args.note,
            "dense_ms": {d.name: dense_ms(d, device) for d in datasets}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_replay_args(ap, tokens=4096, steps=64, out=RESULTS, doc=DOC)
    return parse_replay_args(ap, argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = replay_device(args)
    datasets = [synthetic_topics(args.tokens)]
    if args.trace:
        datasets.append(load_trace(args.trace, trace_layers(args)))
    for d in datasets:
        replay_tokens(d, args)
    results = [run_variant(v, d, args, device) for d in datasets for v in VARIANTS]
    meta = replay_meta(args, device, datasets)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    write_doc(args.doc, results, meta)
    brief = {f"{r['variant']} | {r['data']}": round(r["mass_recall"], 3) for r in results}
    print(json.dumps({"out": str(args.out), "mass_recall": brief}))
    return {"meta": meta, "results": results}


if __name__ == "__main__":
    main()

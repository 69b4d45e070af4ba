"""Attention-level quality of retrievers on a real trace, at matched budgets.

For a trace of T tokens (kvloft.eval.traces: q{l} [T, H_q, D], k{l} [T, H_kv, D] after
RoPE, v{l} [T, H_kv, D]) the last `steps` tokens are replayed as decode steps, the way
the runtime drives a retriever: after a prefill of P = T - steps tokens, the first
`n_sink` tokens and the last `n_window` form the static tier and the tokens between form
the host tier, given to `build` with a strided sample of the prefill queries; then, step
by step and layer by layer (step-major, as in decoding), the token leaving the window
goes to `add` and the step's query to `select`. Each step is held against dense
attention over every key up to it:

- mass recall: the softmax mass of exact attention (scale 1/sqrt(D), per query head,
  over all keys) on the static keys plus the selected host keys, averaged over heads;
  1.0 when nothing is missed;
- output relative error: ||o - o_dense|| / ||o_dense|| over all heads, o being the static
  part merged with the selected part (exact lse merge, the runtime's arithmetic);
- scanned fraction: keys the search scored / (host keys x KV heads);
- attended fraction: selected host rows per KV head / host rows.

    python -m kvloft.eval.attention_report --trace bench/traces/smollm2_8k.safetensors \\
        --methods exact,tokenselect,recycled --budget 256,1024 \
        --out bench/results/attention_report.json --doc docs/attention_report.md

JSON to --out (default ./attention_report.json); a section per trace in --doc (default
./attention_report.md; per method x budget, then per layer, so the layers that suffer stand out).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kvloft.config import ModelConfig, RetrievalConfig
from kvloft.eval.methods import method_unavailable
from kvloft.eval.runner import machine_label
from kvloft.eval.traces import load_trace, trace_layers
from kvloft.index.base import make_retriever
from kvloft.kernels import reference

__all__ = ["ReplayParams", "main", "markdown", "replay", "report", "write_doc"]

# written where the command runs (the repository's bench/results and docs when run from its root)
RESULTS = Path("attention_report.json")
DOC = Path("attention_report.md")


@dataclass(frozen=True)
class ReplayParams:
    """How a trace is split and replayed (defaults: the runtime's RetrievalConfig, 64 steps)."""

    n_sink: int = 64
    n_window: int = 512
    steps: int = 64  # decode steps replayed: the last `steps` tokens of the trace
    query_sample: int = 2048  # prefill queries given to build (strided, as the runtime samples them)

    def check(self, tokens: int) -> None:
        for name in ("n_sink", "steps", "query_sample"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "steps" else 0):
                raise ValueError(f"{name} must be an int >= {1 if name == 'steps' else 0}, got {v!r}")
        if self.n_window < 1:
            raise ValueError(f"n_window must be >= 1, got {self.n_window}")
        if tokens <= self.steps + self.n_sink + self.n_window:
            raise ValueError(
                f"the trace has {tokens} tokens; it needs more than steps + n_sink + n_window = "
                f"{self.steps + self.n_sink + self.n_window}: capture a longer one or lower them"
            )


@dataclass
class Layer:
    q: Tensor  # [T, H_q, D] fp32, after RoPE
    k: Tensor  # [T, H_kv, D] fp32, after RoPE
    v: Tensor  # [T, H_kv, D] fp32


@dataclass
class Step:
    layer: int
    pos: int
    mass_recall: float
    rel_err: float
    scanned_frac: float
    attended_frac: float
    select_ms: float


def layers_of(tensors: dict[str, Tensor]) -> dict[int, Layer]:
    found = trace_layers(list(tensors))
    if not found:
        raise ValueError("the trace holds no layer with q{l}, k{l} and v{l} tensors")
    return {x: Layer(*(tensors[f"{n}{x}"].float() for n in "qkv")) for x in found}


def model_config(layers: dict[int, Layer], n_layers: int | None = None) -> ModelConfig:
    tr = next(iter(layers.values()))
    hq, d = tr.q.shape[1:]
    return ModelConfig(name="trace", n_heads=hq, n_kv_heads=tr.k.shape[1], head_dim=d, hidden_size=hq * d,
                       n_layers=n_layers or max(layers) + 1)


def query_sample(q: Tensor, cap: int) -> Tensor | None:
    """Every stride-th prefill query (stride a power of two, at most `cap` kept): q [P, H_q, D] -> [H_q, M, D]."""
    if cap == 0:
        return None
    stride = 1
    while -(-q.shape[0] // stride) > cap:
        stride *= 2
    return q[::stride].transpose(0, 1).contiguous()


def selection_mask(ids: Tensor, n_kv: int, n: int) -> Tensor:
    """ids [H_kv, k] (-1 pads) or shared [k] -> bool [H_kv, n]."""
    if ids.dim() == 1:
        ids = ids[None].expand(n_kv, -1)
    mask = torch.zeros(n_kv, n + 1, dtype=torch.bool)
    mask.scatter_(1, torch.where(ids < 0, n, ids).cpu(), True)  # pads land in the spare column
    return mask[:, :n]


class DenseCache:
    """Dense softmax probabilities [H_q, p + 1] and outputs [H_q, D] per (layer, step), computed once."""

    def __init__(self, layers: dict[int, Layer]) -> None:
        self.layers = layers
        self.memo: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}

    def __call__(self, layer: int, pos: int) -> tuple[Tensor, Tensor]:
        if (layer, pos) not in self.memo:
            tr = self.layers[layer]
            q, k, v = tr.q[pos], tr.k[: pos + 1], tr.v[: pos + 1]
            scale = q.shape[-1] ** -0.5
            logits = reference.score(q, k, scale=scale)  # [H_q, pos + 1]
            out, _ = reference.decode_attend(q, k, v, scale=scale)
            self.memo[(layer, pos)] = (torch.softmax(logits, -1), out.float())
        return self.memo[(layer, pos)]


def measure(tr: Layer, pos: int, host: slice, ids: Tensor, dense: tuple[Tensor, Tensor]) -> dict[str, float]:
    """Quality of one step: query at `pos`, host rows k[host], the rest of k[:pos + 1] static."""
    q, k, v = tr.q[pos], tr.k[: pos + 1], tr.v[: pos + 1]
    hq, d = q.shape
    hkv = k.shape[1]
    static = torch.cat([torch.arange(0, host.start), torch.arange(host.stop, pos + 1)])
    o_s, l_s = reference.decode_attend(q, k[static], v[static], scale=d**-0.5)
    o_r, l_r = reference.gather_attend(q, k[host], v[host], ids.cpu(), scale=d**-0.5)
    out, _ = reference.merge([o_s, o_r], [l_s, l_r])
    probs, o_dense = dense
    n_host = host.stop - host.start
    mask = selection_mask(ids, hkv, n_host)  # [H_kv, N]
    kept = probs[:, static].sum(-1) + (probs[:, host] * mask.repeat_interleave(hq // hkv, 0)).sum(-1)
    return {
        "mass_recall": float(kept.mean()),
        "rel_err": float((out.float() - o_dense).norm() / o_dense.norm().clamp_min(1e-30)),
        "attended_frac": float(mask.sum() / max(hkv * n_host, 1)),
    }


def replay(method: str, budget: int, layers: dict[int, Layer], params: ReplayParams, model_cfg: ModelConfig,
           dense: DenseCache, options: dict[str, Any] | None = None) -> list[Step]:
    """Build the retriever on the prefill, then add/select/measure step by step, layer by layer."""
    t = next(iter(layers.values())).q.shape[0]
    params.check(t)
    rcfg = RetrievalConfig(method=method, budget=budget, n_sink=params.n_sink, n_window=params.n_window,
                           query_sample=params.query_sample, options=dict(options or {}))
    retriever = make_retriever(rcfg, model_cfg, "cpu")
    prefill = t - params.steps
    host_end = prefill - params.n_window
    cap = params.query_sample if getattr(retriever, "needs_queries", True) else 0
    for layer, tr in layers.items():
        retriever.build(layer, tr.k[params.n_sink : host_end].transpose(0, 1).contiguous(),
                        query_sample(tr.q[:prefill], cap))
    steps = []
    for pos in range(prefill, t):  # token pos enters the window, token pos - n_window leaves it
        for layer, tr in layers.items():
            retriever.add(layer, tr.k[host_end : host_end + 1].transpose(0, 1).contiguous(),
                          torch.tensor([host_end]))
            t0 = time.perf_counter()
            sel = retriever.select(layer, tr.q[pos], budget)
            ms = 1e3 * (time.perf_counter() - t0)
            host = slice(params.n_sink, host_end + 1)
            q_ = measure(tr, pos, host, sel.ids, dense(layer, pos))
            n_host = host.stop - host.start
            steps.append(Step(layer=layer, pos=pos, scanned_frac=sel.scanned / (n_host * model_cfg.n_kv_heads),
                              select_ms=ms, **q_))
        host_end += 1
    return steps


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def summarize(method: str, budget: int, steps: list[Step]) -> dict[str, Any]:
    def agg(rows: list[Step]) -> dict[str, float]:
        return {
            "mass_recall": statistics.fmean(s.mass_recall for s in rows),
            "mass_recall_p10": _quantile([s.mass_recall for s in rows], 0.1),
            "rel_err": statistics.fmean(s.rel_err for s in rows),
            "rel_err_p90": _quantile([s.rel_err for s in rows], 0.9),
            "scanned_frac": statistics.fmean(s.scanned_frac for s in rows),
            "attended_frac": statistics.fmean(s.attended_frac for s in rows),
            "select_ms": statistics.median(s.select_ms for s in rows),
        }

    by_layer: dict[int, list[Step]] = {}
    for s in steps:
        by_layer.setdefault(s.layer, []).append(s)
    return {"method": method, "budget": budget, "steps": len(steps), **agg(steps),
            "per_layer": {str(x): agg(rows) for x, rows in by_layer.items()}}


def report(tensors: dict[str, Tensor], methods: list[str], budgets: list[int], params: ReplayParams | None = None,
           meta: dict[str, Any] | None = None, options: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Replay every (method, budget) on the trace; returns {"meta", "skipped", "results"}."""
    params = params or ReplayParams()
    meta = dict(meta or {})
    layers = layers_of(tensors)
    t = next(iter(layers.values())).q.shape[0]
    params.check(t)
    if not budgets or any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in budgets):
        raise ValueError(f"budgets must be ints >= 0 (host tokens per step), got {budgets}")
    skipped = {m: "method 'dense' skipped: it is the reference every method is measured against"
               for m in methods if m == "dense"}
    skipped |= {m: why for m in methods if m not in skipped and (why := method_unavailable(m))}
    cfg = model_config(layers, meta.get("n_layers"))
    dense = DenseCache(layers)
    results = []
    for method in (m for m in methods if m not in skipped):
        for budget in budgets:
            steps = replay(method, budget, layers, params, cfg, dense, (options or {}).get(method))
            results.append(summarize(method, budget, steps))
    meta.update({"tokens": t, "layers": sorted(layers), "machine": machine_label(), **asdict(params),
                 "host_tokens_first_step": t - params.steps - params.n_window - params.n_sink + 1})
    return {"meta": meta, "skipped": skipped, "results": results}


# ----------------------------------------------------------------------------- reports


def markdown(result: dict[str, Any], name: str) -> str:
    m = result["meta"]
    lines = [
        f"## {name}",
        "",
        (f"- trace: {m.get('trace', name)}; model {Path(str(m.get('model', '?'))).name}, {m['tokens']} tokens "
         f"(task {m.get('task', '?')}, haystack {m.get('haystack', '?')}, the last {m.get('generated', 0)} "
         f"generated greedily), layers {m['layers']}"),
        (f"- replay: last {m['steps']} tokens as decode steps; sink {m['n_sink']}, window {m['n_window']}; "
         f"host tier {m['host_tokens_first_step']} tokens at the first step; prefill query sample "
         f"<= {m['query_sample']}"),
        f"- machine: {m['machine']}",
    ]
    lines += [f"- {why}" for why in result["skipped"].values()]
    lines += ["", "| method | budget | mass recall (p10) | out rel. err (p90) | scanned | attended | select ms (median) |",
              "|---|---|---|---|---|---|---|"]
    for r in result["results"]:
        lines.append(f"| {r['method']} | {r['budget']} | {r['mass_recall']:.3f} ({r['mass_recall_p10']:.3f}) "
                     f"| {r['rel_err']:.4f} ({r['rel_err_p90']:.4f}) | {r['scanned_frac']:.3f} "
                     f"| {r['attended_frac']:.3f} | {r['select_ms']:.2f} |")
    cols = [f"{r['method']}@{r['budget']}" for r in result["results"]]
    lines += ["", "Per layer: output relative error (mass recall).", "",
              "| layer | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for layer in m["layers"]:
        cells = [r["per_layer"][str(layer)] for r in result["results"]]
        lines.append(f"| {layer} | " + " | ".join(f"{c['rel_err']:.4f} ({c['mass_recall']:.3f})" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_doc(path: Path, section: str, name: str) -> None:
    """Put the section between this trace's markers; other traces' sections are kept."""
    begin, end = f"<!-- attention_report:{name}:begin -->", f"<!-- attention_report:{name}:end -->"
    block = f"{begin}\n{section}{end}"
    text = path.read_text() if path.exists() else "# Attention-level quality of retrievers on real traces\n"
    i, j = text.find(begin), text.find(end)
    text = text[:i] + block + text[j + len(end):] if 0 <= i < j else text.rstrip("\n") + f"\n\n{block}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description="attention mass recall and output error of retrievers on a trace")
    ap.add_argument("--trace", type=Path, required=True, help="safetensors from python -m kvloft.eval.traces")
    ap.add_argument("--methods", default="exact,tokenselect,recycled")
    ap.add_argument("--budget", default="256,1024", help="comma list of host tokens per step")
    ap.add_argument("--layers", default=None, help="comma list of trace layers (default: all)")
    ap.add_argument("--steps", type=int, default=64, help="decode steps replayed (the last tokens)")
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--query-sample", type=int, default=2048)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--doc", type=Path, default=DOC)
    args = ap.parse_args(argv)
    tensors, meta = load_trace(args.trace, _ints(args.layers) if args.layers else None)
    params = ReplayParams(n_sink=args.sink, n_window=args.window, steps=args.steps, query_sample=args.query_sample)
    methods = [x.strip() for x in args.methods.split(",") if x.strip()]
    result = report(tensors, methods, _ints(args.budget), params, {**meta, "trace": str(args.trace)})
    for why in result["skipped"].values():
        print(why)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    write_doc(args.doc, markdown(result, args.trace.stem), args.trace.stem)
    print(json.dumps({"out": str(args.out), "doc": str(args.doc),
                      "mass_recall": {f"{r['method']}@{r['budget']}": round(r["mass_recall"], 3)
                                      for r in result["results"]}}))
    return result


if __name__ == "__main__":
    main()

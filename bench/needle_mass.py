"""Where retrievers lose a needle on a real trace: needle mass per layer, and GQA ranking rules.

Two measurements on a trace from `python -m kvloft.eval.traces ... --generate 12` (the
answer's digits are read from the generated tokens and located in the prompt):

- variants: each {"name": [method, budget, options]} is replayed as kvloft.eval.attention_report
  does (build on the prefill, then add/select step by step) over the answer steps; per layer:
  mass recall, and needle mass = the share of dense attention on the needle's tokens that
  the selection keeps (summed over query heads, over the answer steps);
- gqa: mass recall per layer of a shared top-k per KV head ranked by the group's max logit
  (ExactRetriever), max or sum of the heads' probabilities (over all keys, or over the host
  keys only as ExactRetriever(rank="prob") computes them), and of an unshared top-k per
  query head (the bound of any shared selection).

    python bench/needle_mass.py --trace bench/traces/qwen_passkey_8k.safetensors \\
        --variants '{"actqkv@1024": ["actqkv", 1024, {}]}' --sinks 30,40,64 --gqa 1024,2048 \\
        --out bench/results/qwen-cpu/needle_mass_passkey.json

Moving the sink (the host tier's first row) moves ActQKV's block edges over the needle.
Prints one JSON line last; docs/methods.md ("Limits") quotes the figures.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import Tensor

from kvloft.config import RetrievalConfig
from kvloft.eval.attention_report import (
    DenseCache,
    Layer,
    layers_of,
    model_config,
    query_sample,
    selection_mask,
)
from kvloft.eval.traces import load_trace
from kvloft.index.base import make_retriever

WINDOW = 512
DIGITS = "0123456789"


def needle_rows(ids: list[int], prompt: int, tokenizer_digits: dict[int, str], n_digits: int) -> list[int]:
    """Positions in the prompt of every copy of the first n_digits digit tokens generated."""
    gen = [t for t in ids[prompt:] if t in tokenizer_digits][:n_digits]
    return [i + j for i in range(prompt - len(gen)) if ids[i : i + len(gen)] == gen for j in range(len(gen))]


def replay(method: str, budget: int, options: dict, layers: dict[int, Layer], cfg, steps: int,
           sink: int) -> dict[tuple[int, int], tuple[Tensor, int]]:
    """{(layer, pos): (selection ids, host rows end)} over the last `steps` positions."""
    t = next(iter(layers.values())).q.shape[0]
    r = make_retriever(RetrievalConfig(method=method, budget=budget, n_sink=sink, n_window=WINDOW,
                                       options=options), cfg, "cpu")
    prefill = t - steps
    host_end = prefill - WINDOW
    cap = 2048 if getattr(r, "needs_queries", True) else 0
    for layer, tr in layers.items():
        r.build(layer, tr.k[sink:host_end].transpose(0, 1).contiguous(), query_sample(tr.q[:prefill], cap))
    out = {}
    for pos in range(prefill, t):
        for layer, tr in layers.items():
            r.add(layer, tr.k[host_end : host_end + 1].transpose(0, 1).contiguous(), torch.tensor([host_end]))
            out[(layer, pos)] = (r.select(layer, tr.q[pos], budget).ids.cpu(), host_end + 1)
        host_end += 1
    return out


def needle_mass(sels, layers: dict[int, Layer], dense: DenseCache, needle: list[int], sink: int) -> dict[int, dict]:
    """Per layer: mass recall, dense needle share (per head, mean) and the needle mass kept."""
    acc: dict[int, dict[str, float]] = {}
    rows = torch.tensor(needle)
    for (layer, pos), (ids, host_stop) in sels.items():
        probs, _ = dense(layer, pos)  # [H_q, pos + 1]
        hq, hkv = probs.shape[0], layers[layer].k.shape[1]
        keep = torch.ones(hq, pos + 1, dtype=torch.bool)
        keep[:, sink:host_stop] = selection_mask(ids, hkv, host_stop - sink).repeat_interleave(hq // hkv, 0)
        a = acc.setdefault(layer, {"mass_recall": 0.0, "needle_dense": 0.0, "needle_kept": 0.0, "steps": 0})
        a["mass_recall"] += float((probs * keep).sum(-1).mean())
        a["needle_dense"] += float(probs[:, rows].sum())
        a["needle_kept"] += float((probs[:, rows] * keep[:, rows]).sum())
        a["steps"] += 1
    return {layer: {"mass_recall": a["mass_recall"] / a["steps"],
                    "needle_share": a["needle_dense"] / (a["steps"] * layers[layer].q.shape[1]),
                    "needle_mass": a["needle_kept"] / max(a["needle_dense"], 1e-12)} for layer, a in acc.items()}


def gqa_rules(layers: dict[int, Layer], positions: range, budgets: list[int], sink: int) -> dict[int, dict]:
    """Mass recall per layer of shared selections under each ranking rule, and per head unshared."""
    out = {}
    for layer, tr in layers.items():
        hq, hkv = tr.q.shape[1], tr.k.shape[1]
        g = hq // hkv
        acc: dict[str, float] = {}
        for pos in positions:
            host = slice(sink, pos - WINDOW + 1)
            k = tr.k[: pos + 1].repeat_interleave(g, 1)  # [n, H_q, D]
            logits = torch.einsum("hd,nhd->hn", tr.q[pos], k) * tr.q.shape[-1] ** -0.5  # [H_q, n]
            p = torch.softmax(logits, -1)
            static = p.sum(-1) - p[:, host].sum(-1)
            ph, lh = p[:, host], logits[:, host]
            for b in budgets:
                kept = {"per_head": ph.topk(b, -1).values.sum(-1)}
                ph_host = torch.softmax(lh, -1)  # what ExactRetriever(rank="prob") sees: host keys only
                for rule, src, red in (("max_logit", lh, "max"), ("max_prob", ph, "max"), ("sum_prob", ph, "sum"),
                                       ("max_prob_host", ph_host, "max")):
                    grp = src.view(hkv, g, -1)
                    ids = (grp.amax(1) if red == "max" else grp.sum(1)).topk(b, -1).indices  # [H_kv, b]
                    kept[rule] = ph.gather(1, ids.repeat_interleave(g, 0)).sum(-1)
                for rule, v in kept.items():
                    key = f"{rule}@{b}"
                    acc[key] = acc.get(key, 0.0) + float((static + v).mean()) / len(positions)
        out[layer] = acc
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", type=Path, required=True)
    ap.add_argument("--variants", default="{}", help='JSON {"name": [method, budget, options]}')
    ap.add_argument("--sinks", default="64")
    ap.add_argument("--gqa", default="", help="budgets for the GQA ranking rules (empty: skip)")
    ap.add_argument("--answer-steps", type=int, default=7, help="decode steps from the prompt's last query")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    tensors, meta = load_trace(args.trace)
    from safetensors import safe_open

    with safe_open(str(args.trace), "pt") as f:
        ids = f.get_tensor("ids").tolist()
    prompt, steps = meta["prompt_tokens"], args.answer_steps
    layers = {x: Layer(tr.q[: prompt + steps - 1], tr.k[: prompt + steps - 1], tr.v[: prompt + steps - 1])
              for x, tr in layers_of(tensors).items()}
    from kvloft.runtime.gguf_tokenizer import build_gguf_tokenizer, read_gguf_tokenizer_fields

    tok = build_gguf_tokenizer(read_gguf_tokenizer_fields(meta["model"]))  # the vocabulary only, no weights
    digits = {tid: d for d in DIGITS for tid in tok.encode(d, add_special_tokens=False).ids}
    needle = needle_rows(ids, prompt, digits, len(meta["references"][0]))
    cfg, dense = model_config(layers, meta["n_layers"]), DenseCache(layers)
    result = {"trace": str(args.trace), "needle_positions": needle, "variants": {}, "gqa": {}}
    for name, (method, budget, options) in json.loads(args.variants).items():
        for sink in (int(s) for s in args.sinks.split(",")):
            sels = replay(method, budget, options, layers, cfg, steps, sink)
            result["variants"][f"{name}|sink{sink}"] = needle_mass(sels, layers, dense, needle, sink)
    if args.gqa:
        budgets = [int(b) for b in args.gqa.split(",")]
        result["gqa"] = gqa_rules(layers, range(prompt - 1, prompt + steps - 1), budgets, 64)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({"out": str(args.out), "needle": needle, "variants": list(result["variants"])}))


if __name__ == "__main__":
    main()

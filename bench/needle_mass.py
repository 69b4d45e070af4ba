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

- hip (`--hip 2048:8,8192:32`, budget:chunk pairs): HiP's pruning stage taken apart with each
  answer step's query (hip_ladder): shared rows, shared chunks with a perfect search, HiP's
  hierarchical search, chunks per KV head, z-scored logits; and the needle chunk's rank under
  each chunk score ("needle_rank", median over the answer steps).

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
from kvloft.index.key_moments import KeyMoments
from kvloft.kernels.hip_stage import hip_stage1_reference

WINDOW = 512
DIGITS = "0123456789"


def needle_rows(ids: list[int], prompt: int, tokenizer_digits: dict[int, str], n_digits: int) -> list[int]:
    """Positions in the prompt of every copy of the first n_digits digit tokens generated."""
    gen = [t for t in ids[prompt:] if t in tokenizer_digits][:n_digits]
    return [i + j for i in range(prompt - len(gen)) if ids[i : i + len(gen)] == gen for j in range(len(gen))]


def value_rows(ids: list[int], prompt: int, tokenizer_digits: dict[int, str], value: str) -> list[int]:
    """Positions in the prompt of every copy of `value`'s digit tokens (one token per digit)."""
    ids_of = {d: tid for tid, d in tokenizer_digits.items()}
    return needle_rows(ids[:prompt] + [ids_of[c] for c in value], prompt, tokenizer_digits, len(value))


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


def shared_chunk_pick(score: Tensor, chunk: int, budget: int) -> Tensor:
    """The rows of the best budget // chunk chunks (HiP's last stage, best first): score [N] -> [<= budget]."""
    n_full = score.shape[0] // chunk
    return chunk_pick(score[: n_full * chunk].view(n_full, chunk).amax(1), chunk, budget)


def chunk_pick(chunk_score: Tensor, chunk: int, budget: int) -> Tensor:
    """Rows of the best chunks by chunk_score [C] (ties to the earlier chunk), at most budget rows."""
    top = torch.sort(chunk_score, descending=True, stable=True).indices[: max(budget // chunk, 1)]
    return (top[:, None] * chunk + torch.arange(chunk)).flatten()[:budget]


def chunk_rank(chunk_score: Tensor, chunk: int, rows: Tensor) -> int:
    """1-based rank of the best chunk holding one of rows [r] (host-relative) by chunk_score [C]."""
    own = torch.unique(rows // chunk)
    own = own[own < chunk_score.shape[0]]
    if own.numel() == 0:
        return -1
    return int((chunk_score > chunk_score[own].max()).sum()) + 1


def hip_ladder(layers: dict[int, Layer], positions: range, budget: int, chunk: int, needle: list[int],
               sink: int) -> tuple[dict[str, dict[tuple[int, int], tuple[Tensor, int]]], dict[tuple[int, int], dict]]:
    """Selections, recomputed with each step's query, that take HiP's last stage apart step by step.

    - exact: per KV head, top-budget tokens by the group's max logit (ExactRetriever);
    - shared_tokens: one top-budget for both KV heads by the max logit over all query heads
      (HiP's probe score, every row scored);
    - shared_chunks: the same score, best budget // chunk chunks by their best row (a perfect
      search inside each chunk);
    - hip_first / hip_middle: the hierarchical top-1 search of kernels/hip_stage.py (HiP);
    - kv_chunks: per KV head, best chunks by its own group's max logit (a mask per KV head);
    - z_chunks: one mask, best chunks by the max over query heads of z-scored logits
      (q_h . (k - mean) / sd_h; mean [H_kv, D] and covariance of the host keys at the first
      step, sd_h^2 = q_h^T cov q_h): heads on a common scale before the max;
    - hipz_first / hipz_middle: HiP's search run on keys minus that mean with q_h / sd_h;
    - hipr_first / hipr_middle: the option itself (HipParams rank="z"): HiP's search with
      q'_h and the kernel's per-head bias from running key moments (index/key_moments.py),
      updated with each step's new host rows. The whole multi-stage retriever with it runs
      through --variants, e.g. {"hipz@2048": ["hip", 2048, {"rank": "z", "probe": "middle"}]}.
    Returns ({name: {(layer, pos): (ids, host rows end)}}, {(layer, pos): {score: the needle
    chunk's 1-based rank}}).
    """
    sels: dict[str, dict] = {k: {} for k in ("exact", "shared_tokens", "shared_chunks", "hip_first",
                                             "hip_middle", "kv_chunks", "z_chunks", "hipz_first", "hipz_middle",
                                             "hipr_first", "hipr_middle")}
    all_ranks: dict[tuple[int, int], dict] = {}
    for layer, tr in layers.items():
        hq, hkv = tr.q.shape[1], tr.k.shape[1]
        first = tr.k[sink : positions[0] - WINDOW + 1]  # [N0, H_kv, D] host rows at the first step
        mean = first.mean(0)  # [H_kv, D]
        cov = torch.einsum("nkd,nke->kde", first - mean, first - mean) / first.shape[0]  # [H_kv, D, D]
        moments = KeyMoments(hkv, tr.k.shape[2], torch.device("cpu"))  # rank="z"'s running statistics
        for pos in positions:
            stop = pos - WINDOW + 1
            kh, q = tr.k[sink:stop], tr.q[pos]  # [N, H_kv, D], [H_q, D]
            moments.add(kh[moments.count :])
            n = kh.shape[0]
            logits = torch.einsum("hd,nhd->hn", q, kh.repeat_interleave(hq // hkv, 1))  # [H_q, N]
            tok_kv = logits.view(hkv, hq // hkv, n).amax(1)  # [H_kv, N]
            tok = tok_kv.amax(0)  # [N]: HiP's probe score of every row
            n_full = n // chunk
            sels["exact"][(layer, pos)] = (tok_kv.topk(budget, -1).indices, stop)
            sels["shared_tokens"][(layer, pos)] = (tok.topk(budget).indices, stop)
            sels["shared_chunks"][(layer, pos)] = (shared_chunk_pick(tok, chunk, budget), stop)
            sels["kv_chunks"][(layer, pos)] = (torch.stack([shared_chunk_pick(t, chunk, budget) for t in tok_kv]), stop)
            rows = torch.tensor([r - sink for r in needle if sink <= r < stop])
            ranks = {"shared_chunks": chunk_rank(tok[: n_full * chunk].view(n_full, chunk).amax(1), chunk, rows)}
            for kv in range(hkv):
                ranks[f"kv{kv}_chunks"] = chunk_rank(tok_kv[kv, : n_full * chunk].view(n_full, chunk).amax(1), chunk, rows)
            for probe in ("first", "middle"):
                score = hip_stage1_reference(kh, q, chunk, probe)[1][:n_full]
                sels[f"hip_{probe}"][(layer, pos)] = (chunk_pick(score, chunk, budget), stop)
                ranks[f"hip_{probe}"] = chunk_rank(score, chunk, rows)
            sd = torch.einsum("hd,hde,he->h", q, cov.repeat_interleave(hq // hkv, 0), q).sqrt()  # [H_q]
            z = (logits - torch.einsum("hd,hd->h", q, mean.repeat_interleave(hq // hkv, 0))[:, None]) / sd[:, None]
            sels["z_chunks"][(layer, pos)] = (shared_chunk_pick(z.amax(0), chunk, budget), stop)
            ranks["z_chunks"] = chunk_rank(z.amax(0)[: n_full * chunk].view(n_full, chunk).amax(1), chunk, rows)
            for probe in ("first", "middle"):
                score = hip_stage1_reference(kh - mean, q / sd[:, None], chunk, probe)[1][:n_full]
                sels[f"hipz_{probe}"][(layer, pos)] = (chunk_pick(score, chunk, budget), stop)
                ranks[f"hipz_{probe}"] = chunk_rank(score, chunk, rows)
                q_z, bias = moments.zscore(q)
                score = hip_stage1_reference(kh, q_z, chunk, probe, bias)[1][:n_full]
                sels[f"hipr_{probe}"][(layer, pos)] = (chunk_pick(score, chunk, budget), stop)
                ranks[f"hipr_{probe}"] = chunk_rank(score, chunk, rows)
            all_ranks[(layer, pos)] = ranks
    return sels, all_ranks


def rank_summary(ranks: dict[tuple[int, int], dict], layers: list[int], positions: range) -> dict[int, dict[str, float]]:
    """Per layer: median over the answer steps of the needle chunk's rank under each chunk score."""
    out = {}
    for layer in layers:
        per = [ranks[(layer, pos)] for pos in positions]
        out[layer] = {k: float(torch.tensor([p[k] for p in per], dtype=torch.float).median()) for k in per[0]}
    return out


def needle_share_kv(layers: dict[int, Layer], dense: DenseCache, positions: range, needle: list[int]) -> dict:
    """Per layer: the dense needle mass of each KV head's group (summed over its query heads, mean of steps)."""
    out = {}
    rows = torch.tensor(needle)
    for layer, tr in layers.items():
        hq, hkv = tr.q.shape[1], tr.k.shape[1]
        acc = torch.zeros(hkv)
        for pos in positions:
            probs, _ = dense(layer, pos)
            acc += probs[:, rows].sum(-1).view(hkv, hq // hkv).sum(-1) / len(positions)
        out[layer] = [round(float(a), 4) for a in acc]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", type=Path, required=True)
    ap.add_argument("--variants", default="{}", help='JSON {"name": [method, budget, options]}')
    ap.add_argument("--sinks", default="64")
    ap.add_argument("--gqa", default="", help="budgets for the GQA ranking rules (empty: skip)")
    ap.add_argument("--hip", default="", help="budget:chunk pairs for the HiP ladder, e.g. 2048:8,1024:8")
    ap.add_argument("--answer-steps", type=int, default=7, help="decode steps from the prompt's last query")
    ap.add_argument("--needle", default="answer",
                    help="answer: the digits the trace generated; reference: the task's expected value "
                         "(where dense answered a distractor); or the digits of a value in the prompt")
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
    if args.needle != "answer":
        value = meta["references"][0] if args.needle == "reference" else args.needle
        needle = value_rows(ids, prompt, digits, value)
    else:
        needle = needle_rows(ids, prompt, digits, len(meta["references"][0]))
    if not needle:
        raise SystemExit(f"the needle ({args.needle}) is nowhere in the prompt; name its digits with --needle")
    cfg, dense = model_config(layers, meta["n_layers"]), DenseCache(layers)
    result = {"trace": str(args.trace), "needle": args.needle, "answer_steps": steps, "needle_positions": needle,
              "variants": {}, "gqa": {}}
    for name, (method, budget, options) in json.loads(args.variants).items():
        for sink in (int(s) for s in args.sinks.split(",")):
            sels = replay(method, budget, options, layers, cfg, steps, sink)
            result["variants"][f"{name}|sink{sink}"] = needle_mass(sels, layers, dense, needle, sink)
    if args.gqa:
        budgets = [int(b) for b in args.gqa.split(",")]
        result["gqa"] = gqa_rules(layers, range(prompt - 1, prompt + steps - 1), budgets, 64)
    positions = range(prompt - 1, prompt + steps - 1)
    for pair in filter(None, args.hip.split(",")):
        budget, chunk = (int(x) for x in pair.split(":"))
        ladder, ranks = hip_ladder(layers, positions, budget, chunk, needle, 64)
        for name, sels in ladder.items():
            result["variants"][f"ladder_{name}@{budget}:{chunk}|sink64"] = needle_mass(sels, layers, dense, needle, 64)
        result.setdefault("needle_rank", {})[f"{budget}:{chunk}"] = rank_summary(ranks, list(layers), positions)
    if args.hip:
        result["needle_share_kv"] = needle_share_kv(layers, dense, positions, needle)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({"out": str(args.out), "needle": needle, "variants": list(result["variants"])}))


if __name__ == "__main__":
    main()

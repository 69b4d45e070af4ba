"""attention_graph build time per 1K tokens: one build() after prefill vs extend() per chunk.

One layer of a model shape (`--shape`: smollm2-135m, qwen2.5-0.5b-shape, any PRESETS name),
synthetic OOD keys and one query per token (kvloft.index.synthetic, "synthetic-ood"; keys
and queries of a GQA group share a latent per token, as a trace does). The prompt arrives
in chunks of `--chunk` tokens; a QuerySampler keeps the strided sample the runtime keeps
(at most `--query-sample` tokens) and, as TieredAttention does, feeds a chunk's queries that
the final sample keeps. Every token's key is a host row (the window left out).

- one-shot: build(keys, the final sample) once all chunks are in, timed until the graphs
  are done (the time a request waits after prefill);
- incremental: extend(chunk keys, the chunk's sampled queries) per chunk, as the runtime
  feeds it, each chunk's jobs waited for before the next is handed over (as if the chunk's
  prefill on the device took at least that long): `total_s` is their sum, `tail_s` the
  last chunk's (the wait after prefill), `max_chunk_s` the longest, `held_s` the caller's
  time inside extend().

Both report wall seconds per 1K tokens for the layer (all KV heads, `build_threads`
workers) and CPU seconds per 1K tokens (stats()["graph_s"]: the pool's job time summed),
plus recall@k against exact top-k and the fraction of keys scanned, on `--test` unseen
queries. The exact kNN runs on `--device` (cuda: the GPU; the graph is numba on the CPU).
numba compiles on a toy build first, so compile time is not counted. Prints one JSON line
per size and writes bench/results/graph_build[_TAG].json.

`--model NAME --tokens N` instead feeds a real model (kvloft.load_model(NAME); the repo's
docs as the prompt text) in a Session with attention_graph, once built after prefill and
once incrementally: prefill seconds, the wait after prefill until every graph is done,
and the graphs' CPU seconds per 1K prompt tokens (all layers and heads).

    python bench/graph_build.py --shape smollm2-135m --keys 8192 16384
    python bench/graph_build.py --shape qwen2.5-0.5b-shape --keys 8192 16384 32768 --device cuda --tag h100
    python bench/graph_build.py --model qwen2.5-0.5b --tokens 32768 --device cuda --tag h100_qwen
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from kvloft.config import PRESETS, ModelConfig, RetrievalConfig
from kvloft.index.base import make_retriever
from kvloft.index.synthetic import ood_attention_data
from kvloft.runtime.queries import QuerySampler


def _retriever(cfg: ModelConfig, device: str, threads: int, options: dict | None = None):
    rcfg = RetrievalConfig(method="attention_graph", options={"build_threads": threads, **(options or {})})
    return make_retriever(rcfg, cfg, torch.device(device))


def _wait(r) -> None:
    r.graphs  # noqa: B018 -- waits for every queued job
    if r.device.type == "cuda":
        torch.cuda.synchronize()


def _warm(cfg: ModelConfig, device: str) -> None:
    """Compile the numba kernels (build and extend) on a toy layer."""
    d = ood_attention_data(600, 200, 1, dim=cfg.head_dim, n_kv_heads=cfg.n_kv_heads, group=cfg.group_size)
    r = _retriever(cfg, device, 1)
    r.build(0, d.keys, d.train_queries)
    r.extend(1, d.keys[:, :300], d.train_queries[:, :100])
    r.extend(1, d.keys[:, 300:], d.train_queries[:, 100:])
    _wait(r)
    r.close()


def _chunks(n: int, chunk: int, sample: int, train: torch.Tensor):
    """(start, stop, sampled queries [H_q, m, D]) per chunk, and the final sample [H_q, M, D]."""
    sampler = QuerySampler(1, sample)
    out = []
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        sample = sampler.observe(0, train[:, s:e].transpose(0, 1), torch.arange(s, e))
        q, _ = sampler.final_part(sample, n)  # as TieredAttention feeds the index
        out.append((s, e, q.transpose(0, 1).contiguous()))
    return out, sampler.sample(0)


def _quality(r, keys: torch.Tensor, test: torch.Tensor, k: int) -> tuple[float, float]:
    """Mean recall@k of select() against the exact top-k (group-max logits) and scanned fraction."""
    hkv, n, _ = keys.shape
    group = test.shape[0] // hkv
    hits, scanned = [], []
    for t in range(test.shape[1]):
        q = test[:, t]  # [H_q, D]
        logits = torch.einsum("hgd,hnd->hgn", q.view(hkv, group, -1), keys).amax(1)  # [H_kv, N]
        truth = logits.topk(k, dim=1).indices
        sel = r.select(0, q, k)
        hits += [len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(sel.ids.cpu(), truth)]
        scanned.append(sel.scanned / (hkv * n))
    return float(np.mean(hits)), float(np.mean(scanned))


def run_size(cfg: ModelConfig, n: int, args) -> dict:
    d = ood_attention_data(n, n, args.test, dim=cfg.head_dim, n_kv_heads=cfg.n_kv_heads, group=cfg.group_size,
                           seed=args.seed)
    chunks, final = _chunks(n, args.chunk, args.query_sample, d.train_queries)
    per_1k = 1000.0 / n

    one = _retriever(cfg, args.device, args.threads)
    t0 = time.perf_counter()
    one.build(0, d.keys, final)
    _wait(one)
    one_s = time.perf_counter() - t0

    inc = _retriever(cfg, args.device, args.threads, args.options)
    per_chunk = []
    for s, e, q in chunks:
        t0 = time.perf_counter()
        inc.extend(0, d.keys[:, s:e], q)
        _wait(inc)
        per_chunk.append(time.perf_counter() - t0)

    rec_one, scan_one = _quality(one, d.keys, d.test_queries, args.k)
    rec_inc, scan_inc = _quality(inc, d.keys, d.test_queries, args.k)
    res = {
        "shape": cfg.name, "keys": n, "kv_heads": cfg.n_kv_heads, "group": cfg.group_size, "chunk": args.chunk,
        "sampled_queries": int(final.shape[1]), "incremental_options": args.options,
        "fed_queries": int(sum(q.shape[1] for _, _, q in chunks)),
        "one_shot": {"wall_s": round(one_s, 3), "wall_s_per_1k": round(one_s * per_1k, 4),
                     "cpu_s_per_1k": round(one.stats()["graph_s"] * per_1k, 4),
                     "recall": round(rec_one, 4), "scanned": round(scan_one, 4)},
        "incremental": {"total_s": round(sum(per_chunk), 3), "tail_s": round(per_chunk[-1], 3),
                        "max_chunk_s": round(max(per_chunk), 3), "held_s": round(inc.stats()["build_s"], 3),
                        "total_s_per_1k": round(sum(per_chunk) * per_1k, 4),
                        "cpu_s_per_1k": round(inc.stats()["graph_s"] * per_1k, 4),
                        "recall": round(rec_inc, 4), "scanned": round(scan_inc, 4)},
    }
    one.close()
    inc.close()
    return res


def run_model(args) -> list[dict]:
    """One Session per build mode on a real model: prefill, wait after it, graph CPU s/1K."""
    import kvloft
    from kvloft import RuntimeConfig, Session

    model = kvloft.load_model(args.model, device=args.device)
    docs = sorted((Path(__file__).parent.parent / "docs").glob("*.md"))
    ids = model.tokenizer.encode("\n\n".join(p.read_text() for p in docs))
    while len(ids) < args.tokens:
        ids = ids + ids
    ids = ids[: args.tokens]
    out = []
    for incremental in (False, True):
        rcfg = RetrievalConfig(method="attention_graph", budget=1024, options={"incremental": incremental})
        s = Session(model, rcfg, RuntimeConfig(progress=False))
        t0 = time.perf_counter()
        s.feed(ids)
        t1 = time.perf_counter()
        s.backend.retriever.graphs  # noqa: B018 -- waits for every graph
        t2 = time.perf_counter()
        graph_s = s.backend.retriever.stats()["graph_s"]
        res = {"model": args.model, "tokens": len(ids), "incremental": incremental, "prefill_s": round(t1 - t0, 2),
               "wait_after_prefill_s": round(t2 - t1, 3), "host_rows": s.backend.cache[0].n_host,
               "graph_cpu_s_per_1k_tokens": round(graph_s * 1000 / len(ids), 3)}
        print(json.dumps(res), flush=True)
        out.append(res)
        s.backend.retriever.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2-135m", choices=sorted(PRESETS))
    ap.add_argument("--keys", type=int, nargs="+", default=[8192, 16384])
    ap.add_argument("--chunk", type=int, default=1024, help="prefill chunk (tokens)")
    ap.add_argument("--query-sample", type=int, default=2048, help="RetrievalConfig.query_sample")
    ap.add_argument("--threads", type=int, default=0, help="build_threads (0: every core)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--test", type=int, default=16, help="unseen queries for recall")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=INT",
                    help="an attention_graph option of the incremental build (int), e.g. attach_reverse=8")
    ap.add_argument("--model", default="", help="a real model (kvloft.load_model) instead of synthetic keys")
    ap.add_argument("--tokens", type=int, default=8192, help="--model: prompt tokens")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    try:
        args.options = {k: int(v) for k, v in (o.split("=", 1) for o in args.option)}
    except ValueError as e:
        raise SystemExit(f"--option takes KEY=INT, got {args.option}: {e}") from e
    for name, n in (("keys", min(args.keys)), ("chunk", args.chunk), ("test", args.test), ("k", args.k)):
        if n < 1:
            raise SystemExit(f"--{name} must be >= 1, got {n}")
    if max(args.keys) > 1 << 20:
        raise SystemExit(f"--keys at most {1 << 20} (one query per token is kept in memory), got {max(args.keys)}")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    out = Path(__file__).parent / "results" / f"graph_build{'_' + args.tag if args.tag else ''}.json"
    if args.model:
        if not 1 <= args.tokens <= 1 << 20:
            raise SystemExit(f"--tokens must be in 1..{1 << 20}, got {args.tokens}")
        out.write_text(json.dumps(run_model(args), indent=1) + "\n")
        return
    cfg = PRESETS[args.shape]
    _warm(cfg, args.device)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    results = []
    for n in args.keys:
        res = run_size(cfg, n, args) | {"device": device, "cpus": os.cpu_count()}
        results.append(res)
        print(json.dumps(res), flush=True)
    out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

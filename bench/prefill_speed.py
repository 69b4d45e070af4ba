"""Prefill tokens/s: kvloft's Session.feed against HF transformers (SDPA) on the same tokens.

Random bf16 weights in a preset's shape (default qwen2.5-0.5b-shape, the 32K model's shape) on
one GPU. kvloft rows: one per (method, prefill chunk); HF: one forward of the whole prompt with
a cache, `logits_to_keep=1`. Each row is the median of --repeats timed runs after one warm-up.
Chunk "auto" is RuntimeConfig(prefill_chunk=None): the session picks the chunk from the memory
plan within --gpu-budget (and the card's free memory); the row records the chunk it took.

    python bench/prefill_speed.py --lengths 8k,30k --chunks 512,4096,16384,auto --methods dense,exact --out DIR
    python bench/prefill_speed.py --preset llama3-8b --lengths 128k --chunks 512,auto --methods exact \
        --gpu-budget 24GiB --no-hf --repeats 1
    python bench/prefill_speed.py --profile dense:4096:8k    # top CUDA kernels and host time of one run

Prints a table and writes prefill_speed.json under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from kvloft import RetrievalConfig, RuntimeConfig, Session, load_model
from kvloft.config import PRESETS, CacheConfig, parse_tokens


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: kernels compiled, allocator grown
    secs = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        secs.append(time.perf_counter() - t0)
    return statistics.median(secs)


def kvloft_feed(model, method: str, chunk: int | None, ids: torch.Tensor, budget: int, gpu_budget: str = "0",
                took: list | None = None):
    """A timed run: a fresh session feeds ids. chunk None = the plan's choice (appended to took)."""
    def run() -> None:
        s = Session(model, RetrievalConfig(method=method, budget=budget, n_sink=64, n_window=512),
                    RuntimeConfig(progress=False, prefill_chunk=chunk, gpu_memory_budget=gpu_budget), CacheConfig())
        s.feed(ids)
        sync()
        if took is not None:
            took.append(s.prefill_chunk)
        del s
    return run


def parse_chunk(text: str) -> int | None:
    return None if text == "auto" else int(text)


def hf_model(preset: str, device: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM, LlamaConfig, LlamaForCausalLM

    cfg = PRESETS[preset]
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                  num_key_value_heads=cfg.n_kv_heads, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
                  max_position_embeddings=max(cfg.max_position_embeddings, 1 << 20),
                  tie_word_embeddings=cfg.tie_word_embeddings, attn_implementation="sdpa")
    if cfg.attention_bias:
        net = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        net = LlamaForCausalLM(LlamaConfig(**common))
    return net.to(device=device, dtype=torch.bfloat16).eval()


def hf_feed(net, ids: torch.Tensor):
    @torch.inference_mode()
    def run() -> None:
        net(input_ids=ids[None], use_cache=True, logits_to_keep=1)
        sync()
    return run


def profile(model, spec: str, budget: int) -> None:
    method, chunk, length = spec.split(":")
    ids = torch.randint(1, model.config.vocab_size, (parse_tokens(length),))
    run = kvloft_feed(model, method, parse_chunk(chunk), ids, budget)
    run()
    from torch.profiler import ProfilerActivity, profile as prof

    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        t0 = time.perf_counter()
        run()
        wall = time.perf_counter() - t0
    print(f"{spec}: {wall:.3f} s wall")
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    print(p.key_averages().table(sort_by="cpu_time_total", row_limit=25))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen2.5-0.5b-shape")
    ap.add_argument("--lengths", default="8k,30k")
    ap.add_argument("--chunks", default="512,4096,16384,auto", help="prefill chunks; auto = the plan's choice")
    ap.add_argument("--methods", default="dense,exact")
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--gpu-budget", default="0", help="RuntimeConfig.gpu_memory_budget, e.g. 24GiB (0 = none)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--profile", default="", help="METHOD:CHUNK:LENGTH, profile one run and stop")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(args.preset, device=dev, dtype="bfloat16" if dev == "cuda" else "float32")
    if args.profile:
        profile(model, args.profile, args.budget)
        return
    rows = []
    gen = torch.Generator().manual_seed(0)
    lengths = [parse_tokens(x) for x in args.lengths.split(",")]
    for n in lengths:
        ids = torch.randint(1, model.config.vocab_size, (n,), generator=gen)
        for method in args.methods.split(","):
            for chunk in [parse_chunk(c) for c in args.chunks.split(",")]:
                row = {"system": "kvloft", "method": method, "chunk": chunk or "auto", "tokens": n}
                took: list[int] = []
                try:
                    secs = timed(kvloft_feed(model, method, chunk, ids, args.budget, args.gpu_budget, took),
                                 args.repeats)
                    row.update(seconds=round(secs, 3), tokens_per_s=round(n / secs))
                    if chunk is None:
                        row["chunk"] = f"auto={took[-1]}"
                except (torch.OutOfMemoryError, RuntimeError, ValueError) as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                rows.append(row)
                print(row, flush=True)
    if not args.no_hf:
        net = hf_model(args.preset, dev)
        for n in lengths:
            ids = torch.randint(1, model.config.vocab_size, (n,), generator=gen).to(dev)
            row = {"system": "hf-sdpa", "method": "dense", "chunk": n, "tokens": n}
            try:
                secs = timed(hf_feed(net, ids), args.repeats)
                row.update(seconds=round(secs, 3), tokens_per_s=round(n / secs))
            except (torch.OutOfMemoryError, RuntimeError) as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
            print(row, flush=True)
    card = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    print(f"\n{args.preset}, {card}, {model.dtype}")
    print("| system | method | chunk | tokens | s | tokens/s |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['system']} | {r['method']} | {r['chunk']} | {r['tokens']} | {r.get('seconds', '-')} | "
              f"{r.get('tokens_per_s', r.get('error', '-'))} |")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "prefill_speed.json").write_text(json.dumps({"preset": args.preset, "card": card,
                                                                        "gpu_budget": args.gpu_budget,
                                                                        "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

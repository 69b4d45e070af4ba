"""The `kvloft` command line.

    kvloft demo                                  passkey in a ~6K-token haystack, dense vs exact retrieval
    kvloft generate --model smollm2 --prompt-file F --method exact --budget 256
    kvloft serve --model smollm2 --port 8000    OpenAI-compatible HTTP API
    kvloft eval --model smollm2 --tasks passkey --lengths 2k,4k --methods dense,exact --budget 256
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from kvloft.config import METHODS, CacheConfig, RetrievalConfig, RuntimeConfig, parse_tokens


def _add_retrieval_args(p: argparse.ArgumentParser, method: str = "exact") -> None:
    p.add_argument("--method", default=method, choices=METHODS)
    p.add_argument("--budget", type=int, default=256, help="host-tier tokens retrieved per step")
    p.add_argument("--sink", type=int, default=64, help="first tokens always attended")
    p.add_argument("--window", type=int, default=512, help="last tokens always attended")
    p.add_argument("--device", default="auto")
    p.add_argument("--kernels", default=None, choices=["auto", "reference", "triton"])
    p.add_argument("--weights", default="bf16", choices=["bf16", "int8", "int4"],
                   help="linear weights as loaded (bf16: the model dtype) or packed 8/4-bit")
    p.add_argument("--host-dtype", default=None, choices=["int8", "fp8"],
                   help="host-tier K/V rows in 8 bits with a scale per row and head (default: the model dtype)")


def _runtime(args) -> RuntimeConfig:
    kw = {"device": args.device}
    if args.kernels:
        kw["kernels"] = args.kernels
    return RuntimeConfig(**kw)


def _cache(args) -> CacheConfig:
    return CacheConfig(host_dtype=args.host_dtype)


def _load(args):
    from kvloft.runtime.loader import load_model

    return load_model(args.model, device=args.device, weights=args.weights)


def _run(model, prompt: str, rcfg: RetrievalConfig, runtime: RuntimeConfig, cache: CacheConfig, max_new: int):
    from kvloft.runtime.session import Session

    s = Session(model, rcfg, runtime, cache)
    t0 = time.perf_counter()
    s.feed(prompt)
    t1 = time.perf_counter()
    answer = s.generate(max_new_tokens=max_new, stop=["\n"])
    t2 = time.perf_counter()
    return answer, {"prefill_s": t1 - t0, "decode_s": t2 - t1, "stats": s.stats()}


def cmd_demo(args) -> int:
    from kvloft.eval.scoring import score
    from kvloft.eval.tasks import build_prompt, generate
    print(f"loading {args.model} ...", flush=True)
    model = _load(args)
    length = parse_tokens(args.length)
    sample = generate("passkey", model.tokenizer, length, seed=args.seed, depth=args.depth)
    prompt = build_prompt(sample)
    print(f"prompt: {sample.actual_tokens} tokens, pass key {sample.references[0]} at depth {sample.depth:.2f}")
    runtime = _runtime(args)
    rows = []
    for rcfg in (RetrievalConfig(method="dense"),
                 RetrievalConfig(method="exact", budget=args.budget, n_sink=args.sink, n_window=args.window)):
        answer, t = _run(model, prompt, rcfg, runtime, _cache(args), max_new=12)
        found = score("passkey", answer, sample.references) == 1.0
        st = t["stats"]
        attended = sample.actual_tokens if rcfg.method == "dense" else rcfg.n_sink + rcfg.n_window + rcfg.budget
        rows.append({"method": rcfg.method, "answer": answer.strip(), "found": found,
                     "keys_per_step": attended, "prefill_s": round(t["prefill_s"], 2),
                     "decode_ms_per_tok": st.get("decode_ms_per_tok"), "bytes": st["bytes"]})
        print(f"{rcfg.method:>6}: {answer.strip()!r:<28} found={found}  attends to {attended} keys/step  "
              f"prefill {t['prefill_s']:.1f} s  decode {st.get('decode_ms_per_tok')} ms/token", flush=True)
    if args.json:
        print(json.dumps({"tokens": sample.actual_tokens, "passkey": sample.references[0], "runs": rows}))
    return 0 if all(r["found"] for r in rows) else 1


def cmd_generate(args) -> int:
    from kvloft.runtime.session import Session

    text = Path(args.prompt_file).read_text() if args.prompt_file else args.prompt
    if not text:
        print("error: give --prompt-file FILE or --prompt TEXT", file=sys.stderr)
        return 2
    model = _load(args)
    rcfg = RetrievalConfig(method=args.method, budget=args.budget, n_sink=args.sink, n_window=args.window)
    s = Session(model, rcfg, _runtime(args), _cache(args))
    if args.chat:
        s.feed_chat([{"role": "user", "content": text}])
    else:
        s.feed(text)
    for piece in s.stream(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p):
        print(piece, end="", flush=True)
    print()
    if args.stats:
        print(json.dumps(s.stats(), indent=2), file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvloft", description="long-context decoding with a tiered KV cache")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="passkey retrieval from a long haystack: dense vs exact retrieval")
    d.add_argument("--model", default="smollm2")
    d.add_argument("--length", default="6000", help="prompt tokens (e.g. 6000, 8k)")
    d.add_argument("--depth", type=float, default=0.4, help="where the pass key sits (0..1)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--json", action="store_true", help="print one JSON line last")
    _add_retrieval_args(d)
    d.set_defaults(func=cmd_demo)

    g = sub.add_parser("generate", help="feed a prompt and generate")
    g.add_argument("--model", default="smollm2")
    g.add_argument("--prompt-file")
    g.add_argument("--prompt")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--stats", action="store_true", help="print session stats (JSON) to stderr")
    _add_retrieval_args(g)
    g.set_defaults(func=cmd_generate)

    from kvloft.eval.cli import add_eval_parser

    add_eval_parser(sub)

    from kvloft.server import add_serve_parser

    add_serve_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

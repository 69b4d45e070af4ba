"""The `kvloft` command line.

    kvloft demo                                  passkey in a ~6K-token haystack, dense vs exact retrieval
                                                 (one prefill; exact forked from dense: Session.fork)
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


def _decode(s, max_new: int) -> tuple[str, float]:
    """The session's answer (greedy, up to a newline) and the seconds it took."""
    t0 = time.perf_counter()
    answer = s.generate(max_new_tokens=max_new, stop=["\n"])
    return answer, time.perf_counter() - t0


def _contexts(model, prompt: str, rcfgs: list[RetrievalConfig], runtime: RuntimeConfig,
              cache: CacheConfig) -> list[tuple[object, dict]]:
    """One session per config holding the prompt: the first prefills it; each other is forked
    from it (its tiers and index built from the first's K/V: Session.fork) where the two
    prefills compute the same K/V, else prefilled on its own. Per session: how it got there."""
    from kvloft.runtime.fork import rebuild_blockers
    from kvloft.runtime.session import Session

    first = Session(model, rcfgs[0], runtime, cache)
    t0 = time.perf_counter()
    first.feed(prompt)
    out = [(first, {"prefill_s": time.perf_counter() - t0, "shared": True})]
    for rcfg in rcfgs[1:]:
        t0 = time.perf_counter()
        if rebuild_blockers(first, rcfg):  # e.g. a prompt past prefill_dense_tokens
            s = Session(model, rcfg, runtime, cache)
            s.feed(prompt)
            out.append((s, {"prefill_s": time.perf_counter() - t0}))
            continue
        s = first.fork(rcfg)
        out.append((s, {"fork_s": time.perf_counter() - t0,
                        "index_build_s": s.stats()["timings_s"].get("index_build", 0.0)}))
    return out


def cmd_demo(args) -> int:
    from kvloft.eval.scoring import score
    from kvloft.eval.tasks import build_prompt, generate
    t_start = time.perf_counter()
    print(f"loading {args.model} ...", flush=True)
    model = _load(args)
    length = parse_tokens(args.length)
    sample = generate("passkey", model.tokenizer, length, seed=args.seed, depth=args.depth)
    prompt = build_prompt(sample)
    print(f"prompt: {sample.actual_tokens} tokens, pass key {sample.references[0]} at depth {sample.depth:.2f}")
    rcfgs = [RetrievalConfig(method="dense"),
             RetrievalConfig(method="exact", budget=args.budget, n_sink=args.sink, n_window=args.window)]
    sessions = _contexts(model, prompt, rcfgs, _runtime(args), _cache(args))
    shared = sessions[0][1]["prefill_s"]
    print(f"prefill ({rcfgs[0].method}): {sample.actual_tokens} tokens in {shared:.1f} s "
          f"({sample.actual_tokens / shared:.0f} tokens/s)", flush=True)
    rows = [_demo_row(s, how, sample, score) for s, how in sessions]
    if args.json:
        print(json.dumps({"tokens": sample.actual_tokens, "passkey": sample.references[0],
                          "prefill_s": round(shared, 2), "total_s": round(time.perf_counter() - t_start, 2),
                          "runs": rows}))
    return 0 if all(r["found"] for r in rows) else 1


def _demo_row(s, how: dict, sample, score) -> dict:
    """Decode one session of the demo, print its line, return its JSON row. prefill_s: the
    seconds its context took (its own prefill, or its fork from the first run's)."""
    rcfg = s.retrieval
    answer, decode_s = _decode(s, max_new=12)
    found = score("passkey", answer, sample.references) == 1.0
    st = s.stats()
    attended = sample.actual_tokens if rcfg.method == "dense" else rcfg.n_sink + rcfg.n_window + rcfg.budget
    forked = "fork_s" in how
    row = {"method": rcfg.method, "answer": answer.strip(), "found": found, "keys_per_step": attended,
           "prefill_s": round(how["fork_s" if forked else "prefill_s"], 2), "forked": forked,
           "decode_s": round(decode_s, 2), "decode_ms_per_tok": st.get("decode_ms_per_tok"), "bytes": st["bytes"]}
    if forked:
        row["index_build_s"] = round(how["index_build_s"], 3)
        where = (f"forked from the dense prefill in {how['fork_s']:.2f} s "
                 f"(index build {how['index_build_s']:.3f} s)")
    elif how.get("shared"):
        where = "the prefill above"
    else:
        where = f"own prefill {how['prefill_s']:.1f} s"
    print(f"{rcfg.method:>6}: {answer.strip()!r:<28} found={found}  attends to {attended} keys/step  "
          f"{where}  decode {st.get('decode_ms_per_tok')} ms/token", flush=True)
    return row


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

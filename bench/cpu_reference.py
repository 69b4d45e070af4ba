"""The CPU reference path on the demo's prompt: prefill rate per chunk, decode ms/token.

SmolLM2-135M-Instruct in fp32 on the CPU (torch reference kernels), the passkey haystack of
`kvloft demo` (same length, seed and depth), fed through a Session in prefill chunks, then
greedy decode. With --hf the same weights run through HF transformers (LlamaForCausalLM,
one forward over the prompt, then decode with its cache), for the same figures.

    taskset -c 0,1 python bench/cpu_reference.py --method dense
    taskset -c 0,1 python bench/cpu_reference.py --method exact
    taskset -c 0,1 python bench/cpu_reference.py --hf
    taskset -c 0,1 python bench/cpu_reference.py --alternate 3   # dense prefill vs HF, same process
Prints one JSON line: prefill seconds and tokens/s, tokens/s of each chunk, decode ms/token.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from itertools import pairwise

import torch

import kvloft
from kvloft.config import RetrievalConfig, RuntimeConfig
from kvloft.eval.tasks import build_prompt, generate


def _hf_model(model, n_positions: int):
    """HF transformers' LlamaForCausalLM (its default attention: SDPA) on kvloft's weights."""
    import transformers

    c = model.config
    hcfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
        head_dim=c.head_dim, max_position_embeddings=max(n_positions, 8192), rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta, tie_word_embeddings=c.tie_word_embeddings)
    hf = transformers.LlamaForCausalLM(hcfg).eval()
    state = {(k if k.startswith("lm_head") else "model." + k): v for k, v in model.net.state_dict().items()}
    hf.load_state_dict(state, strict=False)  # a tied lm_head comes with the embedding
    return hf


def _hf_run(model, ids: list[int], n_decode: int) -> dict:
    hf = _hf_model(model, len(ids) + n_decode)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = hf(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        t1 = time.perf_counter()
        cache, nxt = out.past_key_values, out.logits[0, -1].argmax()
        for _ in range(n_decode):
            out = hf(nxt.view(1, 1), past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[0, -1].argmax()
        t2 = time.perf_counter()
    return {"runner": "hf", "prefill_s": round(t1 - t0, 2), "prefill_tok_s": round(len(ids) / (t1 - t0), 1),
            "decode_ms_per_tok": round(1000 * (t2 - t1) / max(n_decode, 1), 1)}


def _kvloft_run(model, ids: list[int], method: str, n_decode: int, chunk: int) -> dict:
    rcfg = (RetrievalConfig(method="dense") if method == "dense"
            else RetrievalConfig(method=method, budget=256, n_sink=64, n_window=512))  # the demo's
    s = kvloft.Session(model, rcfg, RuntimeConfig(device="cpu", progress=False, prefill_chunk=chunk))
    marks = [(0, time.perf_counter())]
    s.feed(ids, on_progress=lambda done, total: marks.append((done, time.perf_counter())))
    rates = [round((b - a) / (tb - ta)) for (a, ta), (b, tb) in pairwise(marks)]
    s.generate(max_new_tokens=n_decode, stop=None)  # greedy; EOS may end it early
    st = s.stats()
    return {"runner": "kvloft", "method": method, "prefill_s": round(marks[-1][1] - marks[0][1], 2),
            "prefill_tok_s": st["prefill_tok_per_s"], "chunk_tok_s": rates,
            "decode_ms_per_tok": st.get("decode_ms_per_tok"), "decode_tokens": st["timings_s"]["decode_tokens"]}


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _alternate(model, ids: list[int], rounds: int) -> dict:
    """Dense prefill of ids through a kvloft Session and through HF (one forward, SDPA), in
    one process, alternating which goes first each round; medians of wall and CPU seconds
    (user + sys of the process, so the figure per CPU-second when other jobs share the cores)."""
    hf = _hf_model(model, len(ids))

    def kv() -> None:
        s = kvloft.Session(model, RetrievalConfig(method="dense"), RuntimeConfig(device="cpu", progress=False))
        s.feed(ids)

    def h() -> None:
        with torch.inference_mode():
            hf(torch.tensor([ids]), use_cache=True, logits_to_keep=1)

    runs: dict[str, list[tuple[float, float, float]]] = {"kvloft": [], "hf": []}
    for r in range(rounds):
        for name, fn in (("kvloft", kv), ("hf", h))[:: 1 if r % 2 == 0 else -1]:
            w0, c0 = time.perf_counter(), _cpu_s()
            fn()
            runs[name].append((time.perf_counter() - w0, _cpu_s() - c0, os.getloadavg()[0]))
    out = {}
    for name, rows in runs.items():
        wall, cpu = statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)
        out[name] = {"wall_s": [round(r[0], 1) for r in rows], "cpu_s": [round(r[1], 1) for r in rows],
                     "load": [round(r[2], 1) for r in rows], "median_wall_s": round(wall, 1),
                     "tok_s": round(len(ids) / wall, 1), "tok_per_cpu_s": round(len(ids) / cpu, 1)}
    return {"runner": "alternate", **out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="dense", help="dense, exact, ... (the demo runs dense and exact)")
    p.add_argument("--length", type=int, default=6000, help="prompt tokens (the demo's 6000)")
    p.add_argument("--decode", type=int, default=12, help="tokens decoded after the prompt")
    p.add_argument("--chunk", type=int, default=None, help="prefill chunk tokens (default: the CPU's)")
    p.add_argument("--hf", action="store_true", help="HF transformers on the same weights instead")
    p.add_argument("--alternate", type=int, default=0, metavar="N",
                   help="N rounds of dense prefill, kvloft and HF alternating in one process (medians)")
    a = p.parse_args()
    model = kvloft.load_model("smollm2", device="cpu", dtype="float32")
    sample = generate("passkey", model.tokenizer, a.length, seed=0, depth=0.4)
    ids = model.tokenizer.encode(build_prompt(sample), add_bos=None)
    if a.alternate:
        row = _alternate(model, ids, a.alternate)
    else:
        row = _hf_run(model, ids, a.decode) if a.hf else _kvloft_run(model, ids, a.method, a.decode, a.chunk)
    print(json.dumps({"tokens": len(ids), "threads": torch.get_num_threads(), **row}))


if __name__ == "__main__":
    main()

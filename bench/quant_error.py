"""How far weights="int4" of a GGUF moves the model from its own dequantized weights.

One prompt (a passkey task of --tokens tokens) through the model three times on the CPU,
in fp32, with a plain causal attention (no KV cache, no kvloft backend):

  reference  the GGUF dequantized to fp32 (load_model(..., weights="bf16", dtype=float32))
  old        weights="int4" before Q4_K and the >4-bit types were kept: only Q4_0/Q4_1
             repack, everything else requantized to int4 group 128
             (quant_gguf.packed_tensors(..., keep_gguf=False))
  new        weights="int4" as load_model gives it now (runtime/quant_gguf.py)

For old and new: relative error ||a - b|| / ||b|| of the hidden state after every layer
and of the logits of the last --last positions, top-1 agreement of those logits, and the
relative error of each linear's dequantized weight, by GGUF type. Writes
OUT/quant_error.json and OUT/quant_error.md; prints one JSON line last.

    python bench/quant_error.py --out bench/results/quant_error_cpu
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from kvloft.eval.tasks import build_prompt, generate
from kvloft.kernels.quant import dequantize
from kvloft.runtime import catalog
from kvloft.runtime.gguf_weights import GGUFFile, hf_name
from kvloft.runtime.loader import build, load_gguf
from kvloft.runtime.quant_gguf import packed_tensors
from kvloft.runtime.quant_linear import QuantLinear, scheme


class CausalAttention:
    """Plain causal softmax attention over the chunk itself: q [T, H_q, D], k/v [T, H_kv, D]."""

    def attend(self, layer, q, k, v, positions):
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
        return o.transpose(0, 1)


@torch.inference_mode()
def run(net, ids: torch.Tensor, last: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """-> the hidden state after each layer [T, hidden] and the logits [last, V] fp32."""
    states = []
    hooks = [blk.register_forward_hook(lambda m, a, out: states.append(out.clone())) for blk in net.layers]
    try:
        x = net.embed_tokens(ids)
        pos = torch.arange(ids.numel())
        cos, sin = net.rope(pos)
        for i, blk in enumerate(net.layers):
            x = blk(x, cos, sin, i, CausalAttention(), pos)
        logits = net.head(x[-last:])
    finally:
        for h in hooks:
            h.remove()
    return states, logits


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def load_int4(path: Path, keep_gguf: bool):
    gg = GGUFFile(path)
    cfg = gg.config(name=path.stem)
    how: dict[str, int] = {}
    net = build(cfg, packed_tensors(gg, cfg, scheme("int4"), how, keep_gguf=keep_gguf), torch.device("cpu"),
                torch.float32, str(path), scheme("int4"))
    return net, how


def weight_errors(net, ref_weights: dict[str, torch.Tensor], types: dict[str, str]) -> dict[str, dict]:
    """Relative error of each QuantLinear's dequantized weight, pooled by GGUF type."""
    num, den, layout = defaultdict(float), defaultdict(float), {}
    for name, m in net.named_modules():
        if isinstance(m, QuantLinear):
            want = ref_weights[name].double()
            q = types[name]
            num[q] += (dequantize(m.packed).double() - want).pow(2).sum().item()
            den[q] += want.pow(2).sum().item()
            layout[q] = f"int{m.bits} g{m.group}"
    return {q: {"rel_err": (num[q] / den[q]) ** 0.5, "held_as": layout[q]} for q in sorted(num)}


def measure(path: Path, tokens: int, last: int) -> dict:
    t0 = time.perf_counter()
    ref = load_gguf(path, device=torch.device("cpu"), dtype=torch.float32, cache=False)
    sample = generate("passkey", ref.tokenizer, tokens, seed=0)
    ids = torch.tensor(ref.tokenizer.encode(build_prompt(sample)))
    types = {hf_name(t.name).removesuffix(".weight"): t.qtype for t in GGUFFile(path).infos}
    ref_weights = {n: m.weight.detach().clone() for n, m in ref.net.named_modules()
                   if isinstance(m, torch.nn.Linear) and n in types}
    ref_states, ref_logits = run(ref.net, ids, last)
    del ref
    out = {"model": path.name, "tokens": ids.numel(), "last": last, "device": "cpu fp32", "variants": {}}
    for label, keep in (("old", False), ("new", True)):
        net, how = load_int4(path, keep)
        states, logits = run(net, ids, last)
        out["variants"][label] = {
            "loader_stats": how,
            "hidden_rel_err": [rel(a, b) for a, b in zip(states, ref_states)],
            "logits_rel_err": rel(logits, ref_logits),
            "top1_agreement": (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item(),
            "weight_rel_err": weight_errors(net, ref_weights, types),
            "packed_bytes": sum(m.packed_bytes for m in net.modules() if isinstance(m, QuantLinear)),
        }
        del net
    out["seconds"] = time.perf_counter() - t0
    return out


def markdown(res: dict) -> str:
    old, new = res["variants"]["old"], res["variants"]["new"]
    lines = [f"# weights=\"int4\" against the fp32-dequantized GGUF: {res['model']}", "",
             (f"One passkey prompt of {res['tokens']} tokens, {res['device']}, plain causal attention; "
              f"logits of the last {res['last']} positions."), "",
             "| | old (int4 g128 requantized) | new (GGUF blocks kept) |", "| --- | --- | --- |",
             f"| logits rel. error | {old['logits_rel_err']:.4f} | {new['logits_rel_err']:.4f} |",
             f"| top-1 agreement | {old['top1_agreement']:.3f} | {new['top1_agreement']:.3f} |",
             f"| linear bytes held | {old['packed_bytes'] / 2**20:.1f} MiB | {new['packed_bytes'] / 2**20:.1f} MiB |",
             f"| loader stats | {old['loader_stats']} | {new['loader_stats']} |", "",
             "Weight relative error by GGUF type (held as):", "", "| type | old | new |", "| --- | --- | --- |"]
    for q in new["weight_rel_err"]:
        o, n = old["weight_rel_err"][q], new["weight_rel_err"][q]
        lines.append(f"| {q} | {o['rel_err']:.4f} ({o['held_as']}) | {n['rel_err']:.2e} ({n['held_as']}) |")
    lines += ["", "Hidden state after each layer, relative error:", "", "| layer | old | new |", "| --- | --- | --- |"]
    for i, (o, n) in enumerate(zip(old["hidden_rel_err"], new["hidden_rel_err"])):
        lines.append(f"| {i} | {o:.4f} | {n:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a .gguf (default: the catalog's Qwen2.5-Coder-0.5B)")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--last", type=int, default=16)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    path = Path(args.model) if args.model else catalog.cache_dir() / "models" / catalog.CATALOG[
        "qwen2.5-coder-0.5b-instruct"].file
    res = measure(path, args.tokens, args.last)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quant_error.json").write_text(json.dumps(res, indent=1))
    (args.out / "quant_error.md").write_text(markdown(res))
    summary = {k: {m: v[m] for m in ("logits_rel_err", "top1_agreement")} for k, v in res["variants"].items()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

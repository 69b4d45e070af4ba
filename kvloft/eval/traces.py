"""Real attention traces: per-layer queries, keys (after RoPE) and values of a model over a prompt.

    tensors = capture(model, text_or_ids, layers=[0, 15, 29])   # {"q0": [T, H_q, D], "k0": [T, H_kv, D], "v0": ...}
    save_trace(path, tensors, {"model": ..., "tokens": ..., "haystack": ...})

The model runs its ordinary dense prefill (a Session with DenseAttention) behind a
recording backend that keeps, for the chosen layers, exactly the q, k, v the model hands
to attention: rotated queries and keys, in the model dtype, moved to the CPU. With
`generate=n`, n greedy decode steps follow and their q, k, v are appended, so the last
tokens of the trace are true decode queries. Traces feed bench/methods_*.py and
kvloft.eval.attention_report.

    python -m kvloft.eval.traces --model smollm2 --length 8k --haystack essay \\
        --layers 0,7,15,23,29 --out bench/traces/smollm2_8k.safetensors
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kvloft.config import RetrievalConfig, RuntimeConfig, parse_tokens
from kvloft.runtime.attention import DenseAttention

__all__ = ["RecordingAttention", "capture", "load_trace", "record", "save_trace", "trace_layers"]


class RecordingAttention:
    """A DenseAttention that also keeps q, k, v of the layers in `layers` (None = all)."""

    def __init__(self, inner: DenseAttention, layers: Sequence[int] | None) -> None:
        self.inner = inner
        self.keep = None if layers is None else set(layers)
        self.parts: dict[str, list[Tensor]] = {}

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        # q [T, H_q, D], k and v [T, H_kv, D]: k after RoPE, as the cache stores it
        if self.keep is None or layer in self.keep:
            for name, x in (("q", q), ("k", k), ("v", v)):
                self.parts.setdefault(f"{name}{layer}", []).append(x.detach().to("cpu", copy=True))
        return self.inner.attend(layer, q, k, v, positions)

    def tensors(self) -> dict[str, Tensor]:
        """{"q{l}": [T, H_q, D], "k{l}": [T, H_kv, D], "v{l}": [T, H_kv, D]} in layer order."""
        order = sorted(self.parts, key=lambda n: (int(n[1:]), "qkv".index(n[0])))
        return {n: torch.cat(self.parts[n]).contiguous() for n in order}

    # the rest of the backend interface, as the session uses it
    @property
    def timers(self):
        return self.inner.timers

    @property
    def finite(self):
        return self.inner.finite

    def mark(self) -> tuple[int, dict[str, int]]:
        return self.inner.mark(), {n: len(p) for n, p in self.parts.items()}

    def rollback(self, mark: tuple[int, dict[str, int]]) -> None:
        """The inner cache back to its mark, and the recordings of the rolled-back call dropped."""
        self.inner.rollback(mark[0])
        for name in list(self.parts):
            del self.parts[name][mark[1].get(name, 0):]

    @property
    def n_tokens(self) -> int:
        return self.inner.n_tokens

    def bytes(self) -> dict[str, int]:
        return self.inner.bytes()


def _check_layers(layers: Sequence[int] | None, n_layers: int) -> list[int] | None:
    if layers is None:
        return None
    layers = list(layers)
    bad = [x for x in layers if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < n_layers]
    if bad or not layers:
        raise ValueError(f"layers must be ints in [0, {n_layers}) (the model has {n_layers}); got {layers}")
    return layers


def record(model, text_or_ids: str | Sequence[int] | Tensor, layers: Sequence[int] | None = None,
           generate: int = 0, prefill_chunk: int = 512):
    """Run the prompt (and `generate` greedy steps) through a dense session that records.

    Returns the session; `session.backend` is the RecordingAttention and
    `session.backend.inner` the DenseAttention that holds the cache.
    """
    from kvloft.runtime.session import Session

    keep = _check_layers(layers, model.config.n_layers)
    if isinstance(generate, bool) or not isinstance(generate, int) or generate < 0:
        raise ValueError(f"generate must be an int >= 0 decode steps, got {generate!r}")
    s = Session(model, RetrievalConfig(method="dense"), RuntimeConfig(progress=False, prefill_chunk=prefill_chunk))
    s.backend = RecordingAttention(s.backend, keep)
    s.feed(text_or_ids)
    for _ in range(generate):
        s.step(int(s.last_logits.argmax()))
    return s


def capture(model, text_or_ids: str | Sequence[int] | Tensor, layers: Sequence[int] | None = None,
            generate: int = 0) -> dict[str, Tensor]:
    """q{l} [T, H_q, D], k{l} [T, H_kv, D] (after RoPE), v{l} [T, H_kv, D] per chosen layer (None = all)."""
    return record(model, text_or_ids, layers, generate).backend.tensors()


def save_trace(path: Path | str, tensors: dict[str, Tensor], metadata: dict[str, Any]) -> Path:
    """Write tensors with safetensors; metadata values are stored as JSON strings."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={k: json.dumps(v) for k, v in metadata.items()})
    return path


def trace_layers(names: Sequence[str]) -> list[int]:
    """Layers that have q, k and v in a trace's tensor names."""
    names = set(names)
    found = sorted(int(m.group(1)) for n in names if (m := re.fullmatch(r"q(\d+)", n)))
    return [x for x in found if f"k{x}" in names and f"v{x}" in names]


def load_trace(path: Path | str, layers: Sequence[int] | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, metadata) of a trace written by save_trace; layers None = all present."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no trace at {path}; make one with python -m kvloft.eval.traces --out {path}")
    with safe_open(str(path), framework="pt") as f:
        present = trace_layers(list(f.keys()))
        chosen = present if layers is None else list(layers)
        missing = [x for x in chosen if x not in present]
        if missing or not chosen:
            raise ValueError(f"{path}: layers {missing or chosen} have no q/k/v; the trace holds {present}")
        tensors = {f"{x}{layer}": f.get_tensor(f"{x}{layer}") for layer in chosen for x in "qkv"}
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    return tensors, meta


# ----------------------------------------------------------------------------- command line


def _prompt(model, task: str, length: int, haystack: str, seed: int, depth: float, chat: bool = False):
    from kvloft.eval.tasks import generate

    if model.tokenizer is None:
        raise ValueError(f"model {model.source} has no tokenizer; trace a model with one (e.g. smollm2)")
    return generate(task, model.tokenizer, length, seed, depth, chat=chat, haystack=haystack)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="capture per-layer q, k (after RoPE), v of a model over a task prompt")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--length", default="8k", help="prompt tokens (e.g. 8k, 6000)")
    ap.add_argument("--task", default="niah_single_number", help="task whose prompt is traced")
    ap.add_argument("--haystack", default="essay", choices=["essay", "repeat"])
    ap.add_argument("--depth", type=float, default=0.5, help="needle depth (0..1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chat", action="store_true",
                    help="render the prompt in the model's chat template (as kvloft eval --chat)")
    ap.add_argument("--layers", default=None, help="comma list of layers (default: all)")
    ap.add_argument("--generate", type=int, default=0, help="greedy decode steps traced after the prompt")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=Path("bench/traces/trace.safetensors"))
    args = ap.parse_args(argv)
    from kvloft.eval.tasks import build_prompt
    from kvloft.runtime.loader import load_model

    model = load_model(args.model, device=args.device)
    sample = _prompt(model, args.task, parse_tokens(args.length), args.haystack, args.seed, args.depth,
                     args.chat)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    s = record(model, build_prompt(sample), layers, args.generate)
    tensors = s.backend.tensors()
    c = model.config
    meta = {"model": model.source, "tokens": len(s.tokens), "prompt_tokens": len(s.tokens) - args.generate,
            "generated": args.generate, "haystack": args.haystack, "task": args.task, "depth": sample.depth,
            "seed": args.seed, "chat": args.chat, "references": sample.references,
            "dtype": str(model.dtype).replace("torch.", ""),
            "n_layers": c.n_layers, "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads, "head_dim": c.head_dim,
            "layers": trace_layers(list(tensors))}
    tensors["ids"] = torch.tensor(s.tokens, dtype=torch.int64)
    save_trace(args.out, tensors, meta)
    print(json.dumps({"out": str(args.out), "tokens": len(s.tokens), "layers": meta["layers"],
                      "answer": model.tokenizer.decode(s.tokens[meta["prompt_tokens"]:])}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

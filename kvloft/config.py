"""Static configuration: plain dataclasses, no tensors, read once.

ModelConfig     the shape of a Llama-family decoder (with named presets).
CacheConfig     how the KV tiers are laid out (host chunk size, capacity).
RetrievalConfig which keys each decode step attends to (method, budget, sink, window).
RuntimeConfig   where and how things run (device, dtype, memory budgets, kernels).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "GRAPH_MODES",
    "METHODS",
    "CacheConfig",
    "ModelConfig",
    "RetrievalConfig",
    "RuntimeConfig",
    "parse_bytes",
    "parse_tokens",
]


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, SmolLM2)."""

    name: str = "custom"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int = 0  # 0 -> hidden_size // n_heads
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # HF-style, e.g. {"rope_type": "llama3", ...}
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q, k, v projections
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA): query head h reads KV head h // group_size."""
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_name(cls, name: str) -> ModelConfig:
        key = name.lower()
        if key not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[key]

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], name: str = "custom") -> ModelConfig:
        """Build from a HF `config.json` dict (LlamaConfig, MistralConfig, Qwen2Config)."""
        model_type = cfg.get("model_type", "llama")
        if model_type not in ("llama", "mistral", "qwen2"):
            raise ValueError(
                f"model_type {model_type!r} is not supported; kvloft runs llama, mistral and qwen2"
            )
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        n_heads = cfg["num_attention_heads"]
        # transformers >= 5 writes "rope_parameters" (theta inside); older files "rope_theta"/"rope_scaling"
        rope = dict(cfg.get("rope_parameters") or {})
        theta = float(cfg.get("rope_theta") or rope.pop("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        return cls(
            name=name,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


PRESETS: dict[str, ModelConfig] = {
    # small enough for unit tests; awkward on purpose: 9 query heads over 3 KV heads.
    "tiny": ModelConfig(
        name="tiny", vocab_size=512, hidden_size=144, intermediate_size=288, n_layers=2,
        n_heads=9, n_kv_heads=3, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5,
        max_position_embeddings=8192,
    ),
    "smollm2-135m": ModelConfig(
        name="smollm2-135m", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        n_layers=30, n_heads=9, n_kv_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5,
        max_position_embeddings=8192, tie_word_embeddings=True,
    ),
    "llama3-8b": ModelConfig(
        name="llama3-8b", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        n_layers=32, n_heads=32, n_kv_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5,
        max_position_embeddings=8192,
    ),
    # the shape of Qwen2.5(-Coder)-0.5B, random weights (the real model: load_model("qwen2.5-0.5b"))
    "qwen2.5-0.5b-shape": ModelConfig(
        name="qwen2.5-0.5b-shape", vocab_size=151936, hidden_size=896, intermediate_size=4864,
        n_layers=24, n_heads=14, n_kv_heads=2, rope_theta=1000000.0, rms_norm_eps=1e-6,
        max_position_embeddings=32768, attention_bias=True, tie_word_embeddings=True,
    ),
    "qwen2.5-7b-1m": ModelConfig(
        name="qwen2.5-7b-1m", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        n_layers=28, n_heads=28, n_kv_heads=4, rope_theta=10000000.0, rms_norm_eps=1e-5,
        max_position_embeddings=1010000, attention_bias=True,
    ),
}

WEIGHTS = ("auto", "bf16", "int8", "int4")  # RuntimeConfig.weights (runtime/quant_linear.py)
QUANT_GROUPS = (32, 64, 128)
METHODS = ("dense", "exact", "attention_graph", "tokenselect", "recycled", "hip", "actqkv", "faiss")
GRAPH_MODES = ("auto", "off", "segments", "whole")  # kvloft.Engine's graphs (runtime/engine.py)


@dataclass(frozen=True)
class CacheConfig:
    """Layout of the KV tiers.

    host_chunk_tokens: the host tier grows by chunks of this many tokens, never copied whole.
    max_context: a session refuses to hold more tokens than this (0 = no limit).
    disk_dir: a directory for the disk tier (a path; made if missing). When set and the
        host tier would pass RuntimeConfig.host_memory_budget, each layer's oldest full
        host chunks spill to memory-mapped files in a per-session subdirectory (removed
        when the session resets or goes away) instead of the session refusing.
        None = no disk tier (docs/disk_tier.md).
    evict_batch: decode moves tokens leaving the window to the host tier this many at a
        time (tiers/layer_tiers.py): the window ring grows to n_window + evict_batch tokens
        (all attended exactly, on the device), then the oldest evict_batch go down in one
        copy. Between those steps no copy runs, so no read of the host tier waits for one.
        0 = one token per step. None (default) = 64 on CUDA, 0 elsewhere.
    host_dtype: how host-tier (and disk-tier) keys and values are stored. None (default) =
        the model dtype; "fp8" (e4m3) or "int8" = one byte per element with an fp32 scale
        per token row and KV head (kernels/rowquant.py): about half the host bytes, and
        half the PCIe bytes per selected row; the kernels dequantize as they read. The
        static tier (sink + window) stays in the model dtype (docs/host_dtype.md).
    """

    host_chunk_tokens: int = 4096
    max_context: int = 0
    disk_dir: str | None = None
    evict_batch: int | None = None
    host_dtype: str | None = None

    def resolved_evict_batch(self, device) -> int:
        """evict_batch, its default resolved for a compute device (a torch.device or its name)."""
        if self.evict_batch is not None:
            return self.evict_batch
        kind = getattr(device, "type", str(device).split(":")[0])
        return 64 if kind == "cuda" else 0

    def __post_init__(self) -> None:
        _check_int("host_chunk_tokens", self.host_chunk_tokens, minimum=1)
        _check_int("max_context", self.max_context, minimum=0)
        if self.evict_batch is not None:
            _check_int("evict_batch", self.evict_batch, minimum=0)
        if self.disk_dir is not None:
            if not isinstance(self.disk_dir, (str, os.PathLike)) or not str(self.disk_dir).strip():
                raise TypeError(f"disk_dir must be a directory path (str) or None, got {self.disk_dir!r}")
            object.__setattr__(self, "disk_dir", os.fspath(self.disk_dir))
        from kvloft.kernels.rowquant import check_host_dtype

        check_host_dtype(self.host_dtype)


@dataclass(frozen=True)
class RetrievalConfig:
    """Which keys a decode step attends to.

    method: "dense" keeps every token on the compute device and attends to all of them;
        any other method keeps `n_sink` first tokens and a ring of the last `n_window`
        on the device, moves older tokens to the host tier, and lets a retriever pick
        `budget` of them per step (per KV head, or shared by all heads).
    gqa_reduce: how the exact retriever ranks a key for a KV head from the scores of
        the query heads of its group: "max" (default) or "sum" of softmax-free logits.
    position_mode: "exact" keeps true positions; "extrapolate" places retrieved keys at a
        fixed distance before the window (see DESIGN.md, Positions).
    options: method-specific parameters (see each retriever's Params dataclass).
    prefill_dense_tokens: position_mode "exact": a prefill chunk with more than this many
        tokens before it attends sparsely (runtime/attention.py): to itself, the sink and
        window, and the host-tier blocks whose mean key scores highest for the chunk's
        mean query, so a long prefill is not quadratic. 0 = sparse as soon as the host
        tier holds tokens.
    prefill_budget: host tokens per KV head a sparse prefill chunk reads (whole blocks,
        at least one); None = `budget`.
    prefill_block: host tokens per block of the sparse prefill's summary (one mean key
        per block and KV head, kept on the compute device: 1/prefill_block of the host
        keys' bytes).
    max_similar: at most this many near-identical keys (same SimHash bucket of
        `similar_bits` bits, index/diversity.py) among the keys the exact retriever and the
        extrapolate-mode prefill select per KV head; 0 = no cap. Repeated text otherwise fills
        a position-free top-k with copies of one token. None (default) = the mode's default
        (MODE_DEFAULTS: 4 in "extrapolate", 0 in "exact"), set when the config is made.
    similar_bits: hyperplanes of that hash (more bits = only closer keys count as similar).
        None (default) = 8 in "extrapolate", 16 in "exact". With runs, 4 keys a bucket of 8
        bits and the prefill tail, SmolLM2 read pass keys at 16K and 32K in 5 of 5 samples
        (docs/extrapolation.md). replace() with a new position_mode moves the fields still at
        the old mode's default to the new mode's.
    neighbor_radius: position_mode "extrapolate" only: each host key a selection picks brings
        the host keys up to this many positions either side of it, so retrieved keys are read
        as short runs of text, not as scattered single tokens (the top budget // (2 * radius
        + 1) keys per KV head are picked and widened; at most `budget` keys are read). 0 =
        single keys. SmolLM2 read a pass key at 16K with 2, not with 0 (docs/extrapolation.md).
    prefill_tail / prefill_tail_block: position_mode "extrapolate" only: the last
        `prefill_tail` queries of each feed (prompt) select their own host keys, in blocks of
        `prefill_tail_block` queries, instead of taking their chunk's selection (a question
        at the end of a prompt otherwise reads what its chunk's haystack asked for); the
        feed's last query selects alone. 0 = only that last query. Each block costs an
        attention pass per layer; chunks before the feed's tail take none.
    """

    method: str = "exact"
    budget: int = 2048
    n_sink: int = 64
    n_window: int = 512
    gqa_reduce: str = "max"
    position_mode: str = "exact"
    query_sample: int = 2048
    options: dict[str, Any] = field(default_factory=dict)
    prefill_dense_tokens: int = 32768
    prefill_budget: int | None = None
    prefill_block: int = 64
    max_similar: int | None = None
    similar_bits: int | None = None
    neighbor_radius: int = 2
    prefill_tail: int = 64
    prefill_tail_block: int = 8

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown retrieval method {self.method!r}; choose one of {METHODS}")
        _check_int("budget", self.budget, minimum=0)
        _check_int("n_sink", self.n_sink, minimum=0)
        _check_int("n_window", self.n_window, minimum=1)
        _check_int("query_sample", self.query_sample, minimum=0)
        _check_int("prefill_dense_tokens", self.prefill_dense_tokens, minimum=0)
        if self.prefill_budget is not None:
            _check_int("prefill_budget", self.prefill_budget, minimum=0)
        _check_int("prefill_block", self.prefill_block, minimum=1)
        for name, by_mode in MODE_DEFAULTS.items():  # None: the position mode's default
            if getattr(self, name) is None:
                object.__setattr__(self, name, by_mode.get(self.position_mode, by_mode["exact"]))
        _check_int("max_similar", self.max_similar, minimum=0)
        _check_int("similar_bits", self.similar_bits, minimum=1)
        _check_int("neighbor_radius", self.neighbor_radius, minimum=0)
        _check_int("prefill_tail", self.prefill_tail, minimum=0)
        _check_int("prefill_tail_block", self.prefill_tail_block, minimum=1)
        if self.similar_bits > 62:
            raise ValueError(f"similar_bits must be at most 62 (an int64 bucket id), got {self.similar_bits}")
        if self.gqa_reduce not in ("max", "sum"):
            raise ValueError(f"gqa_reduce must be 'max' or 'sum', got {self.gqa_reduce!r}")
        if self.position_mode not in ("exact", "extrapolate"):
            raise ValueError(
                f"position_mode must be 'exact' or 'extrapolate', got {self.position_mode!r}"
            )

    @property
    def sparse_prefill_budget(self) -> int:
        """Host tokens per KV head a sparse prefill chunk reads (prefill_budget, else budget)."""
        return self.budget if self.prefill_budget is None else self.prefill_budget

    def replace(self, **changes: Any) -> RetrievalConfig:
        mode = changes.get("position_mode", self.position_mode)
        if mode != self.position_mode:  # fields at the old mode's default take the new mode's
            for name, by_mode in MODE_DEFAULTS.items():
                if name not in changes and getattr(self, name) == by_mode.get(self.position_mode):
                    changes[name] = None
        return dataclasses.replace(self, **changes)


# RetrievalConfig fields whose default (None) depends on position_mode
MODE_DEFAULTS: dict[str, dict[str, int]] = {
    "max_similar": {"exact": 0, "extrapolate": 4},
    "similar_bits": {"exact": 16, "extrapolate": 8},
}


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how a session runs.

    device: "cpu", "cuda", "cuda:1" or "auto" (CUDA when available, resolved at session start).
    dtype: compute dtype of weights and KV ("float32", "bfloat16", "float16"; "auto" =
        bfloat16 on CUDA, float32 on CPU).
    gpu_memory_budget / host_memory_budget: bytes (int) or strings like "24GiB"; 0 = no limit.
    kernels: "auto" (Triton on CUDA, torch reference on CPU), "reference" or "triton";
        the default comes from KVLOFT_KERNELS, read once when the config is made.
    prefill_chunk: tokens per prefill chunk; None = auto: on CUDA a session takes, per feed,
        the largest of 16384, 8192, 4096, 2048, 512 whose workspace the memory plan fits in
        what gpu_memory_budget (and the device's free memory) leaves after the weights, static
        tier, row cache and index (scheduler/budget.py pick_prefill_chunk), at most 4096 where
        a chunk's queries select the host rows it reads (exact past prefill_dense_tokens,
        extrapolate: there the chunk is a quality setting); 2048 elsewhere.
        resolved_prefill_chunk gives 512 on CUDA to callers without a plan. On the CPU 8192
        (at most 4096 where chunks select host rows, as on CUDA): every chunk re-reads the
        weights and pays the model's ~1,300 small ops again, and a chunk after the first splits
        its causal attention in two calls merged by lse; 2048 was ~2x faster than 512 on a busy
        2-core machine, one 6K chunk 1.2-1.7x faster than three of 2048 (docs/performance.md).
    progress: show a progress bar for long prefills.
    profile: on CUDA, synchronize around each timed region so stats() gives an exact
        breakdown (search, transfer, attention); costs overlap, so off by default.
    scheduler: "none" (TieredAttention) or "overlap" (kvloft.scheduler: GPU row cache,
        planned transfers on a copy stream, CPU-side search on a worker thread).
    cuda_graphs: on CUDA, replay a decode step's dense parts (everything but attention)
        as CUDA graphs (runtime/graphs.py); off = every kernel launched from Python.
    weights: how the linear layers' weights are stored (runtime/quant_linear.py): "auto" =
        as the model was loaded; "bf16" = not quantized (in `dtype`); "int4" = packed 4-bit
        with an fp16 scale and min per `quant_group` inputs; "int8" = 8-bit, one scale per
        output channel. A session given "int4"/"int8" and an unquantized model quantizes
        its linears in place; load_model(..., weights=...) quantizes while loading
        (GGUF Q4_0/Q4_1/Q8_0 tensors are repacked exactly).
    quant_group: inputs per int4 scale: 32, 64 or 128.
    """

    device: str = "auto"
    dtype: str = "auto"
    gpu_memory_budget: int | str = 0
    host_memory_budget: int | str = 0
    kernels: str = field(default_factory=lambda: os.environ.get("KVLOFT_KERNELS", "auto"))
    prefill_chunk: int | None = None
    progress: bool = True
    profile: bool = False
    seed: int = 0
    scheduler: str = "none"
    cuda_graphs: bool = True
    weights: str = "auto"
    quant_group: int = 128

    def resolved_prefill_chunk(self, device) -> int:
        """prefill_chunk, its default resolved for a compute device (a torch.device or its name);
        on CUDA the smallest auto choice (Session.feed picks from the memory plan instead)."""
        if self.prefill_chunk is not None:
            return self.prefill_chunk
        kind = getattr(device, "type", str(device).split(":")[0])
        return 512 if kind == "cuda" else 8192

    def __post_init__(self) -> None:
        if self.weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS}, got {self.weights!r}")
        if self.quant_group not in QUANT_GROUPS:
            raise ValueError(f"quant_group must be one of {QUANT_GROUPS}, got {self.quant_group!r}")
        if self.kernels not in ("auto", "reference", "triton"):
            raise ValueError(
                f"kernels must be 'auto', 'reference' or 'triton' (KVLOFT_KERNELS), got {self.kernels!r}"
            )
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(
                f"dtype must be one of auto, float32, bfloat16, float16; got {self.dtype!r}"
            )
        if self.prefill_chunk is not None:
            _check_int("prefill_chunk", self.prefill_chunk, minimum=1)
        if not isinstance(self.cuda_graphs, bool):
            raise TypeError(f"cuda_graphs must be True or False, got {self.cuda_graphs!r}")
        if self.scheduler not in ("none", "overlap"):
            raise ValueError(f"scheduler must be 'none' or 'overlap', got {self.scheduler!r}")
        object.__setattr__(self, "gpu_memory_budget", parse_bytes(self.gpu_memory_budget))
        object.__setattr__(self, "host_memory_budget", parse_bytes(self.host_memory_budget))


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
          "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
          "tb": 1000**4}


def parse_bytes(value: int | str) -> int:
    """'24GiB' -> 25769803776; ints pass through. Raises ValueError naming the format."""
    if isinstance(value, bool):
        raise TypeError("a memory budget is an int of bytes or a string like '24GiB', not a bool")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a memory budget must be >= 0 bytes, got {value}")
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read memory size {value!r}; write e.g. 24GiB, 512MiB or 1000000")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_tokens(value: int | str) -> int:
    """'8k' -> 8192, '1m' -> 1048576, '6000' -> 6000."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmM]?)\s*", value)
    if not m:
        raise ValueError(f"cannot read token count {value!r}; write e.g. 8k, 128k, 1m or 6000")
    scale = {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")

"""Hugging Face integration: keep a `transformers` model and its `generate()`, get kvloft's tiers.

    import kvloft.hf                      # registers the "kvloft" attention and mask functions
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="kvloft")
    cache = kvloft.hf.Cache(model, kvloft.RetrievalConfig(method="exact", budget=256))
    out = model.generate(ids, past_key_values=cache, max_new_tokens=32, do_sample=False)
    print(cache.stats())                  # tier sizes, keys scanned, retriever counters

How it plugs in, through transformers' documented extension points only (no model class
is patched):

- `Cache` is a `transformers.Cache` whose layers (`KvloftLayer`) do not concatenate:
  `update()` hands the new rotated keys and values over to the attention function and
  counts tokens (HF derives positions and mask sizes from that count).
- The attention function registered as "kvloft" in `AttentionInterface` takes them and
  runs kvloft's per-layer attention (runtime/attention.py): a prefill attends densely to
  everything before it, tier by tier; a decode token attends to the static tier (sink +
  window) and to the host-tier rows its retriever selects, merged by log-sum-exp. Keys
  reach it after the model's RoPE, as kvloft stores them.
- The mask function registered as "kvloft" in `AttentionMaskInterface` builds no mask
  (kvloft attention is causal by construction) and refuses padding.

Scope: one sequence (batch 1, no padding), greedy or sampled decoding, no beam search,
no assisted decoding (a cache that spills to the host cannot be cropped back). Llama,
Mistral and Qwen2 architectures (those kvloft's ModelConfig reads). Without a kvloft Cache
(e.g. a plain `model(ids)` forward with no past), the "kvloft" attention falls back to
torch SDPA, so the model still runs; with another cache kind it refuses.

Indexes are built once, at the first decode step after a prefill (the step the session
API calls build_indexes() at), from the host tier and a sample of the prefill queries.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import Tensor

from kvloft.config import CacheConfig, ModelConfig, RetrievalConfig, RuntimeConfig
from kvloft.index.base import make_retriever
from kvloft.kernels import kernel_set
from kvloft.runtime.attention import DenseAttention, TieredAttention
from kvloft.tiers.kvcache import TieredKVCache

try:
    import transformers
    from transformers import AttentionInterface
    from transformers.cache_utils import Cache as _HFCache
    from transformers.cache_utils import CacheLayerMixin
    from transformers.masking_utils import AttentionMaskInterface
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("kvloft.hf needs transformers>=5: pip install 'transformers>=5'") from e

__all__ = ["ATTN_IMPLEMENTATION", "Cache", "KvloftLayer", "kvloft_attention", "kvloft_mask"]

ATTN_IMPLEMENTATION = "kvloft"
_MAJOR = int(transformers.__version__.split(".")[0])
if _MAJOR < 5:  # pragma: no cover
    raise ImportError(f"kvloft.hf needs transformers>=5 (cache layers API), found {transformers.__version__}")

# The layer whose update() ran last in this thread, and the key tensor it handed over: the
# attention call that follows in the same module picks them up (HF passes the cache to
# `update` but not to the attention function).
_handoff = threading.local()


class KvloftLayer(CacheLayerMixin):
    """One decoder layer's view of the shared kvloft tiers (no tensors of its own)."""

    is_sliding = False
    is_compileable = False  # data-dependent retrieval: not for torch.compile graphs
    is_croppable = False  # tokens move to the host tier and into indexes: no rollback
    supports_early_init = False

    def __init__(self, owner: Cache, index: int) -> None:
        super().__init__()
        self.owner, self.index = owner, index
        self.n_seen = 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """key/value_states [1, H_kv, T, D] (keys rotated) -> returned as is, for kvloft_attention."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.owner._check_states(key_states, value_states)
        if self.index == 0:
            self.owner._begin_forward(key_states.shape[2])
        start = self.n_seen
        self.n_seen += key_states.shape[2]
        _handoff.value = (self, key_states, start)
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.n_seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.n_seen

    def get_max_length(self) -> int:
        return self.owner.cache_cfg.max_context or -1

    def reset(self) -> None:
        self.n_seen = 0

    def offload(self) -> None:  # kvloft moves its own tiers
        pass

    def prefetch(self) -> None:
        pass

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if beam_idx.numel() != 1 or int(beam_idx[0]) != 0:
            raise ValueError("kvloft.hf.Cache holds one sequence; beam search is not supported (use num_beams=1)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise ValueError("kvloft.hf.Cache holds one sequence; use num_return_sequences=1")

    def batch_select_indices(self, indices: Tensor) -> None:
        if indices.numel() != 1 or int(indices[0]) != 0:
            raise ValueError("kvloft.hf.Cache holds one sequence; it cannot select batch rows")


class Cache(_HFCache):
    """A transformers Cache backed by kvloft's tiered KV and a retriever.

    model: a transformers causal LM loaded with attn_implementation="kvloft".
    retrieval: which keys a decode step attends to (RetrievalConfig; "dense" keeps all on device).
    runtime: kernels ("auto" / "reference" / "triton") and memory budgets; device and dtype
        follow the model's parameters.
    cache: host chunk size and max_context.
    """

    def __init__(self, model: Any, retrieval: RetrievalConfig | None = None,
                 runtime: RuntimeConfig | None = None, cache: CacheConfig | None = None) -> None:
        self.retrieval = retrieval or RetrievalConfig()
        self.runtime = runtime or RuntimeConfig()
        self.cache_cfg = cache or CacheConfig()
        _check_configs(self.retrieval, self.runtime, self.cache_cfg)
        self.config = _model_config(model)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.ops = kernel_set(self.runtime.kernels, self.device)
        super().__init__(layers=[KvloftLayer(self, i) for i in range(self.config.n_layers)])
        self._new_backend()

    def _new_backend(self) -> None:
        cfg = self.config
        if self.retrieval.method == "dense":
            self.backend = DenseAttention(cfg, self.ops, self.device, self.dtype, self.runtime.profile)
            return
        kv = TieredKVCache(cfg, n_sink=self.retrieval.n_sink, n_window=self.retrieval.n_window,
                           host_chunk=self.cache_cfg.host_chunk_tokens, device=self.device, dtype=self.dtype,
                           evict_batch=self.cache_cfg.resolved_evict_batch(self.device),
                           host_dtype=self.cache_cfg.host_dtype)
        retriever = make_retriever(self.retrieval, cfg, self.device)
        self.backend = TieredAttention(cfg, self.retrieval, kv, retriever, self.ops, self.device,
                                       self.runtime.profile)

    def reset(self) -> None:
        """Forget every token (keeps configs)."""
        super().reset()
        self._new_backend()

    # ---- called by the layers and the attention function --------------------------------

    def _check_states(self, k: Tensor, v: Tensor) -> None:
        c = self.config
        want = (1, c.n_kv_heads, k.shape[2], c.head_dim)
        if tuple(k.shape) != want or tuple(v.shape) != want:
            raise ValueError(f"kvloft.hf.Cache holds one sequence of {c.n_kv_heads} KV heads x {c.head_dim}: "
                             f"expected key/value states {want}, got {tuple(k.shape)}; use batch size 1")
        if k.dtype != self.dtype:
            raise ValueError(f"key states are {k.dtype}, the cache was made for {self.dtype}; "
                             "create the Cache after moving the model to its final dtype")

    def _begin_forward(self, n_new: int) -> None:
        """Start of a forward pass (layer 0): decode after a prefill builds the indexes first."""
        cap = self.cache_cfg.max_context
        if cap and self.layers[0].n_seen + n_new > cap:
            raise ValueError(f"the cache would hold {self.layers[0].n_seen + n_new} tokens, over "
                             f"max_context={cap}; raise CacheConfig.max_context")
        budget = self.runtime.host_memory_budget
        if budget and isinstance(self.backend, TieredAttention):
            need = self.backend.cache.host_bytes_after(n_new)
            if need > budget:
                raise ValueError(f"{need / 2**20:.1f} MiB of host KV memory would pass host_memory_budget="
                                 f"{budget / 2**20:.1f} MiB; raise the budget or generate less")
        if not isinstance(self.backend, TieredAttention):
            return
        if n_new > 1:
            self.backend.decoding = False
        else:
            if not all(self.backend.built):
                self.backend.build_indexes()
            self.backend.decoding = True

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, start: int) -> Tensor:
        """q [T, H_q, D], k/v [T, H_kv, D] at positions start.. -> out [T, H_q, D]."""
        pos = torch.arange(start, start + q.shape[0], device=self.device)
        return self.backend.attend(layer, q, k, v, pos)

    # ---- reports ---------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        b = self.backend
        out: dict[str, Any] = {"method": self.retrieval.method, "tokens": self.layers[0].n_seen,
                               "bytes": b.bytes(), "timings_s": b.timers.as_dict(), "kernels": self.ops.name}
        if isinstance(b, TieredAttention):
            t = b.cache[0]
            out["tier_tokens"] = {"static": t.n_static, "host": t.n_host}
            out["keys_scanned"] = b.scanned
            out["retriever"] = b.retriever.stats()
        return out


def kvloft_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                     attention_mask: Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs: Any) -> tuple[Tensor, None]:
    """The "kvloft" attention: query [1, H_q, T, D], key/value [1, H_kv, T, D] (this step's tokens,
    handed over by KvloftLayer.update) -> (out [1, T, H_q, D], None)."""
    got = getattr(_handoff, "value", None)
    if got is None or got[1] is not key:
        return _fallback(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    _handoff.value = None
    layer, _, start = got
    owner: Cache = layer.owner
    if getattr(module, "layer_idx", layer.index) != layer.index:
        raise RuntimeError(f"attention of layer {module.layer_idx} received the keys of layer {layer.index}")
    if dropout:
        raise ValueError("kvloft attention is for inference: call model.eval() (attention dropout must be 0)")
    expect = owner.config.head_dim**-0.5
    if scaling is not None and abs(scaling - expect) > 1e-6 * expect:
        raise ValueError(f"kvloft attention scales logits by 1/sqrt(head_dim) = {expect:.6g}; this model uses "
                         f"{scaling:.6g}, which kvloft does not support")
    q = query[0].transpose(0, 1).contiguous()  # [T, H_q, D]
    k = key[0].transpose(0, 1).contiguous()  # [T, H_kv, D]
    v = value[0].transpose(0, 1).contiguous()
    out = owner.attend(layer.index, q, k, v, start)  # [T, H_q, D]
    return out[None].to(query.dtype), None


def _fallback(module, query, key, value, attention_mask, scaling, dropout, **kwargs):
    """No kvloft Cache in play: a plain causal forward over the given tokens runs on SDPA."""
    if key.shape[2] != query.shape[2]:
        raise ValueError(
            "attn_implementation='kvloft' needs past_key_values=kvloft.hf.Cache(model, RetrievalConfig(...)); "
            "for another cache kind load the model with attn_implementation='sdpa'"
        )
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                  dropout=dropout, **kwargs)


def kvloft_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                mask_function=None, attention_mask: Tensor | None = None, **kwargs: Any) -> None:
    """The "kvloft" mask: none (kvloft attention is causal by construction); padding is refused."""
    if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
        raise ValueError("kvloft attention runs one unpadded sequence; the attention mask has padding "
                         "(generate one prompt at a time, without padding)")


def _model_config(model: Any) -> ModelConfig:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        raise TypeError(f"kvloft.hf.Cache needs a transformers model, got {type(model).__name__}")
    impl = getattr(cfg, "_attn_implementation", None)
    if impl != ATTN_IMPLEMENTATION:
        raise ValueError(f"the model runs attn_implementation={impl!r}; load it with "
                         f"attn_implementation='{ATTN_IMPLEMENTATION}' (after `import kvloft.hf`) or call "
                         f"model.set_attn_implementation('{ATTN_IMPLEMENTATION}')")
    text = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    return ModelConfig.from_hf(text.to_dict(), name=getattr(text, "name_or_path", "") or "hf")


def _check_configs(retrieval, runtime, cache) -> None:
    for name, obj, cls in (("retrieval", retrieval, RetrievalConfig), ("runtime", runtime, RuntimeConfig),
                           ("cache", cache, CacheConfig)):
        if not isinstance(obj, cls):
            raise TypeError(f"{name} must be a kvloft.{cls.__name__}, got {type(obj).__name__}")


AttentionInterface.register(ATTN_IMPLEMENTATION, kvloft_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, kvloft_mask)

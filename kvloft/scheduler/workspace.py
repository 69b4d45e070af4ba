"""Transient device bytes of one layer, the `workspace` part of the memory plan
(scheduler/budget.py): a prefill chunk's activations, attention buffers and host rows moved
back, and a decode step's search buffers, gathered rows and logits. Upper bounds of what one
layer holds at once, following the code paths (runtime/attention.py, index/*.py), not
allocator measurements.
"""

from __future__ import annotations

from kvloft.config import CacheConfig, ModelConfig, RetrievalConfig, RuntimeConfig
from kvloft.kernels import flash
from kvloft.scheduler.params import SchedulerParams

__all__ = ["decode_workspace", "prefill_workspace"]


def _search_workspace(cfg: ModelConfig, rcfg: RetrievalConfig, n_host: int) -> int:
    """Transient score buffers of one select() on the retriever's device."""
    hq, hkv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    chunk = min(n_host, int(rcfg.options.get("chunk_rows", 16384)))
    fp32_chunk = chunk * hkv * d * 4  # reference.score reads a chunk in fp32
    m = rcfg.method
    if m == "exact":
        return 2 * hkv * n_host * 4 + hq * chunk * 4 + fp32_chunk
    if m == "tokenselect":
        return 3 * hq * n_host * 4 + fp32_chunk
    if m == "recycled":
        return 4 * hq * n_host * 4 + fp32_chunk
    if m in ("hip", "actqkv"):
        return 16 * n_host + hq * 4 * 4096
    return 0


def _fused_prefill(cfg: ModelConfig, runtime: RuntimeConfig, isz: int) -> bool:
    """A CUDA chunk's attention takes the flash route (sm80+; kernels/flash.py)."""
    return runtime.kernels != "reference" and flash.shape_supported(cfg.head_dim, isz)


def prefill_workspace(cfg: ModelConfig, rcfg: RetrievalConfig, runtime: RuntimeConfig,
                       cache_cfg: CacheConfig, n: int, n_host: int, isz: int, chunk: int) -> int:
    """The last prefill chunk (`chunk` tokens) of a context of n tokens (runtime/exact_prefill.py,
    runtime/dense.py): activations of one layer, its attention's buffers, host rows moved."""
    p = min(chunk, max(n, 1))
    hq, hkv, d, row = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    acts = p * (4 * cfg.hidden_size + 3 * cfg.intermediate_size + (hq + 2 * hkv) * d) * isz
    acts += p * hq * d * (12 + isz)  # RoPE in fp32 (runtime/model.py rotate): three fp32 temporaries of q
    merged = 2 * p * hq * (d + 1) * 4  # a fp32 running (out, lse) and its merged copy
    if rcfg.method == "dense":  # causal attention over every token at once, nothing merged
        tk, moved, merged = n, 0, 0
    elif n_host + rcfg.n_sink + rcfg.n_window > rcfg.prefill_dense_tokens and rcfg.position_mode == "exact":
        # sparse: the chunk, the static tier and the selected host rows (both selections), cat
        # into one K and one V (runtime/chunk_attention.py)
        k = min(2 * rcfg.sparse_prefill_budget + 2 * rcfg.prefill_block, n_host)
        tk = p + rcfg.n_sink + rcfg.n_window + k
        moved = 2 * k * row * isz + -(-n_host // rcfg.prefill_block) * row * isz  # rows, block summary
        moved += 2 * tk * row * isz
    else:  # one partial per host chunk, streamed through two staging buffers of one chunk each
        tk = max(min(cache_cfg.host_chunk_tokens, n_host), rcfg.n_sink + rcfg.n_window, p)
        moved = 2 * 2 * min(cache_cfg.host_chunk_tokens, n_host) * row * isz if n_host else 0
    attend = flash.workspace_bytes(p, tk, hq, hkv, d, isz, fused=_fused_prefill(cfg, runtime, isz)) + merged
    if runtime.weights in ("int4", "int8") and p > 16:  # a chunk's linear dequantized whole for cuBLAS
        acts += cfg.hidden_size * max(cfg.intermediate_size, hq * d) * isz
    return acts + attend + moved


def decode_workspace(cfg: ModelConfig, rcfg: RetrievalConfig, runtime: RuntimeConfig,
                      params: SchedulerParams, n_host: int, isz: int) -> int:
    row = cfg.n_kv_heads * cfg.head_dim
    logits = cfg.vocab_size * 4 * 2
    if rcfg.method == "dense":
        return logits
    k = min(rcfg.budget, n_host)
    if runtime.scheduler == "overlap":
        rows = params.gathered_rows or max(1, rcfg.budget * cfg.n_kv_heads)
        gathered = params.regions * (min(rows, n_host) * 2 * row * isz + 3 * rows * 8)
    else:  # per-head rows gathered on the CPU and copied up (no copy when read zero-copy)
        gathered = 2 * k * row * isz
    return logits + gathered + _search_workspace(cfg, rcfg, n_host)

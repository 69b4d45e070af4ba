"""GPU memory plan of a session: what lives on the GPU, and whether it fits the budget.

`plan_memory(model_cfg, retrieval_cfg, runtime_cfg, n_tokens, dtype)` counts, for a
context of n_tokens, the bytes the current code puts on the compute device:

  weights     every parameter (tied embeddings once), as Model.weight_bytes counts them
              (scheduler/weight_storage.py);
  static      sink + window ring per layer (with positions), plus for hip the device copy of
              its selection's stable rows (budget rows of K and V per layer,
              runtime/rowspace.py); for method "dense" the whole KV, in DenseKV's doubling
              capacity;
  row_cache   the scheduler's GPU row cache (RuntimeConfig.scheduler == "overlap");
  index       the retriever's device-side copy: exact, tokenselect, hip and recycled keep
              every host key on their device (chunked, whole chunks; hip with keys_on="host"
              reads the host tier's pinned keys in place instead, model-dtype or 8-bit rows
              alike, and where it cannot (hip_host_copy: extrapolate mode, a disk tier, a
              host chunk that is not a multiple of chunk_sizes[0]) keeps a pinned model-dtype
              copy on the host, counted in host_index); actqkv one fp32 vector per block and
              KV head; attention_graph keeps its graph on the host (host_index); plus what
              tokenselect and hip keep between steps (last query and ids; stage masks and a
              counting arange: _selection_state). Copies are built chunk by chunk
              (ChunkedRows.append_from): no layer's keys are on the device whole beside them;
  workspace   (scheduler/workspace.py) the larger of prefill (one chunk: its activations,
              its attention's buffers, the host rows moved back per layer) and decode (the search's score buffers,
              gathered rows and buffers, logits) transients. A chunk's attention on CUDA
              (kernels "auto"/"triton", fp16/bf16) is FlashAttention-2: no [chunk, keys]
              logits, no copy of K/V (kernels/flash.py workspace_bytes); the reference
              holds fp32 logits and fp32 K/V copies.

The prefill chunk (RuntimeConfig.prefill_chunk; None = auto on CUDA): `pick_prefill_chunk`
(its rule in scheduler/prefill_chunk.py) takes the largest of PREFILL_CHUNKS whose workspace
fits what the budget leaves after the weights, static tier, row cache and index (less
budget / CACHE_HEADROOM), 512 if none does,
and no more than 4096 where chunks select their host rows (a quality setting there); a plan
for prefill_chunk=None prices that choice (without a budget, the largest).

Estimates of transients follow the code paths (runtime/attention.py, index/*.py); they
are upper bounds of what one layer holds at once, not allocator measurements. Over
`RuntimeConfig.gpu_memory_budget` it raises a ValueError that names what would fit: the
longest context with this cache, and the largest row cache for this context.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from kvloft.config import CacheConfig, ModelConfig, RetrievalConfig, RuntimeConfig
from kvloft.index.hip_params import HipParams
from kvloft.kernels.quant.tinygemm import GROUPS as TINYGEMM_GROUPS
from kvloft.kernels.rowquant import packed_row_bytes
from kvloft.scheduler.params import SchedulerParams
from kvloft.scheduler.prefill_chunk import (
    CACHE_HEADROOM,
    PREFILL_CHUNKS,
    SELECTING_CHUNK_MAX,
    auto_chunk,
    chunk_room,
    selecting,
)
from kvloft.scheduler.weight_storage import weight_bytes
from kvloft.scheduler.workspace import decode_workspace, prefill_workspace
from kvloft.tiers.dense import dense_capacity

__all__ = ["CACHE_HEADROOM", "PREFILL_CHUNKS", "SELECTING_CHUNK_MAX", "MemoryPlan", "available_bytes",
           "dense_kv_bytes", "fmt_bytes", "hip_host_copy", "pick_prefill_chunk", "plan_memory", "resolve_cache_bytes",
           "static_tier_bytes", "weight_bytes"]

GiB = 2**30
MIRROR_METHODS = ("exact", "tokenselect", "hip", "recycled")
STABLE_METHODS = ("hip",)  # selections with a stable part (runtime/rowspace.py caches its rows)


@dataclass
class MemoryPlan:
    """Bytes on the compute device for one context (all ints, bytes).

    n_tokens: the context planned for; n_host: of which in the host tier.
    prefill_chunk: the prefill chunk the workspace is priced for (tokens).
    weights, static, row_cache, index, workspace: see the module doc; total: their sum.
    prefill_workspace, decode_workspace: the two candidates of workspace.
    host_kv: host tier (K, V in the model dtype or 8-bit codes + scales, positions; whole chunks);
    host_index: host-side index copy (attention_graph; hip keys_on="host" where it copies the keys).
    budget: RuntimeConfig.gpu_memory_budget (0 = none).
    notes: what the plan does not model.
    """

    n_tokens: int
    n_host: int
    weights: int
    static: int
    row_cache: int
    index: int
    workspace: int
    prefill_workspace: int
    decode_workspace: int
    host_kv: int
    host_index: int
    budget: int
    prefill_chunk: int = 512
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.resident + self.workspace

    @property
    def resident(self) -> int:
        """Everything but the transients: weights, static tier, row cache, index."""
        return self.weights + self.static + self.row_cache + self.index

    @property
    def fits(self) -> bool:
        return self.budget == 0 or self.total <= self.budget

    def as_dict(self) -> dict[str, int | list[str]]:
        keys = ("n_tokens", "n_host", "weights", "static", "row_cache", "index", "workspace",
                "prefill_workspace", "decode_workspace", "host_kv", "host_index", "budget", "prefill_chunk")
        return {**{k: getattr(self, k) for k in keys}, "total": self.total, "notes": self.notes}

    def describe(self) -> str:
        parts = ", ".join(f"{k} {getattr(self, k) / GiB:.2f}" for k in
                          ("weights", "static", "row_cache", "index", "workspace"))
        return f"{self.total / GiB:.2f} GiB for {self.n_tokens} tokens ({parts} GiB)"


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str):
        if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'bfloat16' or torch.bfloat16")
        dtype = getattr(torch, dtype)
    return dtype


def _itemsize(dtype: torch.dtype | str) -> int:
    return torch.empty(0, dtype=_dtype(dtype)).element_size()


def static_tier_bytes(cfg: ModelConfig, rcfg: RetrievalConfig, evict_batch: int, itemsize: int) -> int:
    """Bytes of every layer's static tier (tiers/layer_tiers.py LayerTiers): K and V of
    n_sink + n_window + evict_batch rows [H_kv, D] and an int64 position each. 0 for dense."""
    if rcfg.method == "dense":
        return 0
    rows = rcfg.n_sink + rcfg.n_window + evict_batch
    return rows * (2 * cfg.n_kv_heads * cfg.head_dim * itemsize + 8) * cfg.n_layers


def dense_kv_bytes(cfg: ModelConfig, n_tokens: int, itemsize: int) -> int:
    """Bytes of DenseKV for n_tokens in every layer (its capacity doubles from 1024 rows)."""
    return _dense_capacity(n_tokens) * 2 * cfg.n_kv_heads * cfg.head_dim * itemsize * cfg.n_layers


def fmt_bytes(n: int) -> str:
    """1536 -> '1.5 KiB', for messages."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def available_bytes(device: torch.device) -> int:
    """Memory a new allocation can take on `device` now: free CUDA memory, or the host's
    available memory (psutil) for the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def _chunks(rows: int, chunk: int) -> int:
    return -(-rows // chunk) * chunk


def _dense_capacity(n: int) -> int:
    return dense_capacity(n)  # DenseKV's growth rule (tiers/dense.py)


def hip_host_copy(rcfg: RetrievalConfig, cache_cfg: CacheConfig, runtime: RuntimeConfig) -> str | None:
    """Why HiP with keys_on="host" keeps its own pinned copy of the host keys (model dtype, in
    chunks of its chunk_rows) instead of searching the host tier in place (index/hip_tier.py
    attach_host_tier, runtime/indexes.py), or None where it reads the tier in place: in the
    model dtype or 8-bit (CacheConfig.host_dtype) alike."""
    p = HipParams.from_options(rcfg.options)
    if rcfg.position_mode == "extrapolate":
        return "extrapolate mode indexes position-free keys, not the tier's"
    if cache_cfg.host_chunk_tokens % p.chunk_sizes[0]:
        return (f"CacheConfig.host_chunk_tokens={cache_cfg.host_chunk_tokens} is not a multiple of "
                f"chunk_sizes[0]={p.chunk_sizes[0]}")
    if cache_cfg.disk_dir is not None and runtime.host_memory_budget:
        return "the host tier spills to disk (CacheConfig.disk_dir), which the search does not read"
    return None


def _index_bytes(cfg: ModelConfig, rcfg: RetrievalConfig, n_host: int, isz: int, cache_cfg: CacheConfig,
                 runtime: RuntimeConfig) -> tuple[int, int, list[str]]:
    """(device bytes, host bytes, notes) of the retriever's copy for n_host rows."""
    hkv, d, layers, opts = cfg.n_kv_heads, cfg.head_dim, cfg.n_layers, rcfg.options
    m = rcfg.method
    if m == "hip" and opts.get("keys_on") == "host":  # the host tier's keys, read in place
        state = _selection_state(cfg, rcfg, n_host)
        why = hip_host_copy(rcfg, cache_cfg, runtime)
        if why is None:
            return state, 0, ["hip keys_on='host' searches the host tier's pinned keys in place (no copy)"]
        copy = _chunks(n_host, HipParams.from_options(opts).chunk_rows) * hkv * d * isz * layers
        return state, copy, [f"hip keys_on='host' keeps a pinned model-dtype copy of the keys: {why}"]
    if m in MIRROR_METHODS:
        mirror = _chunks(n_host, int(opts.get("chunk_rows", 16384))) * hkv * d * isz * layers
        return mirror + _selection_state(cfg, rcfg, n_host), 0, []
    if m == "actqkv":
        block = int(opts.get("block_size", 0)) or 32  # index/actqkv.py: 32 for every family
        blocks = -(-n_host // block)
        return _chunks(blocks, 4096) * hkv * d * 4 * layers + block * hkv * d * isz * layers, 0, []
    if m == "attention_graph":
        degree = int(opts.get("max_degree", 32))
        per_key = 4 * d + 4 * degree + 12  # fp32 key, int32 edges, degree, bias, parent
        return 0, n_host * hkv * per_key * layers, ["attention_graph host index: capacity grows by doubling"]
    if m == "faiss":
        return 0, 0, ["faiss index size is not modelled"]
    return 0, 0, []


def _selection_state(cfg: ModelConfig, rcfg: RetrievalConfig, n_host: int) -> int:
    """Device bytes a retriever keeps between steps beside its key copy: tokenselect's last
    query (fp32 [H_q * D]) and ids (int64 [budget]) per layer; hip's stage masks (int64
    kept_tokens of every stage per layer) and its counting arange (int64, grown to < 2x the
    host rows, the one it replaced alive while masks view it: < 3 n_host in all)."""
    if rcfg.method == "tokenselect":
        return (cfg.n_heads * cfg.head_dim * 4 + rcfg.budget * 8) * cfg.n_layers
    if rcfg.method == "hip":
        p = HipParams.from_options(rcfg.options)
        return sum(p.kept_tokens) * 8 * cfg.n_layers + 3 * max(n_host, rcfg.budget) * 8
    return 0


def plan_memory(
    model_cfg: ModelConfig,
    retrieval_cfg: RetrievalConfig,
    runtime_cfg: RuntimeConfig,
    n_tokens: int,
    dtype: torch.dtype | str,
    *,
    cache_cfg: CacheConfig | None = None,
    scheduler: SchedulerParams | None = None,
    cache_bytes: int | None = None,
    check: bool = True,
    weight_storage: Mapping[str, tuple[int, int | None, bool]] | None = None,
) -> MemoryPlan:
    """The device-memory plan of a session holding n_tokens (see the module doc).

    cache_bytes: the row cache to plan for (default: resolved from `scheduler`'s
    cache_bytes when runtime_cfg.scheduler == "overlap", else 0). check: raise a
    ValueError naming what would fit when the total exceeds gpu_memory_budget.
    weight_storage: linears held otherwise than runtime_cfg.weights says, as weight_bytes's
    `storage` (a GGUF's: runtime/quant_gguf.py linear_storage).
    """
    _check_tokens(n_tokens)
    cache_cfg = cache_cfg or CacheConfig()
    params = scheduler or SchedulerParams()
    isz = _itemsize(dtype)
    if cache_bytes is None:
        cache_bytes = 0
        if runtime_cfg.scheduler == "overlap" and retrieval_cfg.method != "dense":
            cache_bytes = resolve_cache_bytes(model_cfg, retrieval_cfg, runtime_cfg, params, dtype,
                                              "cuda", cache_cfg, n_tokens=n_tokens)
    tinygemm = _tinygemm(runtime_cfg, dtype)
    weights = weight_bytes(model_cfg, isz, runtime_cfg.weights, runtime_cfg.quant_group, tinygemm, weight_storage)
    plan = _plan(model_cfg, retrieval_cfg, runtime_cfg, cache_cfg, params, n_tokens, isz, cache_bytes, tinygemm,
                 weights=weights)
    if check and not plan.fits:
        raise ValueError(_refusal(plan, model_cfg, retrieval_cfg, runtime_cfg, cache_cfg, params, isz))
    return plan


def _check_tokens(n_tokens: int) -> None:
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 0:
        raise ValueError(f"n_tokens must be an int >= 0, got {n_tokens!r}")


def _tinygemm(runtime_cfg: RuntimeConfig, dtype: torch.dtype | str) -> bool:
    """int4 linears of a bf16 model hold tinygemm's layout beside ours (the plan is a CUDA plan)."""
    return (runtime_cfg.weights == "int4" and _dtype(dtype) == torch.bfloat16
            and runtime_cfg.quant_group in TINYGEMM_GROUPS)


def _plan(cfg, rcfg, runtime, cache_cfg, params, n: int, isz: int, cache_bytes: int,
          tinygemm: bool = False, chunk: int | None = None, free_bytes: int | None = None,
          weights: int | None = None) -> MemoryPlan:
    """The plan at n tokens. Its prefill chunk: runtime.prefill_chunk, else `chunk`, else the
    auto choice (prefill_chunk.auto_chunk) within the budget and `free_bytes`. weights: the weights' bytes
    (None: weight_bytes by runtime.weights's rule alone)."""
    hkv, d, layers = cfg.n_kv_heads, cfg.head_dim, cfg.n_layers
    token_row = 2 * hkv * d * isz
    if rcfg.method == "dense":
        n_host = 0
        static = _dense_capacity(n) * token_row * layers
    else:
        n_host = max(0, n - rcfg.n_sink - rcfg.n_window)
        # the GPU plan: the window ring holds up to evict_batch more tokens (CacheConfig)
        static = (rcfg.n_sink + rcfg.n_window + cache_cfg.resolved_evict_batch("cuda")) * (token_row + 8) * layers
        if rcfg.method in STABLE_METHODS:  # decode keeps the selection's stable rows on the GPU
            static += rcfg.budget * token_row * layers
    per_token = token_row * layers
    row_cache = (cache_bytes // per_token) * per_token if rcfg.method != "dense" else 0
    index, host_index, notes = _index_bytes(cfg, rcfg, n_host, isz, cache_cfg, runtime)
    dec = decode_workspace(cfg, rcfg, runtime, params, n_host, isz)
    if rcfg.method == "dense":
        dec += static // 2  # growth: the old buffer is copied into one twice its size
    if weights is None:
        weights = weight_bytes(cfg, isz, runtime.weights, runtime.quant_group, tinygemm)

    def prefill(c: int) -> int:
        return prefill_workspace(cfg, rcfg, runtime, cache_cfg, n, n_host, isz, c)

    chunk = runtime.prefill_chunk or chunk
    if chunk is None:
        room = chunk_room(runtime.gpu_memory_budget, weights + static + row_cache + index, free_bytes)
        chunk = auto_chunk(prefill, room, SELECTING_CHUNK_MAX if selecting(rcfg, n) else None)
    pre = prefill(chunk)
    host_row = token_row if cache_cfg.host_dtype is None else 2 * packed_row_bytes((hkv, d))  # 8-bit: codes + scales
    host_kv = _chunks(n_host, cache_cfg.host_chunk_tokens) * (host_row + 8) * layers
    return MemoryPlan(n, n_host, weights, static, row_cache, index, max(pre, dec), pre, dec,
                      host_kv, host_index, runtime.gpu_memory_budget, chunk, notes)


def pick_prefill_chunk(
    model_cfg: ModelConfig,
    retrieval_cfg: RetrievalConfig,
    runtime_cfg: RuntimeConfig,
    n_tokens: int,
    dtype: torch.dtype | str,
    *,
    cache_cfg: CacheConfig | None = None,
    scheduler: SchedulerParams | None = None,
    cache_bytes: int = 0,
    free_bytes: int | None = None,
) -> int:
    """Tokens per prefill chunk on CUDA for a context growing to n_tokens.

    RuntimeConfig.prefill_chunk when set; else the largest of PREFILL_CHUNKS (16384 .. 512;
    at most SELECTING_CHUNK_MAX = 4096 where chunks select host rows by their queries: past
    prefill_dense_tokens in exact mode, always in extrapolate mode) whose prefill workspace (the plan's estimate at n_tokens) fits what gpu_memory_budget
    leaves after the weights, static tier, row cache (cache_bytes) and index, less
    budget // CACHE_HEADROOM, and fits free_bytes (the device memory a session can still
    take, less what the feed adds to the tiers); 512 when none fits (the plan then refuses
    or the budget is the caller's to raise)."""
    _check_tokens(n_tokens)
    if runtime_cfg.prefill_chunk is not None:
        return runtime_cfg.prefill_chunk
    isz = _itemsize(dtype)
    tinygemm = _tinygemm(runtime_cfg, dtype)
    plan = _plan(model_cfg, retrieval_cfg, runtime_cfg, cache_cfg or CacheConfig(), scheduler or SchedulerParams(),
                 n_tokens, isz, cache_bytes, tinygemm, free_bytes=free_bytes)
    return plan.prefill_chunk


def _max_context(cfg, rcfg, runtime, cache_cfg, params, isz: int, cache_bytes: int, hi: int,
                 weights: int | None = None) -> int:
    """The longest context whose plan fits the budget with this cache (-1: none)."""
    def fits(n: int) -> bool:
        return _plan(cfg, rcfg, runtime, cache_cfg, params, n, isz, cache_bytes, weights=weights).fits

    if not fits(0):
        return -1
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def _refusal(plan: MemoryPlan, cfg, rcfg, runtime, cache_cfg, params, isz: int) -> str:
    budget = plan.budget
    msg = [f"the session needs {plan.describe()}, over gpu_memory_budget={budget / GiB:.2f} GiB."]
    longest = _max_context(cfg, rcfg, runtime, cache_cfg, params, isz, plan.row_cache, plan.n_tokens,
                           plan.weights)
    if longest >= 0:
        msg.append(f"It would fit with a context of at most {longest} tokens.")
    else:
        msg.append("Even an empty context does not fit: weights, static tier and row cache exceed it.")
    if plan.row_cache:
        room = budget - (plan.total - plan.row_cache)
        if room >= 0:
            per = 2 * cfg.n_kv_heads * cfg.head_dim * isz * cfg.n_layers
            msg.append(f"Or keep {plan.n_tokens} tokens with SchedulerParams(cache_bytes<={room}) "
                       f"({room // per} tokens per layer).")
    msg.append("Raise the budget, shorten the context, shrink n_window or the row cache, "
               "or pick a method without a GPU key copy (attention_graph).")
    return " ".join(msg)


def resolve_cache_bytes(
    model_cfg: ModelConfig, retrieval_cfg: RetrievalConfig, runtime_cfg: RuntimeConfig,
    params: SchedulerParams, dtype: torch.dtype | str, device: torch.device | str,
    cache_cfg: CacheConfig | None = None, *, n_tokens: int | None = None,
) -> int:  # fmt: skip
    """Row-cache bytes for SchedulerParams.cache_bytes: the number itself, or for "auto"
    budget * H_kv token rows per layer, shrunk to the headroom the GPU budget leaves at
    n_tokens (default: CacheConfig.max_context; set it when a budget is given, or the
    cache is sized for an empty context)."""
    if params.cache_bytes != "auto":
        return int(params.cache_bytes)
    isz = _itemsize(dtype)
    per_token = 2 * model_cfg.n_kv_heads * model_cfg.head_dim * isz * model_cfg.n_layers
    want = retrieval_cfg.budget * model_cfg.n_kv_heads * per_token
    budget = runtime_cfg.gpu_memory_budget
    if not budget or torch.device(device).type != "cuda":
        return want
    cache_cfg = cache_cfg or CacheConfig()
    n = cache_cfg.max_context if n_tokens is None else n_tokens
    # the row cache is sized before the auto prefill chunk, which takes what the cache leaves
    rest = _plan(model_cfg, retrieval_cfg, runtime_cfg, cache_cfg, params, n, isz, 0, chunk=PREFILL_CHUNKS[-1]).total
    # the plan does not model the allocator's rounding and per-step transients: keep 1/64
    # of the budget free (at 128K with the exact retriever the peak ran 0.09 GiB over 24 GiB)
    return max(0, min(want, budget - rest - budget // CACHE_HEADROOM))

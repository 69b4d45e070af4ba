"""The host tier's bytes (TieredKVCache, tiers/kvcache.py): the bytes of one token, and with a
disk tier how many host chunks per layer a host budget keeps in memory and where the older
chunks spill (memory-mapped files in the session's SpillDir, tiers/chunked.py).
"""

from __future__ import annotations

import torch

from kvloft.config import ModelConfig
from kvloft.kernels.rowquant import packed_row_bytes
from kvloft.tiers.chunked import SpillDir, SpillPolicy

__all__ = ["SPILLED", "host_token_bytes", "resident_chunks", "spill_policies"]

SPILLED = ("k", "v", "pos", "k.scale", "v.scale")  # the stores of a layer that spill (scales: 8-bit tiers)


def host_token_bytes(cfg: ModelConfig, dtype: torch.dtype, host_dtype: str | None = None) -> int:
    """Host-tier bytes of one token of one layer: keys and values (model dtype, or 8-bit codes
    + an fp32 scale per KV head) and its int64 position."""
    row = (cfg.n_kv_heads, cfg.head_dim)
    if host_dtype is None:
        kv = cfg.n_kv_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size()
    else:
        kv = packed_row_bytes(row)
    return 2 * kv + 8


def resident_chunks(host_budget: int, host_chunk: int, row_bytes: int, n_layers: int) -> int:
    """Host chunks per layer (of k, v and pos each) that host_budget bytes keep in memory;
    ValueError if not one (row_bytes: host_token_bytes)."""
    per_chunk = host_chunk * row_bytes * n_layers  # one chunk of k, v, pos per layer
    n = host_budget // per_chunk
    if n < 1:
        raise ValueError(
            f"host_memory_budget={host_budget / 2**20:.2f} MiB holds no host chunk: spilling to disk "
            f"keeps at least one chunk per layer in memory ({per_chunk / 2**20:.2f} MiB with "
            f"host_chunk_tokens={host_chunk}); raise the budget or lower "
            "CacheConfig.host_chunk_tokens"
        )
    return n


def spill_policies(spill_dir: SpillDir | None, max_resident: int, layer: int) -> dict[str, SpillPolicy] | None:
    """Layer `layer`'s SpillPolicy per stored tensor (SPILLED): at most max_resident chunks in
    memory, the older ones in files layer{layer}.{name}.{chunk}.bin; None without a disk tier."""
    if spill_dir is None:
        return None
    d = spill_dir
    return {name: SpillPolicy(max_resident, lambda ci, n=name: d.file(f"layer{layer}.{n}.{ci}.bin"))
            for name in SPILLED}

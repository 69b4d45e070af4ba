"""KV tiers of one session (DESIGN.md, Tiers): TieredKVCache, every layer's LayerTiers.

Per layer (tiers/layer_tiers.py), keys are stored after RoPE and values as is, token-major
`[T, H_kv, D]`:

- static tier, on the compute device: the first `n_sink` tokens and a ring of the last
  `n_window` (+ `evict_batch`: decode moves tokens down that many at a time).
- host tier: every token older than the window, appended in order to chunked rows (pinned when
  CUDA is present), with its position; copied down asynchronously on the cache's one copy stream.
- block summary (sparse prefill): the mean key of every `block` host rows per KV head.
- disk tier (optional, `disk_dir`): when the host tier would pass the host budget, each
  layer's oldest full host chunks move to memory-mapped files in a per-session directory
  under `disk_dir` (tiers/chunked.py, SpillPolicy; tiers/host_budget.py); readers see the
  same chunk list. The directory is removed when the cache is closed or garbage-collected.
- 8-bit host tier (`host_dtype` "fp8" / "int8"): host keys and values are stored as one-byte
  codes with an fp32 scale per row and KV head (tiers/host_store.py, tiers/packed.py,
  kernels/rowquant.py); reads dequantize, kernels read the codes in place. Positions, the
  static tier and the block summary stay exact.

`Evicted`, `LayerTiers` (tiers/layer_tiers.py), `host_token_bytes` (tiers/host_budget.py),
`DenseKV` (the baseline's store, tiers/dense.py) and `BlockSummary` (tiers/block_summary.py)
are re-exported here.
"""

from __future__ import annotations

import weakref

import torch

from kvloft.config import ModelConfig
from kvloft.tiers.block_summary import BlockSummary
from kvloft.tiers.chunked import SpillDir
from kvloft.tiers.dense import DenseKV
from kvloft.tiers.host_budget import host_token_bytes, resident_chunks, spill_policies
from kvloft.tiers.host_store import check_host_device
from kvloft.tiers.layer_tiers import Evicted, LayerTiers

__all__ = ["BlockSummary", "DenseKV", "Evicted", "LayerTiers", "TieredKVCache", "host_token_bytes"]


class TieredKVCache:
    """Every layer's tiers. Tokens enter in order; positions are kept with them.

    disk_dir + host_budget (bytes, > 0): keep at most host_budget bytes of host chunks in
    memory (the same number of chunks per layer and tensor) and spill older chunks to
    files under disk_dir. Without disk_dir the host tier stays in memory and the caller
    enforces its budget (Session refuses).

    host_dtype: None = host rows in the model dtype; "fp8" / "int8" = 8-bit codes with an
    fp32 scale per row and KV head (tiers/packed.py; about half the bytes in memory, on disk
    and over PCIe per selected row). The static tier stays in the model dtype.
    """

    def __init__(self, cfg: ModelConfig, *, n_sink: int, n_window: int, host_chunk: int,
                 device: torch.device, dtype: torch.dtype, disk_dir: str | None = None,
                 host_budget: int = 0, evict_batch: int = 0, host_dtype: str | None = None) -> None:
        check_host_device(host_dtype, device)
        pin = device.type == "cuda"
        self.cfg = cfg
        self.host_chunk = host_chunk
        self.host_dtype = host_dtype
        self.row_bytes = host_token_bytes(cfg, dtype, host_dtype)
        self.max_resident = 0  # host chunks per layer kept in memory (0 = all)
        self.spill_dir: SpillDir | None = None
        if disk_dir is not None and host_budget:
            self.max_resident = resident_chunks(host_budget, host_chunk, self.row_bytes, cfg.n_layers)
            self.spill_dir = SpillDir(disk_dir)
            self._finalizer = weakref.finalize(self, self.spill_dir.remove)
        # one stream for every layer's asynchronous copy down (made here, never at import)
        copy_stream = torch.cuda.Stream(device) if pin and self.spill_dir is None else None
        self.layers = [LayerTiers(cfg, n_sink, n_window, host_chunk, device, dtype, pin,
                                  spill_policies(self.spill_dir, self.max_resident, i), copy_stream,
                                  evict_batch, host_dtype)
                       for i in range(cfg.n_layers)]

    def close(self) -> None:
        """Remove the spilled chunks' files now (also done when the cache is garbage-collected).

        Tensors already mapped stay readable (POSIX keeps an unlinked file's pages while mapped)."""
        if self.spill_dir is not None:
            self._finalizer()

    def __getitem__(self, layer: int) -> LayerTiers:
        return self.layers[layer]

    @property
    def n_tokens(self) -> int:
        t = self.layers[0]
        return t.n_static + t.n_host

    def bytes(self) -> dict[str, int]:
        """static: compute-device tier; host: host tier in memory; disk: host chunks spilled to
        disk; summary: the sparse prefill's block summaries (compute device; 0 until used)."""
        return {
            "static": sum(t.static_bytes() for t in self.layers),
            "host": sum(t.host_bytes() for t in self.layers),
            "disk": sum(t.disk_bytes() for t in self.layers),
            "summary": sum(t.summary_bytes() for t in self.layers),
        }

    def _chunks_after(self, n_new_host: int) -> int:
        return -(-(self.layers[0].n_host + n_new_host) // self.host_chunk)

    def host_bytes_after(self, n_new_host: int) -> int:
        """Host bytes in memory once `n_new_host` more tokens sit in the host tier (whole chunks;
        with a disk tier, at most max_resident chunks per layer)."""
        n_chunks = self._chunks_after(n_new_host)
        if self.max_resident:
            n_chunks = min(n_chunks, self.max_resident)
        return n_chunks * self.host_chunk * self.row_bytes * len(self.layers)

    def disk_bytes_after(self, n_new_host: int) -> int:
        """Bytes spilled to disk once `n_new_host` more tokens sit in the host tier."""
        if not self.max_resident:
            return 0
        n_chunks = max(0, self._chunks_after(n_new_host) - self.max_resident)
        return n_chunks * self.host_chunk * self.row_bytes * len(self.layers)

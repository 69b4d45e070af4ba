"""HiP's rank="z" statistics (index/hip.py; the arithmetic in index/key_moments.py).

With rank="z" a select that recomputes a stage scores z-scored logits: each query head's
logits centred and scaled by the mean and covariance of its KV head's indexed keys (KeyMoments),
so heads whose logits sit on different scales compare fairly in a chunk's max. The statistics
are folded in as keys are indexed (build, add), or remade from the store's rows (a scan, rare)
wherever they do not count its rows: a host tier attached in place, a rollback or a reload.
An 8-bit host tier's keys are counted as the tier holds them (dequantized), the values the
stages score.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from kvloft.index.key_moments import KeyMoments
from kvloft.kernels.rowquant import dequantize_rows, quantize_rows
from kvloft.tiers.chunked import ChunkedRows

__all__ = ["add_moments", "moments_of"]


def add_moments(hip: Any, layer: int, keys: Tensor) -> None:
    """Fold keys [H_kv, n, D] into the layer's statistics (O(n * D^2) per KV head); nothing
    unless rank="z" (hip: the retriever; index/hip.py imports this module, not the reverse)."""
    if hip.params.rank != "z":
        return
    if layer not in hip.moments:
        if layer in hip.tiers:
            return  # an attached tier's statistics are made from its rows at the next select
        hip.moments[layer] = KeyMoments(hip.model_cfg.n_kv_heads, hip.model_cfg.head_dim, hip.device)
    kind = getattr(hip.tiers.get(layer), "host_dtype", None)
    if kind is not None:  # an 8-bit tier holds (and the search reads) these keys as rounded there
        keys = dequantize_rows(*quantize_rows(keys, kind), kind, keys.dtype)
    hip.moments[layer].add(keys.transpose(0, 1))


def moments_of(hip: Any, layer: int, store: ChunkedRows) -> KeyMoments:
    """The layer's statistics, remade from the store's rows (a scan, rare) when they do not
    count its rows: a tier attached in place, or rolled back (runtime rollback(); an attached
    tier's index is not rebuilt) or reloaded without a build. Otherwise incremental. An 8-bit
    tier's rows are read dequantized (PackedRows.iter_chunks), the values the stages score."""
    m = hip.moments.get(layer)
    if m is None or m.count != len(store):
        m = KeyMoments(hip.model_cfg.n_kv_heads, hip.model_cfg.head_dim, hip.device)
        for _, rows in store.iter_chunks():
            m.add(rows)
        hip.moments[layer] = m
    return m

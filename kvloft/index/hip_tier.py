"""Where HiP's keys live (index/hip.py): its own copy, or the session's host tier read in place.

hip option keys_on="device" keeps a copy of the keys on the compute device (on CUDA it grows
with the context: N * H_kv * D * 2 bytes per layer). keys_on="host" keeps them in pinned host
memory, the stage kernels reading only the probe rows over PCIe (zero-copy through unified
addressing): either the index's own pinned copy, or, once attached (attach_host_tier), the
session's host tier itself (tiers/layer_tiers.py LayerTiers), so the host holds the keys once.

An 8-bit host tier (CacheConfig.host_dtype "fp8" / "int8", tiers/packed.py) is searched in
place as well: the stage kernels read each probe row's codes and per-head scales and
dequantize in registers (kernels/hip_stage.py), the torch path reads dequantized rows, and
rank="z"'s statistics are made from the dequantized rows (index/hip_zrank.py); the index holds
no key copy, so the host holds the packed rows once (about half the bytes of a model-dtype
tier). The batched search (index/hip_batch.py) reads such rows in place too (the codes' and
the scales' address tables of every row, concatenated alike); rows of different formats never
search together (HipRetriever.search_key holds host_formats).
"""

from __future__ import annotations

from typing import Any

import torch

from kvloft.index.hip_params import HipParams
from kvloft.index.hip_state import fresh_state

__all__ = ["attach_host_tier", "host_formats", "key_store_device"]


def key_store_device(params: HipParams, device: torch.device, use_kernel: bool) -> torch.device:
    """Where the index's own key copy lives: the CPU for keys_on="host" off the CPU (read
    zero-copy by the Triton stage kernels: ValueError with kernel="torch"), else `device`."""
    host = params.keys_on == "host" and device.type != "cpu"
    if host and not use_kernel:
        raise ValueError("hip option keys_on='host' reads keys from pinned host memory with the Triton "
                         "stage kernels; drop kernel='torch' (or use keys_on='device')")
    return torch.device("cpu") if host else device


def attach_host_tier(hip: Any, layer: int, tiers: Any) -> bool:
    """HipRetriever.attach_host_tier (hip: the retriever; index/hip.py imports this module, not
    the reverse; tiers: the layer's LayerTiers). keys_on="host": search the session's host tier
    in place instead of a copy of its keys, model-dtype rows or 8-bit codes + scales alike.
    Returns False (the runtime then calls build, and the index keeps its own model-dtype copy of
    the keys) when the tier's chunks cannot be read so: spilled to disk (memory-mapped, not
    pinned), not pinned while searching on CUDA, or chunked in a size that is not a multiple of
    chunk_sizes[0]."""
    if hip.params.keys_on != "host":
        return False
    host_k = tiers.host_k
    readable = host_k.pin or hip.device.type == "cpu"
    if not readable or host_k.spill is not None or host_k.chunk_rows % hip.params.chunk_sizes[0]:
        return False
    hip.keys.pop(layer, None)
    hip.moments.pop(layer, None)  # rank="z": made from the tier's rows at the first select
    hip.tiers[layer] = tiers
    hip.state[layer] = fresh_state(hip.params, layer)
    return True


def host_formats(hip: Any) -> tuple[str, ...]:
    """The formats ("fp8", "int8"; sorted, each once) of the 8-bit host tiers `hip` searches in
    place (PackedRows: codes + scales); () where every layer searches model-dtype rows."""
    return tuple(sorted({t.host_dtype for t in hip.tiers.values() if getattr(t, "host_dtype", None) is not None}))

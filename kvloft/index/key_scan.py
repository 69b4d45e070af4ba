"""The scan of a chunked key mirror: one decode token's q·K over every stored row, in one launch.

exact, tokenselect and recycled keep their keys token-major in a ChunkedRows (tiers/chunked.py)
and score all of them each step. One launch per chunk (kernels/scoring.py) and a torch.cat
after it ran at 28.75 -> 50.55 ms/token on an H100 (Llama-3-8B, 128K context, exact) going from
one 131072-row chunk to 16384-row chunks: a launch over 16384 rows reaches ~0.5-0.75 TB/s, over
131072 rows ~2.1 TB/s. Larger chunks would waste memory (chunks are allocated whole), so on
CUDA `scan_store` reads every chunk through the store's address table in one launch
(kernels/scoring_batched.py, one row of the batch) and writes the [H, N] result in place.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from kvloft.kernels import score_keys
from kvloft.kernels.scoring import BLOCK_N
from kvloft.kernels.scoring_batched import score_batched
from kvloft.tiers.chunked import ChunkedRows

__all__ = ["scan_store"]


def scan_store(q: Tensor, store: ChunkedRows, *, reduce: str = "none", scale: float = 1.0) -> Tensor:
    """q [H_q, D] · every row of store (N = len(store) rows [H_kv, D]) -> [H_q, N] fp32 logits
    times scale (reduce "none"), or the GQA group's "max" / "sum" of them [H_kv, N].

    Exactly `torch.cat([score_keys(q, chunk, reduce=reduce, scale=scale) for _, chunk in
    store.iter_chunks()], dim=1)`. The one-launch route (`_one_launch`) does each BLOCK_N-row
    tile's arithmetic as scoring.py's kernel does it (bit for bit in the Triton interpreter,
    tests/index/test_key_scan.py): chunk_rows is a multiple of BLOCK_N, so every tile lies
    inside one chunk and covers the rows scoring.py's tile at that offset of the chunk covers;
    both take the same tl.dot of the group's queries (cast to the keys' dtype, [BLOCK_G,
    BLOCK_D], fp32 "ieee") by the tile's keys, multiply by scale, and fold the group with the
    same reduce_group_scores. The launch is told the store holds its capacity (len(chunks) *
    chunk_rows rows), so its meta changes only when a chunk is added and costs no copy per
    call: every row read lies inside an allocated chunk, and a row past N (never written, any
    bits) feeds only its own column of the dot, past the N columns written. Elsewhere (CPU,
    spilled chunks, one chunk) one launch per chunk.
    """
    if _one_launch(q, store):
        table = store.pointer_table(q.device)  # made again only when a chunk is added or spilled
        meta = _capacity_meta(q.device, len(store.chunks) * store.chunk_rows, store.chunk_rows)
        return score_batched(q[None], table, store.chunks[0], meta, len(store), reduce=reduce, scale=scale)[0]
    parts = [score_keys(q, chunk, reduce=reduce, scale=scale) for _, chunk in store.iter_chunks()]
    if not parts:
        heads = q.shape[0] if reduce == "none" else store.row_shape[0]
        return torch.empty((heads, 0), dtype=torch.float32, device=q.device)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _one_launch(q: Tensor, store: ChunkedRows) -> bool:
    """The store's chunks can be scanned in one launch through their addresses: q and every
    chunk on one CUDA device (none spilled), float rows, tiles that never straddle two chunks,
    more than one chunk filled (one chunk is one launch already)."""
    return (q.device.type == "cuda" and store.device.type == "cuda" and store.n_spilled == 0
            and store.dtype.is_floating_point and store.chunk_rows % BLOCK_N == 0
            and len(store) > store.chunk_rows and store.chunks[0].device == q.device)


@functools.cache
def _capacity_meta(device: torch.device, capacity: int, chunk_rows: int) -> Tensor:
    """[3, 1] int64 on device: n_keys = capacity, table offset 0, chunk_rows. Shared by every
    store of that capacity and chunk size (every layer of a session), copied down once and never
    freed, so no launch on any stream reads a reused block: one small block per capacity seen
    (64 for stores grown to 1M rows in 16384-row chunks)."""
    return torch.tensor([[capacity], [0], [chunk_rows]], dtype=torch.int64).to(device)

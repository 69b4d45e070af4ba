"""Moving host-tier rows to the compute device for prefill (runtime/attention.py).

stream_host_chunks  every host chunk of a layer, one at a time, through two staging
                    buffers (CUDA: the next chunk's copy on a side stream, ordered by events)
gather_token_rows   whole token rows of a chunked store, one index_select per chunk touched
top_block_rows      the rows of the best-scoring blocks per KV head within a budget (the
                    sparse prefill's selection over the block summary)
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from kvloft.kernels.rowquant import dequantize_rows
from kvloft.tiers.chunked import ChunkedRows
from kvloft.tiers.kvcache import LayerTiers
from kvloft.tiers.packed import PackedRows

__all__ = ["gather_token_rows", "stream_host_chunks", "top_block_rows"]


def stream_host_chunks(tiers: LayerTiers, device: torch.device, side=None) -> Iterator[tuple[Tensor, Tensor]]:
    """Each host chunk's keys and values [m, H_kv, D] on `device`, one chunk at a time, in order.

    Not CUDA: the chunks as they are (`.to(device)`, one at a time). CUDA (`side`: a stream
    of the device): two staging buffers the size of a chunk; chunk i+1's H2D runs on `side`
    while the caller's kernels read chunk i. Events order it, no device-wide sync: `side`
    waits for the tier's copy down in flight and for the caller to be done with a buffer;
    the compute stream waits for a buffer's copy before the caller gets it. At most two host
    chunks are on the device. A yielded pair is valid until the next one is asked for.
    An 8-bit host tier (CacheConfig.host_dtype) moves its codes and scales (about half the
    bytes) and dequantizes them on the device, on the compute stream.
    """
    if device.type != "cuda":
        for _, hk, hv in tiers.host_chunk_pairs():
            yield hk.to(device), hv.to(device)
        return
    compute = torch.cuda.current_stream(device)
    bufs: list[tuple[Tensor, ...]] = []
    free: list = []  # per buffer, an event after the caller's last kernels on it
    pending = None
    try:
        for i, (_, parts) in enumerate(tiers.host_chunk_parts(side)):
            if not bufs:  # the first chunk is the largest (full, or the only one)
                bufs = [tuple(torch.empty_like(p, device=device) for p in parts) for _ in range(2)]
                free = [torch.cuda.Event(), torch.cuda.Event()]
                for ev in free:
                    ev.record(compute)  # made on the compute stream: free for `side` from here
            b, m = i % 2, parts[0].shape[0]
            side.wait_event(free[b])
            with torch.cuda.stream(side):
                staged = tuple(buf[:m].copy_(p, non_blocking=True) for buf, p in zip(bufs[b], parts))
            ready = torch.cuda.Event()
            ready.record(side)
            if pending is not None:
                yield from _hand_over(compute, free, tiers, *pending)
            pending = (b, staged, ready)
        if pending is not None:
            yield from _hand_over(compute, free, tiers, *pending)
    finally:
        compute.wait_stream(side)  # a copy not handed over (caller stopped) ends before reuse


def _hand_over(compute, free: list, tiers: LayerTiers, b: int, staged: tuple[Tensor, ...],
               ready) -> Iterator[tuple[Tensor, Tensor]]:
    compute.wait_event(ready)
    if len(staged) == 2:
        yield staged
    else:  # (key codes, key scales, value codes, value scales): dequantized here, on the compute stream
        kind, dtype = tiers.host_dtype, tiers.k.dtype
        yield dequantize_rows(staged[0], staged[1], kind, dtype), dequantize_rows(staged[2], staged[3], kind, dtype)
    free[b].record(compute)  # the caller's kernels on buffer b are queued by now


def gather_token_rows(store: ChunkedRows | PackedRows, rows: Tensor, pin: bool = False) -> Tensor:
    """Whole rows of a chunked store: rows [n] int64, ascending, in [0, len(store)) ->
    [n, *row_shape] on the store's device; one index_select per chunk touched, each written
    straight into its slice of the result (no concatenation). pin: the result in pinned
    memory (PyTorch's caching host allocator), so its copy to a GPU can be asynchronous and
    runs at pinned bandwidth (a pageable tensor is staged by the driver). An 8-bit store's
    codes and scales are gathered so, then dequantized (to the store's dtype)."""
    if isinstance(store, PackedRows):
        codes, scales = gather_token_rows(store.codes, rows), gather_token_rows(store.scales, rows)
        return dequantize_rows(codes, scales, store.host_dtype, store.dtype)
    out = torch.empty((rows.shape[0], *store.row_shape), dtype=store.dtype, device=store.device,
                      pin_memory=pin and store.device.type == "cpu")
    cid = rows // store.chunk_rows
    chunks, counts = torch.unique_consecutive(cid, return_counts=True)
    at = 0
    for ci, n in zip(chunks.tolist(), counts.tolist()):
        torch.index_select(store.chunks[ci], 0, rows[at : at + n] - ci * store.chunk_rows, out=out[at : at + n])
        at += n
    return out


def top_block_rows(scores: Tensor, n_rows: int, block: int, budget: int) -> Tensor:
    """Host rows of the best-scoring blocks of each KV head, up to `budget` rows each.

    scores: [H_kv, n_blocks]; block b holds rows [b * block, min((b + 1) * block, n_rows)).
    Blocks are taken in descending score while their rows fit in the budget (at least one
    block when budget > 0), so a budget >= n_rows takes every row.
    Returns ids [H_kv, k] int64 on scores' device, ascending per head, -1 padding at the end
    (heads differ in count only when some take the partial last block).
    """
    hkv, nb = scores.shape
    dev = scores.device
    if budget == 0 or nb == 0:
        return torch.empty((hkv, 0), dtype=torch.int64, device=dev)
    sizes = (n_rows - torch.arange(nb, device=dev) * block).clamp(max=block)  # [n_blocks]
    # only the partial last block is short, so no more than budget // block + 1 blocks can fit
    n_cand = nb if budget >= n_rows else min(nb, budget // block + 1)
    order = scores.topk(n_cand, dim=-1).indices  # [H_kv, n_cand], best first
    fits = sizes[order].cumsum(-1) <= budget  # a prefix of each row
    fits[:, 0] = True
    kb = int(fits.sum(-1).max())
    # blocks in ascending order, those that do not fit as block n_blocks (past every row), so
    # rows come out ascending and the missing ones (and the partial block's) at the end
    blocks = torch.where(fits[:, :kb], order[:, :kb], nb).sort(dim=-1).values  # [H_kv, kb]
    rows = (blocks[..., None] * block + torch.arange(block, device=dev)).reshape(hkv, -1)
    ok = rows < n_rows
    return torch.where(ok, rows, -1)[:, : int(ok.sum(-1).max())]

"""One pruning stage of HiP (index/hip.py): its candidate rows cut into chunks of l_c, each
chunk scored by its representative key (a hierarchical top-1 search: log2(l_c) halvings, two
probe keys read per chunk per halving; kernels/hip_stage.py), the best chunks kept.

A stage of HipParams.scan_stages scores every row of its candidate chunks instead
(scan_scores): a chunk's score is the max over its rows of the same row score.

A stage's best chunks are picked by a stable sort (ties to the earlier chunk), so a row's pick
is the same alone and inside a batched step's padded sort (index/hip_batch.py). The Triton
stage kernels read a store of several chunks in one launch through its address table, an
8-bit host tier's codes in place; the torch path reads rows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kvloft.index.hip_batch import n_keep
from kvloft.kernels.hip_stage import (
    hierarchical_top1,
    hip_stage,
    hip_stage1,
    hip_stage1_reference,
    probes_per_chunk,
)
from kvloft.tiers.chunked import ChunkedRows
from kvloft.tiers.packed import PackedRows

__all__ = ["best_chunks", "kept_rows", "run_stage", "scan_scores", "stage_scores"]

SCAN_BLOCK = 32768  # rows the torch scan scores at once (a [SCAN_BLOCK, H_kv, D] fp32 copy)


def run_stage(
    hip: Any, stage: int, store: ChunkedRows, q: Tensor, cand: Tensor | None, kept: int, bias: Tensor | None = None
) -> tuple[Tensor, int]:
    """One pruning stage of `hip` (the retriever; index/hip.py imports this module, not the
    reverse): cand [M] host rows (None = all rows) -> (kept rows, probe rows read); bias None or
    [H_q] fp32 (rank="z", q then z-scaled: kernels/hip_stage.py probe_scores).

    The candidates are cut into whole chunks of l_c; the M % l_c left over (the newest
    rows of stage 1, the tail of a later stage's list) are kept without a search. So no
    chunk holds padding, and every shape is known on the host: a stage never waits for
    the GPU (filtering padding out would read a count back in every layer).
    """
    length = hip.params.chunk_sizes[stage]
    last = stage == hip.params.n_stages - 1
    n_cand = len(store) if cand is None else cand.numel()
    if n_cand <= kept:
        return (hip._count(n_cand) if cand is None else cand), 0
    n_full = n_cand // length
    rows = hip._count(n_cand) if cand is None else cand
    chunks, rest = rows[: n_full * length].view(n_full, length), rows[n_full * length :]
    score = stage_scores(hip, stage, store, q, chunks, bias)
    top = best_chunks(score, n_keep(kept, length, n_full))
    per_chunk = length if stage in hip.params.scan_stages else probes_per_chunk(length)
    return kept_rows(chunks, top, rest, last), n_full * per_chunk


def stage_scores(hip: Any, stage: int, store: ChunkedRows, q: Tensor, chunks: Tensor,
                 bias: Tensor | None = None) -> Tensor:
    """Scores [C] fp32 of the candidate chunks [C, l_c] (row ids) of stage `stage` (bias as in run_stage)."""
    if stage in hip.params.scan_stages:
        return scan_scores(hip, store, q, chunks, bias)
    if stage == 0:
        return _stage1_scores(hip, store, q, chunks, bias)
    if hip.use_kernel:
        return hip_stage(store.chunks, chunks, q, hip.params.probe, store.pointer_table(hip.device), bias)[1]
    return hierarchical_top1(chunks, store.rows, q, hip.params.probe, bias)[1]


def scan_scores(hip: Any, store: ChunkedRows, q: Tensor, chunks: Tensor, bias: Tensor | None = None) -> Tensor:
    """Scores [C] fp32 of the candidate chunks [C, l_c] (row ids) read whole: each row scored
    as a probe is (probe_scores: max over query heads of q_h · k - bias_h), a chunk by its best
    row. Each row is searched as a chunk of one row (its own representative, one read): the
    Triton kernel reads them in place through the store's address table (an 8-bit tier's codes
    with their scales, dequantized in registers), the torch path in blocks of SCAN_BLOCK rows
    (store.rows: an 8-bit tier's rows dequantized). Reads C * l_c rows."""
    n_chunks, length = chunks.shape
    rows = chunks.reshape(-1, 1)
    if hip.use_kernel:
        score = hip_stage(store.chunks, rows, q, hip.params.probe, store.pointer_table(hip.device), bias)[1]
    else:
        score = torch.cat([hierarchical_top1(b, store.rows, q, hip.params.probe, bias)[1]
                           for b in rows.split(SCAN_BLOCK)])
    return score.view(n_chunks, length).amax(dim=1)


def _stage1_scores(hip: Any, store: ChunkedRows, q: Tensor, chunks: Tensor, bias: Tensor | None = None) -> Tensor:
    """Stage 1 over the first n_full * length rows (chunks [n_full, l_c] = those rows in order;
    chunk_rows is a multiple of l_c, so only the store's last chunk ends in a partial l_c
    chunk, whose score is dropped): the Triton kernels read a store of several chunks in one
    launch through its address table; the torch path goes one store chunk at a time.

    Returns score [n_full] fp32.
    """
    n_full, length = chunks.shape
    packed = isinstance(store, PackedRows)
    if hip.use_kernel and (packed or len(store.chunks) > 1):
        # one launch over every store chunk (found through their address table), not one
        # per chunk: a 1M-token tier in 4096-row chunks would be 256 launches per layer;
        # an 8-bit tier always (its codes are read in place: iter_chunks would dequantize a copy)
        return hip_stage(store.chunks, chunks, q, hip.params.probe, store.pointer_table(hip.device), bias)[1]
    stage1 = hip_stage1 if hip.use_kernel else hip_stage1_reference
    scores = [stage1(rows, q, length, hip.params.probe, bias)[1] for _, rows in store.iter_chunks()]
    return torch.cat(scores)[:n_full]


def best_chunks(score: Tensor, k: int) -> Tensor:
    """Indices of the k best chunks, best first, ties to the earlier chunk: score [C] -> [k]
    (a stable sort, so a row's pick is the same inside a batch's -inf-padded [G, C] sort)."""
    return torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :k]


def kept_rows(chunks: Tensor, top: Tensor, rest: Tensor, last: bool) -> Tensor:
    """The rows a stage keeps: chunks [C, l_c] (ascending candidates cut in order), top [k]
    the kept chunks best first, rest [r] the uncut tail. The last stage: best chunk first, then
    the rest; earlier ones ascending, which for ascending candidates is the kept chunks in order
    then the rest (sorting k chunk indices instead of k * l_c rows)."""
    if not last:
        top = torch.sort(top).values
    return torch.cat([chunks[top].flatten(), rest])

"""HiP's search for the rows of a batched decode step, all rows at once (HipRetriever.select_batch).

A batched step of G sessions asks each session's HiP retriever for one layer's selection.
Each row keeps its own state (stage masks, refresh schedule, host tier of its own length);
what is shared is the work: per stage, the rows that recompute it this step are searched
in one set of launches instead of one set per row:

    candidates  every row's (cached mask + fresh rows) in one cat -> S [G, W], -1 padded
                (stage 1: implicit, host rows 0..n_g - 1)
    scores      one hip_stage_batched launch (Triton; each row's store through its own run
                of one address table; 8-bit host tiers: the codes' table and the scales' in
                the same order, dequantized in registers) or each row's torch search
                (8-bit rows dequantized, as select reads them) -> [G, C], -inf padded;
                a scan stage (HipParams.scan_stages) launches over chunks of one row
                [G, C * l_c, 1], then takes each chunk's max over its l_c rows
    pick        one stable sort of [G, C]: each row's best chunks (kernels see padding last)
    rows kept   one gather of the kept chunks [G, K, l_c], one cat of every row's (chunks, tail)
                -> row g's new mask is a view
    selection   every row's fresh rows + last mask in one cat -> row g's ids are a view

Rows ranking by z-scored logits (hip option rank="z") search in the same launches: such a row
searches with the z-scaled query and per-head bias its select() makes (KeyMoments.zscore,
one small computation per row that recomputes a stage), the others with their query and a bias
of 0, which scores exactly as without one; a batch of logit rows only launches as before (no bias).

Launches per stage do not grow with G. Every row gets exactly the ids of its own select():
the same scores (the batched kernel runs the per-row kernel's arithmetic per chunk, a scan
stage's per row as hip_stages.scan_scores does; the torch path scores each row as select does),
the same stable pick (hip_stages.best_chunks),
the same rows, the same state updates and counters. A stage that one row alone recomputes
runs that row's own _run_stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kvloft.index.base import Selection, check_select
from kvloft.kernels.hip_stage import probes_per_chunk
from kvloft.kernels.rowquant import PackedChunks
from kvloft.tiers.chunked import ChunkedRows
from kvloft.tiers.packed import PackedRows

__all__ = ["n_keep", "select_rows"]


def n_keep(kept: int, length: int, n_full: int) -> int:
    """Chunks of l_c = length a stage keeps to keep `kept` tokens, of n_full searched."""
    return min(max(kept // length, 1), n_full)


@dataclass(eq=False)
class _Row:
    """One row of the batch that prunes this step."""

    hip: Any  # the row's HipRetriever (index/hip.py imports this module, not the reverse)
    g: int  # its index in q and in the result
    st: Any  # its layer's hip_state.LayerState
    store: ChunkedRows | PackedRows  # an 8-bit host tier's keys (PackedRows) searched in place
    n: int  # host rows
    budget: int
    flags: tuple[bool, ...]
    reads: int = 0
    z: bool = False  # ranks by z-scored logits: searches with _Queries' q' and bias


@dataclass(eq=False)
class _Searched:
    """A row whose stage cuts chunks and searches them."""

    row: _Row
    pieces: list[Tensor]  # its candidates end to end (empty at stage 1: every host row)
    n_cand: int
    n_full: int  # whole chunks
    n_keep: int  # chunks kept


def select_rows(retrievers: Sequence[Any], layer: int, q: Tensor, budgets: Sequence[int]) -> list[Selection]:
    """retrievers[g].select(layer, q[g], budgets[g]) for every g, searched together (q [G, H_q, D])."""
    if len(retrievers) != q.shape[0] or len(budgets) != q.shape[0]:
        raise ValueError(f"select_batch needs one retriever and budget per query row; got {len(retrievers)} "
                         f"retrievers, {len(budgets)} budgets, q {tuple(q.shape)}")
    keys = {h.search_key() for h in retrievers}
    if len(keys) > 1:
        raise ValueError(f"select_batch: retrievers of {len(keys)} search keys; group rows by search_key()")
    out: list[Selection | None] = [None] * len(retrievers)
    rows = []
    for g, (hip, budget) in enumerate(zip(retrievers, budgets, strict=True)):
        check_select(q[g], budget, hip.model_cfg)
        store = hip._keys_of(layer)
        n = 0 if store is None else len(store)
        if n == 0 or budget == 0 or budget >= n:
            out[g] = hip._select_all(layer, n, budget)
            continue
        st = hip.state[layer]
        flags = hip._refresh_flags(st, budget)
        rows.append(_Row(hip, g, st, store, n, budget, flags, z=hip.params.rank == "z" and any(flags)))
    if rows:
        qs = _queries(rows, layer, q.to(rows[0].hip.device))
        for stage in range(rows[0].hip.params.n_stages):
            todo = [r for r in rows if r.flags[stage]]
            if todo:
                _stage(stage, todo, qs)
        for r, cand in zip(rows, _final_candidates(rows), strict=True):
            out[r.g] = r.hip._finish(r.st, r.n, r.budget, r.flags, r.reads, cand)
    return out  # type: ignore[return-value]


@dataclass
class _Queries:
    """What the rows search with: q [G, H_q, D] (the step's queries; with a z row, fp32 and that
    row's z-scaled query in its place) and bias [G, H_q] fp32 (0 for the logit rows), or None
    where no row ranks by z."""

    q: Tensor
    bias: Tensor | None

    def row(self, r: _Row) -> tuple[Tensor, Tensor | None]:
        """Row r's query [H_q, D] and bias [H_q] (None for a logit row), as its select() has them."""
        return self.q[r.g], self.bias[r.g] if r.z else None  # type: ignore[index]

    def rows(self, gs: list[int]) -> tuple[Tensor, Tensor | None]:
        """The queries [G', H_q, D] and biases [G', H_q] (or None) of rows gs, in that order."""
        if gs == list(range(self.q.shape[0])):
            return self.q, self.bias
        idx = torch.tensor(gs, device=self.q.device)
        return self.q[idx], None if self.bias is None else self.bias[idx]


def _queries(rows: list[_Row], layer: int, q: Tensor) -> _Queries:
    """The rows' search queries from q [G, H_q, D]: each z row's q' and bias from its own layer's
    key statistics (KeyMoments.zscore on its own row: the numbers its select() gets, bit for
    bit), one row at a time: a few small ops per z row that recomputes a stage this step."""
    z = [r for r in rows if r.z]
    if not z:
        return _Queries(q, None)
    qs = q.to(torch.float32, copy=True)  # a logit row's query as the kernel reads it (exact)
    bias = torch.zeros(q.shape[:2], dtype=torch.float32, device=q.device)
    for r in z:
        qs[r.g], bias[r.g] = r.hip._moments_of(layer, r.store).zscore(q[r.g])
    return _Queries(qs, bias)


def _pieces(r: _Row, stage: int) -> list[Tensor]:
    """Row r's candidates for `stage` (> 0): the previous stage's mask, then its fresh rows."""
    prev = stage - 1
    mask, seen = r.st.masks[prev], r.st.seen[prev]
    return [mask] if seen >= r.n else [mask, r.hip._count(r.n)[seen:]]


def _stage(stage: int, todo: list[_Row], q: _Queries) -> None:
    """Recompute stage `stage` for the rows `todo` (each as its _run_stage would)."""
    params = todo[0].hip.params
    length = params.chunk_sizes[stage]
    searched = []
    for r in todo:
        pieces = [] if stage == 0 else _pieces(r, stage)
        n_cand = r.n if stage == 0 else sum(p.numel() for p in pieces)
        kept = r.hip._kept(stage, r.budget)
        if n_cand <= kept:  # kept whole, no search
            mask = r.hip._count(n_cand) if stage == 0 else (pieces[0] if len(pieces) == 1 else torch.cat(pieces))
            r.reads += r.hip._stage_ran(r.st, stage, mask, r.n, 0)
            continue
        n_full = n_cand // length
        searched.append(_Searched(r, pieces, n_cand, n_full, n_keep(kept, length, n_full)))
    if len(searched) == 1:  # a group of one: the row's own stage
        s = searched[0]
        r = s.row
        cand = None if stage == 0 else (s.pieces[0] if len(s.pieces) == 1 else torch.cat(s.pieces))
        q_r, bias_r = q.row(r)
        mask, reads = r.hip._run_stage(stage, r.store, q_r, cand, r.hip._kept(stage, r.budget), bias_r)
        r.reads += r.hip._stage_ran(r.st, stage, mask, r.n, reads)
    elif searched:
        _search(stage, searched, q)


def _search(stage: int, rows: list[_Searched], q: _Queries) -> None:
    """One batched search of stage `stage` over G >= 2 rows; each row's new mask a view of one result."""
    hip0 = rows[0].row.hip
    length = hip0.params.chunk_sizes[stage]
    last = stage == hip0.params.n_stages - 1
    dev = q.q.device
    qg, bias = q.rows([s.row.g for s in rows])
    n_cols = max(s.n_full for s in rows)
    k_max = max(s.n_keep for s in rows)
    width = max(s.n_cand for s in rows)
    cand = None if stage == 0 else _padded([s.pieces for s in rows], [s.n_cand for s in rows], width, dev)
    # every per-row number the launches read, in one copy to the device
    offsets = [0]
    for s in rows[:-1]:
        offsets.append(offsets[-1] + len(s.row.store.chunks))
    scan = stage in hip0.params.scan_stages  # the kernel searches chunks of one row (hip_stages.scan_scores)
    n_chunks = [s.n_full * length if scan else s.n_full for s in rows]  # chunks the kernel searches
    meta = torch.tensor([n_chunks, offsets, [s.row.store.chunk_rows for s in rows],
                         [s.n_keep for s in rows]], dtype=torch.int64).to(dev, non_blocking=True)  # [4, G]
    score = _scores(stage, rows, qg, bias, cand, meta, n_cols, length)  # [G, n_cols]
    top = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k_max]  # best first
    if not last:  # kept chunks in order (ascending candidates: the rows come out sorted)
        if any(s.n_keep < k_max for s in rows):  # a row's entries past its n_keep sort last
            live = torch.arange(k_max, device=dev) < meta[3, :, None]
            top = torch.sort(torch.where(live, top, n_cols), dim=1).values.clamp_max(n_cols - 1)  # (never read)
        else:
            top = torch.sort(top, dim=1).values
    masks = _kept_rows(rows, top, cand, n_cols, length)
    per_chunk = length if scan else probes_per_chunk(length)  # rows read per chunk, as run_stage counts
    for s, mask in zip(rows, masks, strict=True):
        s.row.reads += s.row.hip._stage_ran(s.row.st, stage, mask, s.row.n, s.n_full * per_chunk)


def _padded(pieces: list[list[Tensor]], lengths: list[int], width: int, device: torch.device) -> Tensor:
    """Each row's pieces end to end, padded with -1 to `width`, in one cat -> [G, width]."""
    pad = torch.full((), -1, dtype=torch.int64, device=device)
    flat = []
    for parts, m in zip(pieces, lengths, strict=True):
        flat += [*parts, pad.expand(width - m)] if m < width else parts
    return torch.cat(flat).view(len(pieces), width)


def _scores(stage: int, rows: list[_Searched], q: Tensor, bias: Tensor | None, cand: Tensor | None, meta: Tensor,
            n_cols: int, length: int) -> Tensor:
    """Chunk scores [G, n_cols] fp32 of every row (-inf past its n_full chunks); q [G, H_q, D] and
    bias [G, H_q] or None as _Queries.rows gives them; meta [4, G] as _search makes it.

    A scan stage (HipParams.scan_stages) is one launch over chunks of one row: the candidates
    [G, n_cols, l_c] seen as [G, n_cols * l_c, 1] (row g's first meta[0, g] = n_full * l_c live,
    -1 padding and the rows past them -inf), then each chunk's max over its l_c rows: the numbers
    hip_stages.scan_scores gets for each row alone."""
    hip0 = rows[0].row.hip
    stores = [s.row.store for s in rows]
    layout = _layout(stores) if hip0.use_kernel else None
    if layout is not None:
        from kvloft.kernels.hip_batched import hip_stage_batched

        k0, packed = layout
        table = torch.cat([st.pointer_table(q.device) for st in stores])  # 8-bit stores: the codes' addresses
        codes = {} if packed is None else {
            "packed": packed, "scale_table": torch.cat([st.scale_table(q.device) for st in stores])}
        g_n, scan = len(rows), stage in hip0.params.scan_stages
        unit = 1 if scan else length  # rows per chunk the kernel searches
        cols = n_cols * length // unit
        chunks = None if cand is None else cand[:, : n_cols * length].view(g_n, cols, unit)
        score = hip_stage_batched(table, k0, q, meta[:3], cols, unit, chunks, hip0.params.probe, bias, **codes)[1]
        return score.view(g_n, n_cols, length).amax(dim=2) if scan else score
    # the torch path (or stores of mixed layouts): each row scored as its select would
    pad = torch.full((), float("-inf"), dtype=torch.float32, device=q.device)
    parts = []
    for i, s in enumerate(rows):
        rows_i = s.row.hip._count(s.n_cand) if cand is None else cand[i]
        chunks = rows_i[: s.n_full * length].view(s.n_full, length)
        parts.append(s.row.hip._stage_scores(stage, s.row.store, q[i], chunks, bias[i] if s.row.z else None))
        if s.n_full < n_cols:
            parts.append(pad.expand(n_cols - s.n_full))
    return torch.cat(parts).view(len(rows), n_cols)


def _layout(stores: list[ChunkedRows | PackedRows]) -> tuple[Tensor, PackedChunks | None] | None:
    """What one batched launch over the stores reads: (k0, None) for model-dtype chunks of one
    dtype and strides; (k0 a codes chunk, the first store's PackedChunks) for 8-bit stores
    (tiers/packed.py) of one format and model dtype, codes and scales of one layout; None where
    the rows' stores differ (a layer attached to an 8-bit tier in one row, a key copy in another)."""
    if not any(isinstance(st, PackedRows) for st in stores):
        k0 = stores[0].chunks[0]
        same = all(c.dtype == k0.dtype and c.stride() == k0.stride() for st in stores for c in st.chunks)
        return (k0, None) if same else None
    if not all(isinstance(st, PackedRows) for st in stores):
        return None
    packed = [st.chunks for st in stores]  # PackedChunks: the codes and scales as stored (no copy)
    p0 = packed[0]
    k0, s0 = p0.codes[0], p0.scales[0]
    same = all((p.kind, p.dtype) == (p0.kind, p0.dtype) for p in packed)
    same = same and all(c.dtype == k0.dtype and c.stride() == k0.stride() for p in packed for c in p.codes)
    same = same and all(s.dtype == s0.dtype and s.stride() == s0.stride() for p in packed for s in p.scales)
    return (k0, p0) if same else None


def _kept_rows(rows: list[_Searched], top: Tensor, cand: Tensor | None, n_cols: int, length: int) -> list[Tensor]:
    """Each row's kept rows (hip_stages.kept_rows): the candidates of its chunks
    top[g, :n_keep] (top [G, K], in that order), then its uncut tail; every row's in one cat,
    each returned as a view of it. cand [G, W] the candidates (None: row ids are positions)."""
    g_n, k = top.shape
    if cand is None:  # stage 1: chunk c holds rows c * l_c ... c * l_c + l_c - 1
        kept = (top[..., None] * length + rows[0].row.hip._count(length)).view(g_n, k * length)
    else:
        chunks = cand[:, : n_cols * length].view(g_n, n_cols, length)
        kept = chunks.gather(1, top[..., None].expand(g_n, k, length)).view(g_n, k * length)
    pieces, spans = [], []
    at = 0
    for g, s in enumerate(rows):
        cut = s.n_full * length
        rest = s.row.hip._count(s.n_cand)[cut:] if cand is None else cand[g, cut : s.n_cand]
        pieces += [kept[g, : s.n_keep * length], rest]
        spans.append((at, s.n_keep * length + rest.numel()))
        at += spans[-1][1]
    flat = torch.cat(pieces)
    return [flat[a : a + m] for a, m in spans]


def _final_candidates(rows: list[_Row]) -> list[Tensor]:
    """Each row's last-stage candidates (fresh rows first, then its mask), the rows that have
    fresh rows made in one cat."""
    out: list[Tensor] = []
    flat: list[Tensor] = []
    spans: list[tuple[int, int, int]] = []  # (row index, start, length) in the cat
    at = 0
    for i, r in enumerate(rows):
        mask, seen = r.st.masks[-1], r.st.seen[-1]
        out.append(mask)
        if seen < r.n:
            fresh = r.hip._count(r.n)[seen:]
            flat += [fresh, mask]
            spans.append((i, at, fresh.numel() + mask.numel()))
            at += spans[-1][2]
    if spans:
        cat = torch.cat(flat)
        for i, start, m in spans:
            out[i] = cat[start : start + m]
    return out

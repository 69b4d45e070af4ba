"""HiP rows inside the whole decode step (runtime/whole_step.py): the staged search as fixed-shape work.

A HiP row (index/hip.py) narrows its host rows stage by stage and caches each stage's mask
for some steps (refresh_steps, staggered per layer). Everything about a step that is not
the keys' values is known on the host before the layers run: which stages of which layer
refresh (HipRetriever._refresh_flags), how many candidates each stage has, how many whole
chunks it searches and keeps, how long its new mask is, how many rows the selection holds.
So the plan phase computes those numbers (runtime/hip_plan.py, the arithmetic of select()) and passes
them as data, per layer, stage and row, in the step's table; the graph does this work, with
shapes fixed by (batch bucket, capacity `cap`, budget width), for each stage of its pattern:

    per stage i   candidates [B, cap]: stage 1 the host rows 0..n-1 (implicit); later ones the
                  previous stage's mask then the rows that arrived since it ran, -1 past
                  the count; hip_stage_batched over cap / l_i chunk columns, each row's
                  live chunks read from the table (0 where the stage does not refresh this
                  step: its programs read nothing); a stable sort; the kept chunks' rows then
                  the uncut tail -> the new mask, written over the row's mask buffer where
                  the stage refreshes (a select on the device, no branch)
    selection     the rows that arrived since the last stage ran, then its mask, to the
                  budget, -1 padded to the width; attended in three fixed launches merged by
                  lse: the static tier, the mask's rows from a device copy refreshed where the
                  last stage refreshes, and the few fresh rows read in place (whole_stable.py)

Only the stages some row refreshes run: the table's refresh flags give the step's pattern (per
layer, a bit per stage, the union over the rows; HipTables._pattern), the graph is the one
captured for that pattern (whole_graphs.py), and a stage outside it launches nothing, its
masks untouched. Inside it a row that does not refresh keeps its mask through the select.
A layer no row refreshes launches 8 small ops for its selection instead of ~80 (two sorts
and a hip_search_kernel per stage among them: bench/whole_step_kernels.py).

The masks live in the step's buffer [L, B, stages, cap] (int64 on the device); after the
step each row's retriever state points at views of it (st.masks[i], its lengths the
plan's), so a later select() of the segmented engine continues from them. A slot whose row
changes first detaches the views its previous row still holds (one clone each); a row whose
masks are not this buffer's views (new to the slot, or changed by the segmented engine or a
rollback) is copied in before the step. In steady state nothing is copied.

Rows ranking by z-scored logits (hip option rank="z") search with a query and bias made in
the graph from statistics the plan copies in (runtime/whole_zrank.py; HipShape.z).

Equal to select() and select_batch(): the same chunk scores (hip_search_kernel, per chunk the
same loads and fp32 sums as the per-row launch), the same stable picks, the same rows, state
and counters. The kernels must be the Triton ones (the torch search rounds otherwise).
keys_on="device" reads the retriever's key copy, keys_on="host" the host tier's pinned key
chunks (attach_host_tier) through the same address table: stable addresses, read in place.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from kvloft.index.base import Selection
from kvloft.index.hip import HipRetriever
from kvloft.kernels import reference
from kvloft.kernels.batched_decode import attend_table_fixed
from kvloft.kernels.hip_batched import hip_stage_batched
from kvloft.kernels.merge import merge
from kvloft.kernels.scoring import BLOCK_N
from kvloft.runtime.attention import TieredAttention
from kvloft.runtime.hip_plan import HipPlan, plan_select
from kvloft.runtime.whole_exact import _FIXED, MAX_CAP, ExactTables, exact_route
from kvloft.runtime.whole_stable import StableRows, fresh_bound
from kvloft.runtime.whole_zrank import ZBuffers

__all__ = ["HipShape", "HipTables", "hip_route", "hip_shape", "hip_shape_why", "tiered_route"]

_STAGE = 9  # per stage and row: n_full, table offset, chunk rows (the kernel's meta), n_keep, n_cand,
#             the new mask's length, refresh (0/1), the previous mask's length, rows it had seen
_FINAL = 3  # per row: fresh rows, first fresh row, rows selected
_STABLE = 6  # per row: the stable part's meta [5] (slot, width, 0, 0, n_stable), rows copied into it
_Z = 1  # per row, where HipShape.z: 1 where it searches with z-scored logits this layer and step


class HipShape(NamedTuple):
    """The sizes a captured step of HiP rows is made for (the search options its rows share)."""

    cap: int  # host rows a row may hold: candidate and mask width (a power of two)
    width: int  # the selection's width: the largest budget's power of two
    kc: int  # key chunks per row in the table
    hc: int  # host-tier chunks per row in the table
    chunk_sizes: tuple[int, ...]
    kept_tokens: tuple[int, ...]
    probe: str
    z: bool = False  # a row ranks by z-scored logits (hip option rank="z"): the step computes them

    def columns(self, batch: int) -> int:
        """int64 numbers per layer of the step's table: the exact route's, then the search's."""
        z = _Z if self.z else 0
        return batch * (_FIXED + self.kc + 2 * self.hc + _STAGE * len(self.chunk_sizes) + _FINAL + _STABLE + z)

    def tables(self, batch: int, n_layers: int, flat: Tensor) -> HipTables:
        return HipTables(self, batch, n_layers, flat)

    def keep_width(self, stage: int) -> int:
        """Chunks a stage's pick holds (>= any row's n_keep at this shape)."""
        length = self.chunk_sizes[stage]
        last = stage == len(self.chunk_sizes) - 1
        kept = self.width if last else max(self.kept_tokens[stage], self.width)
        return min(self.cap // length, max(kept // length, 1))


def hip_route(be: TieredAttention) -> str | None:
    """Why a HiP row's decode cannot run inside the whole step, or None where it can."""
    r, rc = be.retriever, be.rcfg
    if rc.position_mode != "exact":
        return "extrapolate mode remaps the positions of the rows it selects per step"
    if not be.plans_room():
        return "its rows are fetched by the scheduler (OverlapFetch), not read in place"
    if r.params.heads == "kv":
        return "hip heads='kv' keeps a mask per KV head; the captured search keeps one per row"
    if r.params.scan_stages:
        return "hip scan_stages scores every row of those stages; the captured search runs the probe search"
    if not r.use_kernel:
        return "hip searches with torch ops here (kernel='torch', or 'auto' off CUDA); the captured search is Triton"
    if be.finite.on:
        return "the backend watches appended rows for non-finite numbers (a host check)"
    if not all(be.built):
        return "a layer's index is not built"
    if be.cache.host_dtype is not None or be.cache.spill_dir is not None:
        return "its host tier is 8-bit or spills to disk (the step reads model-dtype rows in memory)"
    return None


def tiered_route(be: TieredAttention) -> str | None:
    """ROUTES' entry for TieredAttention: by its retriever, hip_route or exact_route."""
    return hip_route(be) if type(be.retriever) is HipRetriever else exact_route(be)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def hip_shape_why(tiered: list[TieredAttention]) -> str | None:
    """Why these HiP rows cannot share one step, or None (refresh schedules may differ: data)."""
    p = tiered[0].retriever.params
    if any((r.params.chunk_sizes, r.params.kept_tokens, r.params.probe) != (p.chunk_sizes, p.kept_tokens, p.probe)
           for r in (be.retriever for be in tiered)):
        return "the rows' hip options differ in chunk_sizes, kept_tokens or probe (the search's shapes)"
    n_host = max(be.cache.layers[0].n_host for be in tiered)
    if n_host > MAX_CAP:
        return f"a row holds {n_host} host rows, over the captured step's {MAX_CAP}"
    return None


def hip_shape(tiered: list[TieredAttention]) -> HipShape:
    """The shape a step of these HiP rows needs (after their make_room)."""
    p = tiered[0].retriever.params
    width = _pow2(max(max(be.rcfg.budget for be in tiered), 1))
    n_host = max(t.n_host for be in tiered for t in be.cache.layers)
    cap = _pow2(max(n_host, width, BLOCK_N, p.chunk_sizes[0]))
    kc = max(-(-cap // _key_chunk_rows(be)) for be in tiered)
    hc = max(-(-cap // be.cache.host_chunk) for be in tiered)
    z = any(be.retriever.params.rank == "z" for be in tiered)
    return HipShape(cap, width, kc, hc, p.chunk_sizes, p.kept_tokens, p.probe, z)


def _key_chunk_rows(be: TieredAttention) -> int:
    """Rows per chunk of the keys a HiP row searches: its host tier's (keys_on="host", read in
    place) or its key copy's."""
    hip = be.retriever
    return be.cache.host_chunk if 0 in hip.tiers else hip.keys[0].chunk_rows


class HipTables(ExactTables):
    """The HiP rows' columns of a step's table (the exact route's layout, then per layer the
    stages' [_STAGE, B] blocks and the final [_FINAL, B]), the rows' mask buffers and the
    launches that read them. flat: [L * shape.columns(batch)] int64 on the device."""

    def __init__(self, shape: HipShape, batch: int, n_layers: int, flat: Tensor) -> None:
        super().__init__(shape, batch, n_layers, flat)  # type: ignore[arg-type]
        nb, ns = batch, len(shape.chunk_sizes)
        per = flat.view(n_layers, shape.columns(batch))
        a = nb * (_FIXED + shape.kc + 2 * shape.hc)
        self.stage_meta = [[per[i, a + s * _STAGE * nb : a + (s + 1) * _STAGE * nb].view(_STAGE, nb)
                            for s in range(ns)] for i in range(n_layers)]  # [_STAGE, B] per layer, stage
        b0 = a + ns * _STAGE * nb
        self.final_meta = [per[i, b0 : b0 + _FINAL * nb].view(_FINAL, nb) for i in range(n_layers)]  # [3, B]
        b0 += _FINAL * nb  # the stable part (whole_stable.py): its meta [B, 5] and rows copied [B] per layer
        self.stable_meta = [per[i, b0 : b0 + 5 * nb].view(nb, 5) for i in range(n_layers)]
        self.copy_rows = [per[i, b0 + 5 * nb : b0 + 6 * nb] for i in range(n_layers)]
        # z rows (shape.z): the flag [B] per layer, and the statistics copied in (ZBuffers)
        self.z_on = [per[i, b0 + 6 * nb : b0 + 7 * nb] for i in range(n_layers)] if shape.z else None
        self.z = ZBuffers(n_layers, nb) if shape.z else None
        self.stable = StableRows(n_layers, nb, shape.width)
        # the rows' stage masks: [L, B, stages, cap] int64 host-row ids (-1 past a mask's length)
        self.masks = torch.full((n_layers, nb, ns, shape.cap), -1, dtype=torch.int64, device=flat.device)
        self._j = torch.arange(shape.cap, device=flat.device)  # [cap]
        self._owner: list[Any] = [None] * nb  # slot -> the HipRetriever whose masks it holds
        self._views: dict[int, dict[tuple[int, int], tuple[Any, Tensor]]] = {}  # slot -> (layer, stage) -> (st, view)
        self._plans: dict[tuple[int, int], HipPlan] = {}

    # ---- the host's part ---------------------------------------------------------------------

    def host_columns(self, backends: list[Any]) -> np.ndarray:
        self._plans, self.stable.why = {}, None
        self._adopt(backends)
        tiered = [be for be in backends if isinstance(be, TieredAttention)]
        if tiered:
            self.stable.allocate(tiered[0].cache.layers[0].k)
            if self.z is not None:
                self.z.allocate(tiered[0].cache.layers[0].k)
        out = super().host_columns(backends)
        sh, nb = self.shape, self.batch
        a = nb * (_FIXED + sh.kc + 2 * sh.hc)
        meta = out[:, a + (len(sh.chunk_sizes) * _STAGE + _FINAL) * nb :][:, : 5 * nb].reshape(-1, nb, 5)
        meta[:, :, 0], meta[:, :, 1] = np.arange(nb), sh.width  # every slot's own slab (n_stable 0 unless set)
        for s in range(len(sh.chunk_sizes)):  # rows without a search: one-row chunks (never a division by 0)
            rows = out[:, a + (s * _STAGE + 2) * nb : a + (s * _STAGE + 3) * nb]
            rows[rows == 0] = 1
        self.pattern = self._pattern(out)
        return out

    def _z_fill(self, col: np.ndarray, b: int, hip: HipRetriever, layer: int, n: int, plan: HipPlan) -> None:
        """Row b's z flag of one layer into col, its statistics into the buffers where it searches."""
        at = self.batch * (_FIXED + self.shape.kc + 2 * self.shape.hc
                           + _STAGE * len(self.shape.chunk_sizes) + _FINAL + _STABLE)
        col[at + b] = self.z.fill(layer, b, hip, n) if plan.z else 0

    def _pattern(self, out: np.ndarray) -> tuple[int, ...] | None:
        """The step's refresh pattern from its table out [L, columns] (the very refresh flags the
        graph reads): per layer, bit s set where any row refreshes stage s. None where every
        stage of every layer refreshes (the graph of all stages)."""
        ns, nb = len(self.shape.chunk_sizes), self.batch
        a = nb * (_FIXED + self.shape.kc + 2 * self.shape.hc) + 6 * nb  # stage 0's refresh row
        due = np.stack([out[:, a + s * _STAGE * nb : a + (s * _STAGE + 1) * nb].any(axis=1)
                        for s in range(ns)], axis=1)  # [L, stages] bool
        if due.all():
            return None
        return tuple(int(x) for x in (due.astype(np.int64) << np.arange(ns)).sum(axis=1))

    def _fill(self, col: np.ndarray, b: int, be: TieredAttention, layer: int) -> None:
        hip = be.retriever
        store = None if layer in hip.tiers else hip.keys[layer]  # None: the host tier's keys, in place
        n = be.cache.layers[layer].n_host if store is None else len(store)
        plan = self._plans[(b, layer)] = plan_select(hip, layer, n, be.rcfg.budget)
        sh, nb = self.shape, self.batch
        refresh, m_last = bool(plan.stages[-1][4]), plan.stages[-1][3]
        n_stable = 0 if plan.every else self.stable.route(
            b, layer, hip.state[layer], refresh, plan.fresh, plan.n_sel,
            fresh_bound(hip.params.refresh_steps[-1], be.cache.layers[layer].evict_batch))
        self._fill_rows(col, b, be, layer, store, plan.n_sel - n_stable)  # the host part: the rest, in place
        rows = be.cache.host_chunk if store is None else store.chunk_rows
        a = nb * (_FIXED + sh.kc + 2 * sh.hc)
        for s, (n_full, keep, n_cand, m_out, refresh, m_prev, seen_prev) in enumerate(plan.stages):
            block = col[a + s * _STAGE * nb : a + (s + 1) * _STAGE * nb].reshape(_STAGE, nb)
            block[:, b] = (n_full, b * sh.kc, rows, keep, n_cand, m_out, refresh, m_prev, seen_prev)
        a += len(plan.stages) * _STAGE * nb
        col[a + b], col[a + nb + b], col[a + 2 * nb + b] = plan.fresh, plan.seen, plan.n_sel
        a += _FINAL * nb
        col[a + 5 * b + 4], col[a + 5 * nb + b] = n_stable, min(m_last, sh.width) if refresh else 0
        if sh.z:
            self._z_fill(col, b, hip, layer, n, plan)

    def _adopt(self, backends: list[Any]) -> None:
        """Every HiP row's masks as views of its slot's buffer (see the module doc)."""
        rows = [be.retriever if isinstance(be, TieredAttention) else None for be in backends]
        rows += [None] * (self.batch - len(rows))
        for b, hip in enumerate(rows):  # slots changing rows: the previous row's views become its own
            if self._owner[b] is not hip:
                for st, view in self._views.pop(b, {}).values():
                    for i, m in enumerate(st.masks):
                        if m is view:
                            st.masks[i] = view.clone()
                self._owner[b] = hip
        for b, hip in enumerate(rows):
            if hip is None:
                continue
            views = self._views.setdefault(b, {})
            for layer in range(self.n_layers):
                st = hip.state[layer]
                for i, m in enumerate(st.masks):
                    have = views.get((layer, i))
                    if m is None or (have is not None and have[0] is st and have[1] is m):
                        continue
                    view = self.masks[layer, b, i, : m.numel()]
                    view.copy_(m)
                    st.masks[i] = view
                    views[(layer, i)] = (st, view)

    def after(self, be: TieredAttention, b: int) -> None:
        """Row be's (slot b's) state and counters once the step ran, as select() leaves them."""
        hip = be.retriever
        hkv, views = be.cfg.n_kv_heads, self._views.setdefault(b, {})
        for layer, tiers in enumerate(be.cache.layers):
            tiers.count_put()
            plan, st = self._plans[(b, layer)], hip.state[layer]
            if plan.every:  # as _select_all: the masks dropped, the call counted
                st.step, st.masks, st.refreshed = st.step + 1, [None] * len(st.masks), (False,) * len(st.masks)
                hip._stats.record(Selection(ids=hip._count(plan.n_sel), scanned=0, padded=False))
                continue
            for i, fields in enumerate(plan.stages):
                if fields[4]:
                    view = self.masks[layer, b, i, : fields[3]]
                    st.masks[i], st.seen[i] = view, plan.n
                    views[(layer, i)] = (st, view)
                    hip._stats.extra["refreshes"][i] += 1
            if plan.stages[-1][4]:  # the step copied the new last mask's rows into the slot's buffer
                self.stable.mark(b, layer, st)
            st.step, st.budget, st.refreshed = st.step + 1, plan.budget, plan.flags
            sel = Selection(ids=hip._count(plan.n_sel), scanned=plan.reads * hkv, padded=False)
            hip._stats.record(sel)
            be.scanned += sel.scanned
        be.room_made.clear()

    # ---- the graph's part --------------------------------------------------------------------

    def select(self, layer: int, q: Tensor, like: Tensor, stages: int | None = None) -> Tensor:
        """q [B, H_q, D] -> ids [B, width] int64 (shared by the KV heads), -1 padded. stages: bit s
        set where stage s runs (the step's pattern of this layer; None: every stage). A stage no
        row refreshes launches nothing and leaves every mask as it is."""
        sh, j = self.shape, self._j
        masks = self.masks[layer]  # [B, stages, cap]
        q_s, bias = self.z.queries(layer, q, self.z_on[layer]) if sh.z and stages != 0 else (q, None)
        for s in range(len(sh.chunk_sizes)):
            if stages is not None and not stages >> s & 1:
                continue
            new = self._stage(layer, s, q_s, like, masks, bias)
            refresh = self.stage_meta[layer][s][6, :, None] > 0
            masks[:, s].copy_(torch.where(refresh, new, masks[:, s]))
        fresh, seen, n_sel = (x[:, None] for x in self.final_meta[layer])
        w = j[: sh.width]
        last = masks[:, -1].gather(1, (w - fresh).clamp(0, sh.cap - 1))
        ids = torch.where(w < fresh, seen + w, last)
        return torch.where(w < n_sel, ids, -1)

    def _stage(self, layer: int, s: int, q: Tensor, like: Tensor, masks: Tensor,
               bias: Tensor | None = None) -> Tensor:
        """Stage s's new masks [B, cap] (meaningful where it refreshes; -1 past each length);
        bias [B, H_q] fp32 with q the rows' search queries (ZBuffers.queries) where shape.z."""
        sh, j = self.shape, self._j
        nb, cap, length = q.shape[0], sh.cap, sh.chunk_sizes[s]
        meta = self.stage_meta[layer][s]  # [_STAGE, B]
        n_full, keep, n_cand, m_out, m_prev, seen_prev = (meta[f, :, None] for f in (0, 3, 4, 5, 7, 8))
        if s == 0:
            cand = None  # host rows 0 .. n - 1 in order
        else:
            fresh = torch.where(j < n_cand, seen_prev + j - m_prev, -1)
            cand = torch.where(j < m_prev, masks[:, s - 1], fresh)  # [B, cap]
        n_cols = cap // length
        chunks = None if cand is None else cand.view(nb, n_cols, length)
        score = hip_stage_batched(self.key_tab[layer], like, q, meta[:3], n_cols, length, chunks, sh.probe, bias)[1]
        k = sh.keep_width(s)
        top = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k]  # [B, k], best first
        if s < len(sh.chunk_sizes) - 1:  # kept chunks in order; a row's entries past its n_keep sort last
            live = j[:k] < keep
            top = torch.sort(torch.where(live, top, n_cols), dim=1).values.clamp_max(n_cols - 1)
        if cand is None:
            kept = (top[..., None] * length + j[:length]).view(nb, k * length)
        else:
            kept = chunks.gather(1, top[..., None].expand(nb, k, length)).reshape(nb, k * length)
        n_kept = keep * length
        tail = (n_full * length + j - n_kept).clamp(0, cap - 1)  # the uncut candidates after the kept chunks
        rest = tail if cand is None else cand.gather(1, tail)
        head = kept.gather(1, j.clamp_max(k * length - 1).expand(nb, cap))
        return torch.where(j < n_kept, head, torch.where(j < m_out, rest, -1))

    def attend(self, layer: int, q: Tensor, like: Tensor, o_s: Tensor, lse_s: Tensor, scale: float,
               splits: int, stages: int | None = None) -> Tensor:
        """ExactTables.attend with the selection in two parts (whole_stable.py): each row's stable
        part from its device buffer (refreshed here where the last stage runs), the rest read in
        place; three parts merged by lse -> out [B, H_q, D]."""
        ids = self.select(layer, q, like, stages)  # [B, width]
        last = len(self.shape.chunk_sizes) - 1
        if stages is None or stages >> last & 1:  # rows that refresh it copy their new mask's rows
            self.stable.copy(layer, self.masks[layer, :, last, : self.shape.width], self.copy_rows[layer],
                             self.hk_tab[layer], self.hv_tab[layer], self.host_meta[layer], like)
        o_h, lse_h = attend_table_fixed(q, like, self.hk_tab[layer], self.hv_tab[layer], self.host_meta[layer],
                                        scale=scale, num_splits=splits, ids=ids)
        o_c, lse_c = self.stable.attend(layer, q, like, self.stable_meta[layer], scale, splits)
        out, _ = (merge if q.is_cuda else reference.merge)([o_s, o_h, o_c], [lse_s, lse_h, lse_c])
        return out

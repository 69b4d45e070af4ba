"""HiP: multi-stage hierarchical chunk pruning (HiP arXiv 2406.09827, InfiniteHiP arXiv 2502.08910).

The host tier is narrowed stage by stage. Stage i takes its candidate tokens (all host
rows for stage 1), splits them in order into chunks of `chunk_sizes[i]` tokens, finds
each chunk's representative key by a hierarchical top-1 search (log2(l_c) halvings,
two probe keys read per chunk per halving; kernels/hip_stage.py), scores the chunk by
its representative (max over all query heads: one mask shared by all heads, so
Selection.ids is [k]; with heads="kv" each KV head's own mask by the max over its own query
group, ids [H_kv, k], one search per KV head and stage) and keeps the tokens of the best `kept_tokens[i] // l_c` chunks
for the next stage. The last stage keeps `budget // l_c` chunks (select's budget
replaces `kept_tokens[-1]`); earlier stages keep at least `budget` tokens.

Masks are cached per layer and stage and recomputed every `refresh_steps[i]` decode
steps of that layer (step 0 is the first select after build); a stage also refreshes
whenever an earlier one did (its input changed) or the budget changed. Rows that
entered the host tier after a stage's mask was computed (one per decode step, so fewer
than refresh_steps[i]) are passed on to the next stage as candidates; in the final
selection they come first and the tail of the lowest-scoring chunk is trimmed, so at
most `budget` ids are returned.

HiP assumes attention locality: a run of relevant keys is seen by a stage when it
covers one of the chunk's probe positions (guaranteed for a run of l_c / 2 rows inside
one chunk); a short run sitting between probes is missed.

A batched decode step searches its sessions' HiP retrievers together (select_batch,
index/hip_batch.py): per stage, one launch over every row that recomputes it, each row's
store read through its own run of one address table (kernels/hip_batched.py); every row gets
the ids its own select() would. A stage's best chunks are picked by a stable sort (ties to
the earlier chunk), so a row's pick is the same alone and inside the batch's padded sort.

An 8-bit host tier (CacheConfig.host_dtype "fp8" / "int8", tiers/packed.py) is searched in
place as well: the stage kernels read each probe row's codes and per-head scales and
dequantize in registers (kernels/hip_stage.py), the torch path reads dequantized rows, and
rank="z"'s statistics are made from the dequantized rows; the index holds no key copy, so
the host holds the packed rows once (about half the bytes of a model-dtype tier).

Work reported (`scanned`): key vectors read by the probes of the stages recomputed at
this step, 2 * log2(l_c) probe rows per chunk, times H_kv (the exact retriever's unit).
A chunk's score is the score of its last probe, so no further scoring pass is needed;
cached stages read nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kvloft.config import ModelConfig, RetrievalConfig
from kvloft.index.base import RetrieverStats, Selection, check_select, register
from kvloft.index.hip_batch import n_keep, select_rows
from kvloft.index.hip_params import HipParams
from kvloft.index.key_moments import KeyMoments
from kvloft.kernels.hip_stage import (
    hierarchical_top1,
    hip_stage,
    hip_stage1,
    hip_stage1_reference,
    probes_per_chunk,
)
from kvloft.kernels.rowquant import dequantize_rows, quantize_rows
from kvloft.tiers.chunked import ChunkedRows
from kvloft.tiers.packed import PackedRows

__all__ = ["HipParams", "HipRetriever"]


@dataclass
class _LayerState:
    """Cached stage masks of one layer.

    masks[i]: [M_i] int64 host rows kept by stage i when it last ran (ascending, except
        the last stage: best chunk first); None = never ran or invalidated.
    seen[i]: host rows present when stage i last ran (rows >= seen[i] are fresh).
    """

    masks: list[Tensor | None]
    seen: list[int]
    step: int = 0
    offset: int = 0  # layer-dependent phase of the refresh schedule (HipParams.stagger)
    budget: int = -1
    refreshed: tuple[bool, ...] = ()


@register("hip")
class HipRetriever:
    batched_select = True  # select_batch: the rows of a batched step searched together
    needs_queries = False  # the runtime need not keep a prefill query sample
    small_state = True  # state_dict() is O(budget) per layer: a session keeps it to roll back a failed call

    def __init__(self, cfg: RetrievalConfig, model_cfg: ModelConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.device = torch.device(device)
        self.params = HipParams.from_options(cfg.options)
        self.use_kernel = self.params.kernel == "triton" or (
            self.params.kernel == "auto" and self.device.type == "cuda"
        )
        host = self.params.keys_on == "host" and self.device.type != "cpu"
        if host and not self.use_kernel:
            raise ValueError("hip option keys_on='host' reads keys from pinned host memory with the Triton "
                             "stage kernels; drop kernel='torch' (or use keys_on='device')")
        self.store_device = torch.device("cpu") if host else self.device
        self.keys: dict[int, ChunkedRows] = {}
        self.tiers: dict[int, Any] = {}  # layer -> LayerTiers whose host keys are read in place
        self.state: dict[int, _LayerState] = {}
        self.moments: dict[int, KeyMoments] = {}  # rank="z": the indexed keys' statistics per layer
        self._stats = RetrieverStats(extra={"refreshes": [0] * self.params.n_stages})
        self._counting: Tensor | None = None  # _count's kept arange

    # ---- index maintenance -------------------------------------------------------------

    def _store(self, layer: int, dtype: torch.dtype) -> ChunkedRows:
        if layer not in self.keys:
            shape = (self.model_cfg.n_kv_heads, self.model_cfg.head_dim)
            pin = self.store_device != self.device  # host keys read zero-copy by the kernels
            self.keys[layer] = ChunkedRows(shape, dtype, self.params.chunk_rows, self.store_device, pin=pin)
            self.state[layer] = self._fresh_state(layer)
        return self.keys[layer]

    def _fresh_state(self, layer: int) -> _LayerState:
        n = self.params.n_stages
        offset = layer % self.params.refresh_steps[0] if self.params.stagger else 0
        return _LayerState(masks=[None] * n, seen=[0] * n, offset=offset)

    def _check_keys(self, keys: Tensor) -> None:
        hkv, d = self.model_cfg.n_kv_heads, self.model_cfg.head_dim
        if keys.dim() != 3 or keys.shape[0] != hkv or keys.shape[2] != d:
            raise ValueError(f"keys must be [H_kv={hkv}, N, D={d}], got {tuple(keys.shape)}")

    def attach_host_tier(self, layer: int, tiers: Any) -> bool:
        """keys_on="host": search the session's host tier (tiers/kvcache.py LayerTiers) in place
        instead of a copy of its keys, model-dtype rows or 8-bit codes + scales alike
        (CacheConfig.host_dtype: the stage kernels dequantize the probe rows they read, the torch
        path reads dequantized rows). Returns False (the runtime then calls build, and the index
        keeps its own model-dtype copy of the keys) when the tier's chunks cannot be read so:
        spilled to disk (memory-mapped, not pinned), not pinned while searching on CUDA, or
        chunked in a size that is not a multiple of chunk_sizes[0]."""
        if self.params.keys_on != "host":
            return False
        host_k = tiers.host_k
        readable = host_k.pin or self.device.type == "cpu"
        if not readable or host_k.spill is not None or host_k.chunk_rows % self.params.chunk_sizes[0]:
            return False
        self.keys.pop(layer, None)
        self.moments.pop(layer, None)  # rank="z": made from the tier's rows at the first select
        self.tiers[layer] = tiers
        self.state[layer] = self._fresh_state(layer)
        return True

    def _packed(self) -> bool:
        """Whether a layer searches an 8-bit host tier in place (PackedRows: codes + scales)."""
        return any(getattr(t, "host_dtype", None) is not None for t in self.tiers.values())

    def key_bytes(self) -> int:
        """Bytes of the retriever's own key copies (layers not attached to their host tier), on
        store_device; an attached layer's keys are the tier's and counted there."""
        return sum(store.nbytes for store in self.keys.values())

    def _keys_of(self, layer: int) -> ChunkedRows | PackedRows | None:
        if layer in self.tiers:
            return self.tiers[layer].host_k  # waits for a copy down still in flight
        return self.keys.get(layer)

    def build(self, layer: int, keys: Tensor, queries: Tensor | None) -> None:
        """keys [H_kv, N, D] after RoPE (queries are not used: HiP needs no training signal)."""
        self._check_keys(keys)
        self.tiers.pop(layer, None)
        self.keys.pop(layer, None)
        self.moments.pop(layer, None)
        self._store(layer, keys.dtype).append_from(keys.transpose(0, 1))
        self._add_moments(layer, keys)

    def add(self, layer: int, keys: Tensor, positions: Tensor) -> None:
        """keys [H_kv, n, D] leaving the window; cached masks stay valid (new rows are fresh)."""
        self._check_keys(keys)
        self._add_moments(layer, keys)
        if layer in self.tiers:  # the tier holds the rows already
            return
        self._store(layer, keys.dtype).append_from(keys.transpose(0, 1))

    def _add_moments(self, layer: int, keys: Tensor) -> None:
        """rank="z": fold keys [H_kv, n, D] into the layer's statistics (O(n * D^2) per KV head)."""
        if self.params.rank != "z":
            return
        if layer not in self.moments:
            if layer in self.tiers:
                return  # an attached tier's statistics are made from its rows at the next select
            self.moments[layer] = KeyMoments(self.model_cfg.n_kv_heads, self.model_cfg.head_dim, self.device)
        kind = getattr(self.tiers.get(layer), "host_dtype", None)
        if kind is not None:  # an 8-bit tier holds (and the search reads) these keys as rounded there
            keys = dequantize_rows(*quantize_rows(keys, kind), kind, keys.dtype)
        self.moments[layer].add(keys.transpose(0, 1))

    def _moments_of(self, layer: int, store: ChunkedRows) -> KeyMoments:
        """The layer's statistics, remade from the store's rows (a scan, rare) when they do not
        count its rows: a tier attached in place, or rolled back (runtime rollback(); an attached
        tier's index is not rebuilt) or reloaded without a build. Otherwise incremental. An 8-bit
        tier's rows are read dequantized (PackedRows.iter_chunks), the values the stages score."""
        m = self.moments.get(layer)
        if m is None or m.count != len(store):
            m = KeyMoments(self.model_cfg.n_kv_heads, self.model_cfg.head_dim, self.device)
            for _, rows in store.iter_chunks():
                m.add(rows)
            self.moments[layer] = m
        return m

    # ---- search ------------------------------------------------------------------------

    def select(self, layer: int, q: Tensor, budget: int) -> Selection:
        """q [H_q, D] -> Selection(ids [k <= budget] shared by all heads, or [H_kv, k] with
        heads="kv"; scanned key vectors). Where nothing is pruned (budget >= host rows) every
        head keeps the first min(n, budget) rows (heads="kv": the same rows per head, [H_kv, k])."""
        check_select(q, budget, self.model_cfg)
        store = self._keys_of(layer)
        n = 0 if store is None else len(store)
        if n == 0 or budget == 0 or budget >= n:  # nothing to prune: every host row, or none
            return self._select_all(layer, n, budget)
        st = self.state[layer]
        flags = self._refresh_flags(st, budget)
        q, bias = q.to(self.device), None
        if self.params.rank == "z" and any(flags):  # q' [H_q, D], bias [H_q]: z-scored logits
            q, bias = self._moments_of(layer, store).zscore(q)
        if self.params.heads == "kv":
            return self._select_per_head(st, store, n, budget, flags, q, bias)
        reads = 0
        for i, refresh in enumerate(flags):
            if refresh:  # (a stage that does not run needs no candidates: flags cascade)
                cand = None if i == 0 else self._with_fresh(st, i - 1, n)  # None = every host row
                mask, r = self._run_stage(i, store, q, cand, self._kept(i, budget), bias)
                reads += self._stage_ran(st, i, mask, n, r)
        return self._finish(st, n, budget, flags, reads, self._with_fresh(st, self.params.n_stages - 1, n))

    def _select_per_head(self, st: _LayerState, store: ChunkedRows, n: int, budget: int, flags: tuple[bool, ...],
                         q: Tensor, bias: Tensor | None) -> Selection:
        """select() with heads="kv": every stage that refreshes runs once per KV head g, ranking
        chunks by the max over g's query-head group only (the other groups' heads get a +inf
        bias, so their logits are -inf: kernels/hip_stage.py probe_scores), and keeps g's own
        mask; st.masks[i] is then [H_kv, M_i] (every head keeps as many rows: the counts depend
        on n and the budget only). q [H_q, D] (z-scaled with bias [H_q] for rank="z").
        Returns ids [H_kv, k]: each head's fresh rows, then its own last-stage mask."""
        hkv = self.model_cfg.n_kv_heads
        biases = _group_biases(q.shape[0], hkv, bias, q.device)  # [H_kv, H_q] fp32
        reads = 0
        for i, refresh in enumerate(flags):
            if not refresh:
                continue
            masks, r = [], 0
            for g in range(hkv):
                cand = None if i == 0 else self._with_fresh_head(st, i - 1, n, g)
                mask, r_g = self._run_stage(i, store, q, cand, self._kept(i, budget), biases[g])
                masks.append(mask)
                r += r_g
            reads += self._stage_ran(st, i, torch.stack(masks), n, r)
        last = self.params.n_stages - 1
        cand = torch.stack([self._with_fresh_head(st, last, n, g) for g in range(hkv)])  # [H_kv, M]
        st.step, st.budget, st.refreshed = st.step + 1, budget, flags
        # reads already sum the H_kv searches' probe rows (each reads a row of every KV head,
        # counted as one here as in shared mode: scanned = reads * H_kv)
        sel = Selection(ids=cand[:, :budget], scanned=reads * hkv, padded=False)
        self._stats.record(sel)
        return sel

    def _with_fresh_head(self, st: _LayerState, stage: int, n: int, head: int) -> Tensor:
        """heads="kv": KV head `head`'s cached rows of stage `stage` plus the fresh rows."""
        return _with_fresh(st.masks[stage][head], st.seen[stage], n, last=stage == self.params.n_stages - 1,
                           count=self._count(n))

    @classmethod
    def select_batch(cls, retrievers: Sequence[HipRetriever], layer: int, q: Tensor,
                     budgets: Sequence[int]) -> list[Selection]:
        """Each row's select(layer, q[g], budgets[g]) for the rows of a batched decode step, the
        stages they recompute searched for all of them at once (index/hip_batch.py): q
        [G, H_q, D], retrievers[g] the row's own (one search_key()). Same ids as each alone.
        Rows that search an 8-bit host tier in place are refused (search_key() None: select()
        each alone)."""
        per_head = [g for g, h in enumerate(retrievers) if h.params.heads == "kv"]
        if per_head:
            raise ValueError(f"select_batch: rows {per_head} keep a mask per KV head (hip option heads='kv'), "
                             "which the batched search does not; search_key() is None for them: select() each alone")
        packed = [g for g, h in enumerate(retrievers) if h._packed()]
        if packed:
            raise ValueError(f"select_batch: rows {packed} search an 8-bit host tier in place (CacheConfig.host_dtype), "
                             "which the batched search reads as model-dtype rows; search_key() is None for them: "
                             "select() each alone")
        return select_rows(retrievers, layer, q, budgets)

    def search_key(self) -> tuple[Any, ...] | None:
        """Retrievers with equal keys search together in select_batch (stage shapes, kernels, device);
        rank is not part of it: rank="z" and "logit" rows share a launch (index/hip_batch.py).
        None where an 8-bit host tier is searched in place (index/hip_batch.py reads every row's
        chunks as model-dtype rows through one table: codes need their scales' table too), and
        for heads="kv" (per-KV-head masks: the batched search keeps one mask per row)."""
        p, m = self.params, self.model_cfg
        if self._packed() or p.heads == "kv":  # heads="kv": per-KV-head masks, searched by select() alone
            return None
        return (type(self), p.chunk_sizes, p.probe, self.use_kernel, self.device, self.store_device,
                m.n_heads, m.n_kv_heads, m.head_dim)

    def _select_all(self, layer: int, n: int, budget: int) -> Selection:
        """select() where it prunes nothing: the first min(n, budget) host rows."""
        if self._keys_of(layer) is not None:  # the masks no longer describe this budget
            st = self.state[layer]
            st.step, st.masks = st.step + 1, [None] * self.params.n_stages
            st.refreshed = (False,) * self.params.n_stages
        ids = self._count(min(n, budget))
        if self.params.heads == "kv":  # [H_kv, k]: one shape for every select of a per-head retriever
            ids = ids.expand(self.model_cfg.n_kv_heads, -1)
        sel = Selection(ids=ids, scanned=0, padded=False)
        self._stats.record(sel)
        return sel

    def _stage_ran(self, st: _LayerState, stage: int, mask: Tensor, n: int, reads: int) -> int:
        """Record stage `stage`'s new mask [M] (computed with n host rows); returns its probe reads."""
        st.masks[stage], st.seen[stage] = mask, n
        self._stats.extra["refreshes"][stage] += 1
        return reads

    def _with_fresh(self, st: _LayerState, stage: int, n: int) -> Tensor:
        """Stage `stage`'s cached rows plus the rows that arrived since it ran (_with_fresh)."""
        return _with_fresh(st.masks[stage], st.seen[stage], n, last=stage == self.params.n_stages - 1,
                           count=self._count(n))

    def _finish(self, st: _LayerState, n: int, budget: int, flags: tuple[bool, ...], reads: int,
                cand: Tensor) -> Selection:
        """The selection from the last stage's candidates cand [M] (fresh rows first)."""
        st.step += 1
        st.budget = budget
        st.refreshed = flags
        ids = cand[:budget]
        # ids = the rows that arrived since the last stage ran, then its cached mask: the
        # runtime may keep that mask's rows on the device until the stage runs again
        n_fresh = min(max(n - st.seen[-1], 0), ids.shape[0])
        sel = Selection(ids=ids, scanned=reads * self.model_cfg.n_kv_heads, stable=st.masks[-1],
                        n_fresh=n_fresh, padded=False)
        self._stats.record(sel)
        return sel

    def _count(self, n: int) -> Tensor:
        """arange(n) on the retriever's device, as a view of one kept tensor (doubled as the
        context grows): the stages' implicit candidate rows and fresh rows without a launch each.
        Views of it end up in masks and selections, which nothing writes to."""
        have = 0 if self._counting is None else self._counting.numel()
        if have < n:
            self._counting = torch.arange(max(n, 2 * have), device=self.device)
        return self._counting[:n]

    def refresh_schedule(self, layer: int, budget: int, n_rows: int) -> tuple[bool, ...] | None:
        """Which stages the next select(layer, q, budget) recomputes (one bool per stage), with
        n_rows host rows indexed by then; for a step plan made before the step
        (runtime/step_plan.py). None if the layer is not indexed. Changes nothing."""
        st = self.state.get(layer)
        if st is None:
            return None
        if n_rows == 0 or budget == 0 or budget >= n_rows:  # select() prunes nothing: no stage runs
            return (False,) * self.params.n_stages
        return self._refresh_flags(st, budget)

    def _refresh_flags(self, st: _LayerState, budget: int) -> tuple[bool, ...]:
        flags, cascade = [], False
        for i, every in enumerate(self.params.refresh_steps):
            last = i == self.params.n_stages - 1
            due = st.masks[i] is None or (st.step + st.offset) % every == 0 or (last and budget != st.budget)
            cascade = cascade or due
            flags.append(cascade)
        return tuple(flags)

    def _kept(self, stage: int, budget: int) -> int:
        """Tokens stage `stage` keeps: the budget at the last stage, at least the budget before."""
        if stage == self.params.n_stages - 1:
            return budget
        return max(self.params.kept_tokens[stage], budget)

    def _run_stage(
        self, stage: int, store: ChunkedRows, q: Tensor, cand: Tensor | None, kept: int, bias: Tensor | None = None
    ) -> tuple[Tensor, int]:
        """One pruning stage: cand [M] host rows (None = all rows) -> (kept rows, probe rows read);
        bias None or [H_q] fp32 (rank="z", q then z-scaled: kernels/hip_stage.py probe_scores).

        The candidates are cut into whole chunks of l_c; the M % l_c left over (the newest
        rows of stage 1, the tail of a later stage's list) are kept without a search. So no
        chunk holds padding, and every shape is known on the host: a stage never waits for
        the GPU (filtering padding out would read a count back in every layer).
        """
        length = self.params.chunk_sizes[stage]
        last = stage == self.params.n_stages - 1
        n_cand = len(store) if cand is None else cand.numel()
        if n_cand <= kept:
            return (self._count(n_cand) if cand is None else cand), 0
        n_full = n_cand // length
        rows = self._count(n_cand) if cand is None else cand
        chunks, rest = rows[: n_full * length].view(n_full, length), rows[n_full * length :]
        score = self._stage_scores(stage, store, q, chunks, bias)
        top = best_chunks(score, n_keep(kept, length, n_full))
        return kept_rows(chunks, top, rest, last), n_full * probes_per_chunk(length)

    def _stage_scores(self, stage: int, store: ChunkedRows, q: Tensor, chunks: Tensor,
                      bias: Tensor | None = None) -> Tensor:
        """Scores [C] fp32 of the candidate chunks [C, l_c] (row ids) of stage `stage` (bias as in _run_stage)."""
        if stage == 0:
            return self._stage1_scores(store, q, chunks, bias)
        if self.use_kernel:
            return hip_stage(store.chunks, chunks, q, self.params.probe, store.pointer_table(self.device), bias)[1]
        return hierarchical_top1(chunks, store.rows, q, self.params.probe, bias)[1]

    def _stage1_scores(self, store: ChunkedRows, q: Tensor, chunks: Tensor, bias: Tensor | None = None) -> Tensor:
        """Stage 1 over the first n_full * length rows (chunks [n_full, l_c] = those rows in order;
        chunk_rows is a multiple of l_c, so only the store's last chunk ends in a partial l_c
        chunk, whose score is dropped): the Triton kernels read a store of several chunks in one
        launch through its address table; the torch path goes one store chunk at a time.

        Returns score [n_full] fp32.
        """
        n_full, length = chunks.shape
        packed = isinstance(store, PackedRows)
        if self.use_kernel and (packed or len(store.chunks) > 1):
            # one launch over every store chunk (found through their address table), not one
            # per chunk: a 1M-token tier in 4096-row chunks would be 256 launches per layer;
            # an 8-bit tier always (its codes are read in place: iter_chunks would dequantize a copy)
            return hip_stage(store.chunks, chunks, q, self.params.probe, store.pointer_table(self.device), bias)[1]
        stage1 = hip_stage1 if self.use_kernel else hip_stage1_reference
        scores = [stage1(rows, q, length, self.params.probe, bias)[1] for _, rows in store.iter_chunks()]
        return torch.cat(scores)[:n_full]

    def stats(self) -> dict[str, Any]:
        return self._stats.as_dict()

    def state_dict(self, host: bool = True) -> dict[str, Any]:
        """Stage masks, refresh schedules and counters (the key copy is rebuilt from the host
        tier by build() or attach_host_tier on load, and so are rank="z"'s key statistics:
        H_kv * D^2 fp64 per layer, too large for a per-step mark; select remakes them from the
        keys wherever their row count differs from the store's). Masks are tensors, the rest JSON; on the
        host, or (host=False, a session's mark) copied on the retriever's device."""
        s = self._stats
        out: dict[str, Any] = {"calls": s.calls, "scanned": s.scanned, "selected": s.selected,
                               "refreshes": list(s.extra["refreshes"])}
        masks: dict[str, Tensor] = {}
        for layer, st in self.state.items():
            p = f"layer{layer}."
            out.update({p + "step": st.step, p + "offset": st.offset, p + "budget": st.budget,
                        p + "seen": list(st.seen), p + "refreshed": list(st.refreshed)})
            masks.update({f"{p}mask{i}": m for i, m in enumerate(st.masks) if m is not None})
        if masks:  # int64 [M_i] (or [H_kv, M_i]) host rows each: one copy for all (a session marks every step)
            flat = torch.cat([m.flatten() for m in masks.values()])  # a new tensor: its parts alias nothing live
            parts = (flat.cpu() if host else flat).split([m.numel() for m in masks.values()])
            out.update({key: (part.clone() if host else part).view(m.shape)  # [M_i], or [H_kv, M_i] (heads="kv")
                        for (key, m), part in zip(masks.items(), parts, strict=True)})
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state_dict() (after build() or attach_host_tier of every layer it names)."""
        s, n = self._stats, self.params.n_stages
        s.calls, s.scanned, s.selected = int(state["calls"]), int(state["scanned"]), int(state["selected"])
        refreshes = [int(r) for r in state["refreshes"]]
        if len(refreshes) != n:
            raise ValueError(f"hip state has {len(refreshes)} stages, these options {n}")
        s.extra["refreshes"] = refreshes
        for key in state:
            if not key.endswith(".step"):
                continue
            layer = int(key.removeprefix("layer").split(".")[0])
            p = f"layer{layer}."
            seen, refreshed = [int(x) for x in state[p + "seen"]], tuple(bool(x) for x in state[p + "refreshed"])
            if len(seen) != n or len(refreshed) not in (0, n):
                raise ValueError(f"hip state of layer {layer} does not have {n} stages")
            masks = [state.get(f"{p}mask{i}") for i in range(n)]
            self.state[layer] = _LayerState(masks=[None if m is None else m.to(self.device) for m in masks],
                                            seen=seen, step=int(state[p + "step"]), offset=int(state[p + "offset"]),
                                            budget=int(state[p + "budget"]), refreshed=refreshed)


def _group_biases(hq: int, hkv: int, bias: Tensor | None, device: torch.device) -> Tensor:
    """heads="kv": per KV head g, the bias [H_q] fp32 that leaves only g's query-head group in a
    probe's max (+inf on every other head; rank="z"'s bias [H_q] or 0 on g's own) -> [H_kv, H_q]."""
    group = hq // hkv
    own = torch.arange(hq, device=device) // group == torch.arange(hkv, device=device)[:, None]  # [H_kv, H_q]
    base = torch.zeros(hq, dtype=torch.float32, device=device) if bias is None else bias.float()
    return torch.where(own, base, torch.full_like(base, float("inf")))


def _with_fresh(mask: Tensor, seen: int, n: int, last: bool, count: Tensor | None = None) -> Tensor:
    """A stage's cached rows plus the rows that arrived since it ran (seen..n-1; count: arange(n)).

    Intermediate stages keep ascending order (the next stage chunks runs of neighbours);
    the last stage puts the fresh rows first, so trimming to the budget drops the tail
    of its lowest-scoring chunk instead.
    """
    if seen >= n:
        return mask
    fresh = count[seen:n] if count is not None else torch.arange(seen, n, device=mask.device)
    return torch.cat([fresh, mask] if last else [mask, fresh])


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

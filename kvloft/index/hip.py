"""HiP: multi-stage hierarchical chunk pruning (HiP arXiv 2406.09827, InfiniteHiP arXiv 2502.08910).

The host tier is narrowed stage by stage. Stage i takes its candidate tokens (all host
rows for stage 1), splits them in order into chunks of `chunk_sizes[i]` tokens, finds
each chunk's representative key by a hierarchical top-1 search (log2(l_c) halvings,
two probe keys read per chunk per halving; index/hip_stages.py, kernels/hip_stage.py), scores
the chunk by its representative (max over all query heads: one mask shared by all heads, so
Selection.ids is [k]; heads="kv": a mask per KV head, index/hip_heads.py) and keeps the tokens
of the best `kept_tokens[i] // l_c` chunks for the next stage. The last stage keeps
`budget // l_c` chunks (select's budget replaces `kept_tokens[-1]`); earlier stages keep at
least `budget` tokens.

Masks are cached per layer and stage (index/hip_state.py) and recomputed every
`refresh_steps[i]` decode steps of that layer (step 0 is the first select after build); a stage
also refreshes whenever an earlier one did (its input changed) or the budget changed. Rows that
entered the host tier after a stage's mask was computed (one per decode step, so fewer
than refresh_steps[i]) are passed on to the next stage as candidates; in the final
selection they come first and the tail of the lowest-scoring chunk is trimmed, so at
most `budget` ids are returned.

HiP assumes attention locality: a run of relevant keys is seen by a stage when it
covers one of the chunk's probe positions (guaranteed for a run of l_c / 2 rows inside
one chunk); a short run sitting between probes is missed.

The other files of HiP: hip_params.py (options), hip_tier.py (keys_on="host": the session's host
tier searched in place, 8-bit rows included), hip_zrank.py (rank="z": the keys' statistics),
hip_batch.py (select_batch: the rows of a batched decode step searched together, 8-bit host
tiers in place too, each getting the ids its own select() would).

Work reported (`scanned`): key vectors read by the probes of the stages recomputed at
this step, 2 * log2(l_c) probe rows per chunk, times H_kv (the exact retriever's unit).
A chunk's score is the score of its last probe, so no further scoring pass is needed;
cached stages read nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from kvloft.config import ModelConfig, RetrievalConfig
from kvloft.index.base import RetrieverStats, Selection, check_select, register
from kvloft.index.hip_batch import select_rows
from kvloft.index.hip_heads import select_per_head
from kvloft.index.hip_params import HipParams
from kvloft.index.hip_stages import best_chunks, kept_rows, run_stage, stage_scores
from kvloft.index.hip_state import LayerState, fresh_state, load_state_dict, state_dict, with_fresh
from kvloft.index.hip_tier import attach_host_tier, host_formats, key_store_device
from kvloft.index.hip_zrank import add_moments, moments_of
from kvloft.index.key_moments import KeyMoments
from kvloft.tiers.chunked import ChunkedRows
from kvloft.tiers.packed import PackedRows

__all__ = ["HipParams", "HipRetriever", "best_chunks", "kept_rows"]


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
        self.store_device = key_store_device(self.params, self.device, self.use_kernel)
        self.keys: dict[int, ChunkedRows] = {}
        self.tiers: dict[int, Any] = {}  # layer -> LayerTiers whose host keys are read in place
        self.state: dict[int, LayerState] = {}
        self.moments: dict[int, KeyMoments] = {}  # rank="z": the indexed keys' statistics per layer
        self._stats = RetrieverStats(extra={"refreshes": [0] * self.params.n_stages})
        self._counting: Tensor | None = None  # _count's kept arange

    # ---- index maintenance -------------------------------------------------------------

    def _store(self, layer: int, dtype: torch.dtype) -> ChunkedRows:
        if layer not in self.keys:
            shape = (self.model_cfg.n_kv_heads, self.model_cfg.head_dim)
            pin = self.store_device != self.device  # host keys read zero-copy by the kernels
            self.keys[layer] = ChunkedRows(shape, dtype, self.params.chunk_rows, self.store_device, pin=pin)
            self.state[layer] = fresh_state(self.params, layer)
        return self.keys[layer]

    def _check_keys(self, keys: Tensor) -> None:
        hkv, d = self.model_cfg.n_kv_heads, self.model_cfg.head_dim
        if keys.dim() != 3 or keys.shape[0] != hkv or keys.shape[2] != d:
            raise ValueError(f"keys must be [H_kv={hkv}, N, D={d}], got {tuple(keys.shape)}")

    def attach_host_tier(self, layer: int, tiers: Any) -> bool:
        """keys_on="host": search the session's host tier (tiers/layer_tiers.py LayerTiers) in place
        instead of a copy of its keys, model-dtype rows or 8-bit codes + scales alike; False where
        its chunks cannot be read so (the runtime then calls build): index/hip_tier.py."""
        return attach_host_tier(self, layer, tiers)

    def _host_formats(self) -> tuple[str, ...]:
        """The formats of the 8-bit host tiers its layers search in place, () for none (index/hip_tier.py)."""
        return host_formats(self)

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
        """rank="z": fold keys [H_kv, n, D] into the layer's statistics (index/hip_zrank.py)."""
        add_moments(self, layer, keys)

    def _moments_of(self, layer: int, store: ChunkedRows) -> KeyMoments:
        """rank="z": the layer's statistics, remade from the store's rows where they do not count
        them (index/hip_zrank.py)."""
        return moments_of(self, layer, store)

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
            return select_per_head(self, st, store, n, budget, flags, q, bias)
        reads = 0
        for i, refresh in enumerate(flags):
            if refresh:  # (a stage that does not run needs no candidates: flags cascade)
                cand = None if i == 0 else self._with_fresh(st, i - 1, n)  # None = every host row
                mask, r = self._run_stage(i, store, q, cand, self._kept(i, budget), bias)
                reads += self._stage_ran(st, i, mask, n, r)
        return self._finish(st, n, budget, flags, reads, self._with_fresh(st, self.params.n_stages - 1, n))

    @classmethod
    def select_batch(cls, retrievers: Sequence[HipRetriever], layer: int, q: Tensor,
                     budgets: Sequence[int]) -> list[Selection]:
        """Each row's select(layer, q[g], budgets[g]) for the rows of a batched decode step, the
        stages they recompute searched for all of them at once (index/hip_batch.py): q
        [G, H_q, D], retrievers[g] the row's own (one search_key()). Same ids as each alone,
        8-bit host tiers searched in place included. Rows search_key() leaves out (_unbatched:
        heads="kv") are refused: select() each alone."""
        refused = [f"row {g}: {why}" for g, h in enumerate(retrievers) if (why := h._unbatched())]
        if refused:
            raise ValueError(f"select_batch: {'; '.join(refused)}; search_key() is None for these rows: "
                             "select() each alone")
        return select_rows(retrievers, layer, q, budgets)

    def search_key(self) -> tuple[Any, ...] | None:
        """Retrievers with equal keys search together in select_batch (stage shapes, which stages
        scan every row, kernels, device, the formats of the 8-bit host tiers searched in place:
        model-dtype rows, int8 and fp8 codes each launch apart); rank is not part of it: rank="z"
        and "logit" rows share a launch (index/hip_batch.py). None for heads="kv" (per-KV-head
        masks: the batched search keeps one mask per row)."""
        p, m = self.params, self.model_cfg
        if self._unbatched():  # searched by select() alone
            return None
        return (type(self), p.chunk_sizes, p.scan_stages, p.probe, self.use_kernel, self.device,
                self.store_device, m.n_heads, m.n_kv_heads, m.head_dim, self._host_formats())

    def _unbatched(self) -> str | None:
        """Why select_batch cannot search this retriever's rows, or None where it can."""
        if self.params.heads == "kv":
            return "it keeps a mask per KV head (hip option heads='kv'), which the batched search does not"
        return None

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

    def _stage_ran(self, st: LayerState, stage: int, mask: Tensor, n: int, reads: int) -> int:
        """Record stage `stage`'s new mask [M] (computed with n host rows); returns its probe reads."""
        st.masks[stage], st.seen[stage] = mask, n
        self._stats.extra["refreshes"][stage] += 1
        return reads

    def _with_fresh(self, st: LayerState, stage: int, n: int) -> Tensor:
        """Stage `stage`'s cached rows plus the rows that arrived since it ran (hip_state.with_fresh)."""
        return with_fresh(st.masks[stage], st.seen[stage], n, last=stage == self.params.n_stages - 1,
                          count=self._count(n))

    def _finish(self, st: LayerState, n: int, budget: int, flags: tuple[bool, ...], reads: int,
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

    def _refresh_flags(self, st: LayerState, budget: int) -> tuple[bool, ...]:
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
        bias None or [H_q] fp32 (index/hip_stages.py)."""
        return run_stage(self, stage, store, q, cand, kept, bias)

    def _stage_scores(self, stage: int, store: ChunkedRows, q: Tensor, chunks: Tensor,
                      bias: Tensor | None = None) -> Tensor:
        """Scores [C] fp32 of the candidate chunks [C, l_c] (row ids) of stage `stage` (index/hip_stages.py)."""
        return stage_scores(self, stage, store, q, chunks, bias)

    def stats(self) -> dict[str, Any]:
        return self._stats.as_dict()

    def state_dict(self, host: bool = True) -> dict[str, Any]:
        """Stage masks, refresh schedules and counters (index/hip_state.py); on the host, or
        (host=False, a session's mark) copied on the retriever's device."""
        return state_dict(self, host)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state_dict() (after build() or attach_host_tier of every layer it names)."""
        load_state_dict(self, state)

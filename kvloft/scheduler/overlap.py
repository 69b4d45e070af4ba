"""OverlapFetch: the decode step's retrieved rows, planned and overlapped (DESIGN.md, Scheduler).

A RowFetch (scheduler/fetch.py); runtime/scheduled.py's ScheduledAttention plugs it into the
decode path when RuntimeConfig(scheduler="overlap"). Per layer of a decode step:

    (the step appends k, v to the static tier: tokens leaving the window go to the host tier)
    start:   CPU-side retrievers (attention_graph): index add + select on a worker thread,
             fed a pinned copy of q, while the step launches the static attention;
             GPU-side retrievers: select inline, ids copied back asynchronously, the
             static attention launched before waiting on that copy
    (the step's static attention over sink + window                 -> (o_s, lse_s))
    attend:  plan on the CPU (scheduler/plan.py): hits in the GPU row cache, rows to fetch
             (union over heads, once), LRU admissions and evictions;
             per piece of the fetch (scheduler/streams.py): indices and rows to the device on
             the copy stream (zero-copy kernel or staged H2D), events, no device-wide sync;
             attention over the cache hits (in place) and over the fetched rows
                                                       -> (o_c, lse_c), (o_f, lse_f)
    (the step merges static, hits, fetched); fetched rows admitted into the cache

Same selection, same rows, same math as the in-place fetch: the output equals it up to
float rounding (one more partial in the exact log-sum-exp merge). Position mode "exact" only.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kvloft.config import CacheConfig, ModelConfig, RetrievalConfig, RuntimeConfig
from kvloft.index.base import Retriever
from kvloft.kernels import KernelSet
from kvloft.scheduler.budget import plan_memory, resolve_cache_bytes
from kvloft.scheduler.cache import RowCache
from kvloft.scheduler.fetch import Retrieved, StepTimers
from kvloft.scheduler.params import CPU_SEARCH_METHODS, SchedulerParams
from kvloft.scheduler.plan import FetchPiece, StepPlan, split_fetch
from kvloft.scheduler.streams import TransferEngine, chunk_tables
from kvloft.tiers.kvcache import Evicted, LayerTiers, TieredKVCache

__all__ = ["OverlapFetch"]


@dataclass
class _Search:
    """A select() in flight: a worker's future, or ids copied back behind an event."""

    future: Future | None = None
    ids: Tensor | None = None  # [H_kv, k] or [k] on the CPU once ready
    ready: Any = None  # torch.cuda.Event of the ids' D2H copy (inline, CUDA)
    scanned: int = 0


class OverlapFetch:
    def __init__(self, cfg: ModelConfig, rcfg: RetrievalConfig, cache: TieredKVCache, retriever: Retriever,
                 ops: KernelSet, device: torch.device, timers: StepTimers, *,
                 runtime: RuntimeConfig | None = None, cache_cfg: CacheConfig | None = None,
                 params: SchedulerParams | None = None) -> None:  # fmt: skip
        if rcfg.position_mode != "exact":
            raise ValueError(
                f"scheduler='overlap' runs position_mode='exact' only, got {rcfg.position_mode!r}; "
                "use scheduler='none' for extrapolation"
            )
        self.retriever, self.ops, self.device, self.timers = retriever, ops, device, timers
        self.scale = cfg.head_dim**-0.5
        self.params = params or SchedulerParams()
        dtype = cache[0].k.dtype
        runtime, cache_cfg = runtime or RuntimeConfig(), cache_cfg or CacheConfig()
        nbytes = resolve_cache_bytes(cfg, rcfg, runtime, self.params, dtype, device, cache_cfg)
        if device.type == "cuda" and runtime.gpu_memory_budget:  # refuse before allocating
            n = max(cache_cfg.max_context, cache.n_tokens)
            plan_memory(cfg, rcfg, runtime, n, dtype, cache_cfg=cache_cfg, scheduler=self.params,
                        cache_bytes=nbytes)
        self.rows = RowCache.from_bytes(cfg, nbytes, device, dtype)
        self.fetch_mode = self._fetch_mode(cache)
        max_rows = self.params.gathered_rows or max(1, rcfg.budget * cfg.n_kv_heads)
        self.engine = TransferEngine(self.fetch_mode, (cfg.n_kv_heads, cfg.head_dim), dtype, device,
                                     max_rows=max_rows, regions=self.params.regions,
                                     stage_rows=self.params.stage_rows, stage_buffers=self.params.stage_buffers)
        self.cpu_search = rcfg.method in CPU_SEARCH_METHODS
        pooled = self.params.search_pool == "always" or (self.params.search_pool == "auto" and self.cpu_search)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvloft-search") if pooled else None
        cuda = device.type == "cuda"
        self._search_stream = torch.cuda.Stream(device) if pooled and cuda else None
        self._q_host = None  # pinned [H_q, D]: q for a CPU-side search
        self.pieces = 0

    def _fetch_mode(self, cache: TieredKVCache) -> str:
        want = self.params.fetch
        if self.device.type != "cuda":
            return "host" if want in ("auto", "host") else want  # zero_copy/staged: interpreter tests
        pinned = cache[0].host_k.pin and cache[0].host_dtype is None  # 8-bit rows: fetched staged
        if want == "host":
            raise ValueError("fetch='host' is for CPU sessions; on CUDA use 'zero_copy' or 'staged'")
        if want == "zero_copy" and not pinned:
            raise ValueError("fetch='zero_copy' needs a pinned host tier in the model dtype (CacheConfig.host_dtype "
                             "None); use fetch='staged'")
        if want == "auto":
            return "zero_copy" if self.ops.name == "triton" and pinned else "staged"
        return want

    # ---- RowFetch --------------------------------------------------------------------------

    def start(self, layer: int, tiers: LayerTiers, q: Tensor, evicted: Evicted | None, budget: int,
              index_add: bool) -> _Search | None:
        """The search of q [H_q, D] in flight (and the evicted rows into the index), on the
        worker or inline with its ids copied back asynchronously."""
        added = evicted if index_add else None
        if self._pool is not None:
            args = self._search_inputs(tiers, q, added, budget)
            return _Search(future=self._pool.submit(self._search_job, layer, *args))
        if added is not None:
            with self.timers("index_add"):
                self.retriever.add(layer, added.k.transpose(0, 1).to("cpu"), added.positions.to("cpu"))
        if not budget:
            return None
        with self.timers("search"):
            sel = self.retriever.select(layer, q, budget)
        if sel.ids.device.type != "cuda":
            return _Search(ids=sel.ids, scanned=sel.scanned)
        ids = sel.ids.to("cpu", non_blocking=True)  # pinned; the static attention queues behind it
        ready = torch.cuda.Event()
        ready.record()
        return _Search(ids=ids, ready=ready, scanned=sel.scanned)

    def attend(self, layer: int, tiers: LayerTiers, q: Tensor, budget: int, pending: _Search | None) -> Retrieved:
        """Wait for the search, plan the selected rows against the row cache, attend q [H_q, D]
        to the hits in place and to the rows fetched (their partials, in that order)."""
        if not budget:
            if pending is not None:  # the worker's index add: done before the next layer
                self._finish_search(pending)
            return Retrieved()
        ids = self._finish_search(pending)
        with self.timers("plan"):
            plan = self.rows.plan(layer, ids)
        with self.timers("retrieved_attention"):
            outs, lses = self._attend_plan(layer, tiers, q, plan)
        return Retrieved(outs, lses, pending.scanned)

    def reset(self) -> None:
        self.rows.clear()  # host rows past a rollback's mark will hold other tokens

    def bytes(self) -> dict[str, int]:
        return {"row_cache": self.rows.nbytes, "gathered": self.engine.nbytes}

    def close(self) -> None:
        """Stops the search worker (also done when the fetch is collected)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def stats(self) -> dict[str, Any]:
        """Row cache hit statistics, rows moved, fetch mode, where select ran."""
        return {"fetch": self.fetch_mode, "search_pool": self._pool is not None,
                "cache": self.rows.stats(), "rows_fetched": self.engine.rows_moved,
                "bytes_fetched": self.engine.rows_moved * self.rows.row_bytes, "pieces": self.pieces}

    # ---- the search ------------------------------------------------------------------------

    def _search_inputs(self, tiers: LayerTiers, q1: Tensor, ev: Evicted | None, budget: int):
        """What the worker needs: q (a pinned host copy for CPU-side search, with its event),
        the evicted rows read back from the host tier (no device sync), the budget."""
        added = None
        if ev is not None:
            rows = torch.arange(ev.first_row, ev.first_row + ev.k.shape[0])
            added = (tiers.host_k.rows(rows).transpose(0, 1), tiers.host_pos.rows(rows))
        q_event = None
        q_in = q1
        if budget and q1.device.type == "cuda":
            q_event = torch.cuda.Event()
            if self.cpu_search:
                if self._q_host is None:
                    self._q_host = torch.empty(q1.shape, dtype=q1.dtype, pin_memory=True)
                self._q_host.copy_(q1, non_blocking=True)  # the previous layer's job is done
                q_in = self._q_host
            q_event.record()
        return q_in, q_event, added, budget

    def _search_job(self, layer: int, q_in: Tensor, q_event, added, budget: int):
        """On the worker: index add, then select; returns (ids on the CPU, scanned, add s, search s)."""
        stream = torch.cuda.stream(self._search_stream) if self._search_stream is not None else _nullctx()
        with torch.inference_mode(), stream:
            t0 = time.perf_counter()
            if added is not None:
                self.retriever.add(layer, *added)
            t1 = time.perf_counter()
            if not budget:
                return None, 0, t1 - t0, 0.0
            if q_event is not None:
                if q_in.device.type == "cpu":
                    q_event.synchronize()  # the pinned copy of q has landed
                else:
                    self._search_stream.wait_event(q_event)
            sel = self.retriever.select(layer, q_in, budget)
            ids = sel.ids.to("cpu")
            return ids, sel.scanned, t1 - t0, time.perf_counter() - t1

    def _finish_search(self, search: _Search) -> Tensor:
        with self.timers("search_wait"):
            if search.future is not None:
                ids, scanned, add_s, search_s = search.future.result()
                self.timers.seconds["index_add"] += add_s
                self.timers.seconds["search"] += search_s
                search.ids, search.scanned = ids, scanned
            elif search.ready is not None:
                search.ready.synchronize()  # waits for select and the copy only
        return search.ids

    # ---- the plan, run -----------------------------------------------------------------------

    def _attend_plan(self, layer: int, tiers: LayerTiers, q: Tensor, plan: StepPlan) -> tuple[list, list]:
        """Attention over the plan's cache hits and fetched rows: partial (out, lse) lists."""
        outs, lses = [], []
        pieces = split_fetch(plan, self.engine.max_rows)
        hits = plan.hit_ids if plan.n_hits else None
        if not pieces and hits is not None:
            pieces = [FetchPiece(0, plan.fetch_tokens, plan.fetch_ids, plan.admit_slots)]  # hits only
        for piece in pieces:
            self._run_piece(layer, tiers, q, piece, hits, outs, lses)
            hits = None
        return outs, lses

    def _run_piece(self, layer: int, tiers: LayerTiers, q: Tensor, piece: FetchPiece,
                   hits: np.ndarray | None, outs: list, lses: list) -> None:
        m = piece.fetch_tokens.shape[0]
        zero_copy = self.fetch_mode == "zero_copy" and m > 0
        parts = [piece.fetch_ids.reshape(-1), piece.fetch_tokens, piece.admit_slots]
        if hits is not None:
            parts.append(hits.reshape(-1))
        if zero_copy:
            parts.append(chunk_tables(tiers))
        packed = np.concatenate(parts)
        eng = self.engine
        r = eng.open(packed.shape[0], m)
        idx = eng.send_indices(r, packed)
        views = _split(idx, [p.shape[0] for p in parts])
        shape = piece.fetch_ids.shape
        if m:
            with self.timers("transfer"):
                tables = views[4 if hits is not None else 3].view(2, -1) if zero_copy else None
                eng.send_rows(r, tiers, piece.fetch_tokens, views[1], tables)
        eng.wait_indices(r)
        if hits is not None:
            o, lse = self.ops.gather_attend(q, self.rows.k[layer], self.rows.v[layer], views[3].view(shape),
                                            scale=self.scale)
            outs.append(o)
            lses.append(lse)
        if m:
            eng.wait_rows(r)
            o, lse = self.ops.gather_attend(q, r.k, r.v, views[0].view(shape), scale=self.scale)
            outs.append(o)
            lses.append(lse)
            self.rows.admit(layer, r.k, r.v, views[2])
        eng.release(r)
        self.pieces += 1


def _split(t: Tensor, sizes: list[int]) -> list[Tensor]:
    out, at = [], 0
    for n in sizes:
        out.append(t[at : at + n])
        at += n
    return out


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

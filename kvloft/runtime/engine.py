"""Batched decode: B sessions of one model, one token each, in one forward pass.

    engine = kvloft.Engine(model, max_batch=32)
    logits = engine.step([(s1, t1), (s2, t2), ...])        # [B, V] fp32, row b for pair b
    out = engine.generate([s1, s2, s3], max_new_tokens=32)  # greedy: list[list[int]] per session

Each session keeps its own tiers, retriever and length. A step is planned on the CPU
(runtime/step_plan.py), then run (DESIGN.md, One decode step):

    rows down   each tiered row at exact positions read in place moves the rows this step
                displaces from its rings to the host tier and into its index now, before any
                layer runs (TieredAttention.make_room; the plan's `evicts`): a layer only
                writes its token into the freed slot
    x = embed(tokens) [B, hidden]; cos, sin = rope(positions [B])
    per layer: q, k, v = block.pre(x) for all B rows at once (one GEMM per projection)
               o[b] = backend_b.attend(layer, q[b:b+1], k[b:b+1], v[b:b+1], positions[b:b+1])
                      (the session's own decode route: dense, or static tier + retrieval;
                      rows whose retrievers search together make one search per group:
                      runtime/batch_search.py; rows whose route is one launch over a slot
                      table share one launch: runtime/batch_attention.py)
               x = block.post(x, o) for all B rows at once
    logits = head(x) [B, V]

That is Transformer.forward over B tokens with RowAttention (runtime/batch_layer.py) as its
backend; the pairs are checked before anything changes (runtime/batch_checks.py). On CUDA the
dense parts between attention calls replay as CUDA graphs (runtime/graphs.py, DecodeGraphs
with batch rows; Engine's `graphs`), the batch padded to the next power of two. With
graphs="whole" a batch whose every row's route declares a captured step (dense attention, exact
retrieval with its keys on the device, HiP with its Triton stage kernels: runtime/whole_step.py
ROUTES) runs as ONE graph replay,
attention inside it (the rows' buffer addresses and key counts copied into the graph's buffers
first; a tiered row's rows moved down before); any other batch runs the segmented graphs.

Afterwards each session is as if session.step(token) had run on it alone: tokens, last
logits, timing counters (decode_s gets the whole batched step: the latency it saw). The
batched projections round differently from one-row ones (another GEMM blocking), so logits
equal a session's own step up to fp32 rounding, not bit for bit.

A step is atomic over the batch: every session is marked first (Session._mark) and, if the
step raises (a NonFiniteError in some row's logits, any error in a row's attention), every
session of the batch is rolled back and stays usable; the error names the failing rows.
Sessions join and leave a batch by being in the list or not: nothing is kept between steps.
The engine is the sessions' batched decode path: it uses their own checks, marks, rollback
and counters (Session's underscore members, as Session.step does), so both paths stay one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kvloft.config import GRAPH_MODES
from kvloft.runtime.attention import TieredAttention
from kvloft.runtime.batch_checks import check_pairs, check_sessions, is_int
from kvloft.runtime.batch_layer import RowAttention
from kvloft.runtime.graphs import DecodeGraphs
from kvloft.runtime.inputs import generation_stops
from kvloft.runtime.loader import Model
from kvloft.runtime.numerics import NonFiniteError
from kvloft.runtime.session import Session
from kvloft.runtime.step_plan import StepPlan, plan_step
from kvloft.runtime.whole_exact import ExactShape
from kvloft.runtime.whole_hip import HipShape
from kvloft.runtime.whole_step import WholeStep, graph_counts, not_whole, step_shape

__all__ = ["GRAPH_MODES", "MAX_BATCH_LIMIT", "Engine", "RowAttention"]

MAX_BATCH_LIMIT = 4096  # max_batch above this is refused (per-step CPU plan, [B, V] logits)


def _split_rows(logits: Tensor, order: Tensor) -> tuple[Tensor, list[Tensor]]:
    """logits [B, V] in plan order -> (the rows in pair order [B, V], a copy of each row [V]).
    On the CPU through numpy, on the caller's thread: a torch copy of B x V floats is an OpenMP
    region, and under load each waited a time slice (4-16 ms here) on a descheduled thread."""
    if logits.device.type != "cpu":
        out = torch.empty_like(logits)
        out[order.to(logits.device)] = logits
        return out, [row.clone() for row in logits]
    ln = logits.numpy()
    out = torch.from_numpy(ln[np.argsort(order.numpy())])
    return out, [torch.from_numpy(row.copy()) for row in ln]


def _rows_finite(logits: Tensor) -> Tensor:
    """logits [B, V] -> [B] bool (CPU): each row's fp64 sum is finite (numerics.finite_sum: NaN
    and inf propagate). On the CPU through numpy, as _split_rows says why."""
    if logits.device.type != "cpu":
        return torch.isfinite(logits.sum(dim=-1, dtype=torch.float64)).cpu()
    return torch.from_numpy(np.isfinite(logits.numpy().sum(axis=-1, dtype=np.float64)))


class Engine:
    """Decodes many sessions of `model` together, up to `max_batch` per step.

    graphs: "auto" replays the step's dense parts (embedding, projections, MLP, head) as CUDA
    graphs on a CUDA model, one set per padded batch size (runtime/graphs.py; attention runs
    eagerly between them, per row), and runs eagerly elsewhere; "off" runs eagerly everywhere;
    "segments" runs the graphed path's segments eagerly (how it is tested without CUDA);
    "whole" runs a batch whose every row's route can be captured (runtime/whole_step.py:
    dense attention, exact with keys_on="device", HiP with Triton stages) as one graph of the whole step, attention included, on CUDA (eagerly on
    the CPU through the Triton interpreter: how it is tested), and any other batch as "auto"
    does (as "segments" where the whole step cannot run). `route_counts` counts the steps
    each way ran ("whole", "segments", "eager"); `last_route_why` says why the last step
    was not whole (None when it was, or when graphs is not "whole"), `last_read_why` why a whole
    step's HiP row read its whole selection from the host tier (None: stable parts on the device); `whole_graphs()` counts the
    whole step's graphs (one per refresh pattern of HiP rows).
    shared_attention: rows whose decode route is one launch over a slot table share one launch
    per layer (RowAttention); False launches each row's own (the per-row path, for comparison).
    shared_search: rows whose retrievers declare a batched search (HiP) are searched together,
    one select_batch per layer for each plan search group (runtime/batch_search.py); False
    searches each row alone. Needs shared_attention (the per-row path searches per row).
    """

    def __init__(self, model: Model, max_batch: int = 32, graphs: str = "auto",
                 shared_attention: bool = True, shared_search: bool = True) -> None:
        if not isinstance(model, Model):
            raise TypeError(f"Engine needs a model from kvloft.load_model(...), got {type(model).__name__}")
        if not is_int(max_batch) or not 1 <= max_batch <= MAX_BATCH_LIMIT:
            raise ValueError(f"max_batch must be an int in [1, {MAX_BATCH_LIMIT}], got {max_batch!r}")
        if graphs not in GRAPH_MODES:
            raise ValueError(f"graphs must be one of {GRAPH_MODES}, got {graphs!r}")
        if not isinstance(shared_attention, bool):
            raise TypeError(f"shared_attention must be a bool, got {type(shared_attention).__name__}")
        if not isinstance(shared_search, bool):
            raise TypeError(f"shared_search must be a bool, got {type(shared_search).__name__}")
        self.model = model
        self.shared_attention = shared_attention
        self.shared_search = shared_search
        self.max_batch = max_batch
        self.graphs = graphs
        self._graphs: dict[int, DecodeGraphs] = {}  # padded batch size -> its step segments
        self._wholes: dict[Any, WholeStep] = {}  # padded batch size (, tiered shape) -> its captured whole step
        self.route_counts = {"whole": 0, "segments": 0, "eager": 0}
        self.last_route_why: str | None = None
        self.last_read_why: str | None = None  # a whole step's HiP rows read all in place: why (whole_stable.py)

    @property
    def _use_graphs(self) -> bool:
        return self.graphs in ("segments", "whole") or (self.graphs == "auto" and self.model.device.type == "cuda")

    @property
    def _capture(self) -> bool:
        return self.graphs in ("auto", "whole") and self.model.device.type == "cuda"

    # ---- a step --------------------------------------------------------------------------

    def plan(self, pairs: Sequence[tuple[Session, int]]) -> StepPlan:
        """The plan step(pairs) would run (checked as step checks; changes nothing)."""
        return plan_step(check_pairs(pairs, self.model, self.max_batch))

    def step(self, pairs: Sequence[tuple[Session, int]]) -> Tensor:
        """Append token t_b to session s_b for each pair, all in one forward pass.

        Returns logits [B, V] fp32 of each session's next token, row b for pair b (each row is
        also the session's last_logits). Refused before anything changes: an empty list, more
        than max_batch pairs, a session twice, an unfed session, a session of another model.
        If the step raises, every session of the batch is rolled back (the error names the row)."""
        checked = check_pairs(pairs, self.model, self.max_batch)
        sessions = [s for s, _ in checked]
        marks = [s._mark() for s in sessions]
        try:
            return self._step(plan_step(checked), sessions)
        except (Exception, KeyboardInterrupt) as e:
            self._rollback(sessions, marks, e)
            raise

    def _step(self, plan: StepPlan, sessions: list[Session]) -> Tensor:
        t0 = time.perf_counter()
        rows = [sessions[i] for i in plan.order.tolist()]  # the plan's CPU tensors, read as ints once
        logits = self._forward(plan, rows)  # [B, V] in plan order
        self._check_finite(plan, rows, logits)
        dt = time.perf_counter() - t0
        out, each = _split_rows(logits, plan.order)
        for b, (s, token) in enumerate(zip(rows, plan.tokens.tolist(), strict=True)):
            s._last_logits = each[b]
            s._times["decode_s"] += dt
            s._times["decode_tokens"] += 1
            s.tokens.append(token)
        return out

    def _forward(self, plan: StepPlan, rows: list[Session]) -> Tensor:
        """The model over plan.tokens [B] at plan.positions [B], each row attending through its
        session's backend -> logits [B, V] fp32 (row b = plan row b)."""
        backends = [s.backend for s in rows]
        for be, evicts in zip(backends, plan.evicts.tolist(), strict=True):
            if isinstance(be, TieredAttention):
                be.decoding = True  # as Session._decode_one: the decode route of each layer
                if be.plans_room():  # the rows the step moves down go now, before any layer runs
                    moved = be.make_room()
                    assert all(m == evicts for m in moved), (moved, evicts)
        dev, n = self.model.device, plan.batch
        if self.graphs == "whole":
            self.last_route_why = not_whole(backends, dev)
            if self.last_route_why is None:
                self.route_counts["whole"] += 1
                whole = self._whole_for(n, step_shape(backends))
                logits = whole.step(plan.tokens, plan.positions, backends)
                self.last_read_why = whole.read_why
                return logits
        groups = plan.search_groups if self.shared_search else []
        attention = RowAttention(backends, plan.order, self.shared_attention, groups)
        if not self._use_graphs:
            self.route_counts["eager"] += 1
            return self.model.net(plan.tokens.to(dev), plan.positions.to(dev), attention)
        self.route_counts["segments"] += 1
        graphs = self._graphs_for(n)
        ids = torch.zeros(graphs.batch, dtype=torch.long)  # rows past B: padding, token 0 at 0
        pos = torch.zeros(graphs.batch, dtype=torch.long)
        ids[:n], pos[:n] = plan.tokens, plan.positions
        return graphs.step(ids.to(dev), pos.to(dev), attention)[:n]

    def _bucket(self, n: int) -> int:
        """n rows padded to the next power of two (at most max_batch), so that at most
        log2(max_batch) + 1 graphs (or sets of segments) are ever captured."""
        return min(1 << (n - 1).bit_length(), self.max_batch)

    def _graphs_for(self, n: int) -> DecodeGraphs:
        """The step's segments for n rows, padded to their bucket."""
        bucket = self._bucket(n)
        graphs = self._graphs.get(bucket)
        if graphs is None:
            graphs = self._graphs[bucket] = DecodeGraphs(self.model.net, capture=self._capture, batch=bucket)
        return graphs

    def _whole_for(self, n: int, shape: ExactShape | HipShape | None = None) -> WholeStep:
        """The captured whole step for n rows, padded to their bucket: one per bucket for dense
        rows, one per (bucket, shape) where a row is tiered (whole_step.py step_shape)."""
        bucket = self._bucket(n)
        key = bucket if shape is None else (bucket, shape)
        whole = self._wholes.get(key)
        if whole is None:
            whole = self._wholes[key] = WholeStep(self.model.net, capture=self._capture, batch=bucket, shape=shape)
            for other in self._wholes.values():  # HiP rows' stable (and rank="z") buffers: one set per bucket
                if other is not whole:
                    whole.share_buffers(other)
        return whole

    def whole_graphs(self) -> dict[str, int]:
        """The whole steps' graphs (graphs="whole"), summed over batch buckets and shapes: one per
        refresh pattern of HiP rows (runtime/whole_graphs.py); whole_step.py graph_counts."""
        return graph_counts(self._wholes.values())

    def _check_finite(self, plan: StepPlan, rows: list[Session], logits: Tensor) -> None:
        """NonFiniteError naming every row whose logits hold NaN/inf (one host sync)."""
        ok = _rows_finite(logits)  # [B]
        if bool(ok.all()):
            return
        bad = [b for b in range(len(rows)) if not ok[b]]
        first = rows[bad[0]]
        msg = first._nonfinite_message(f"decode step of token {int(plan.positions[bad[0]])}")
        which = ", ".join(f"pair {int(plan.order[b])} (position {int(plan.positions[b])})" for b in bad)
        raise NonFiniteError(f"batched decode step: {which} failed: {msg}; every session of the batch "
                             "was rolled back")

    @staticmethod
    def _rollback(sessions: list[Session], marks: list[dict[str, Any]], error: BaseException) -> None:
        for b, (s, m) in enumerate(zip(sessions, marks, strict=True)):
            try:
                s._rollback(m)
            except Exception as e2:  # noqa: BLE001 -- the original error stays the one raised
                error.add_note(f"session {b} could not be rolled back ({type(e2).__name__}: {e2}); "
                               "call its reset()")

    # ---- greedy generation ---------------------------------------------------------------

    def generate(self, sessions: Sequence[Session], max_new_tokens: int = 32,
                 stop_at_eos: bool = True) -> list[list[int]]:
        """Greedy decoding of every session together: per session, the tokens appended (an EOS
        ends a session's list, unappended, as Session.generate does; the others go on). The
        call is atomic: if any step raises, every session is back where the call found it."""
        if isinstance(sessions, Session) or not isinstance(sessions, Sequence):
            raise TypeError(f"generate takes a list of sessions, got {type(sessions).__name__}")
        generation_stops(max_new_tokens, 0.0, 1.0, None, None)
        if not isinstance(stop_at_eos, bool):
            raise TypeError(f"stop_at_eos must be a bool, got {type(stop_at_eos).__name__}")
        sessions = list(sessions)
        check_sessions(sessions, "generate", self.model, self.max_batch)
        marks = [s._mark() for s in sessions]
        try:
            return self._generate(sessions, max_new_tokens, stop_at_eos)
        except (Exception, KeyboardInterrupt) as e:
            self._rollback(sessions, marks, e)
            raise

    def _generate(self, sessions: list[Session], max_new_tokens: int, stop_at_eos: bool) -> list[list[int]]:
        tok = self.model.tokenizer
        eos = set(tok.eos_ids if tok else self.model.config.eos_token_ids) if stop_at_eos else set()
        out: list[list[int]] = [[] for _ in sessions]
        live = list(range(len(sessions)))
        nxt = self._greedy(sessions)
        for _ in range(max_new_tokens):
            live = [i for i in live if nxt[i] not in eos]
            if not live:
                break
            logits = self.step([(sessions[i], nxt[i]) for i in live])  # [len(live), V]
            for i, row in zip(live, logits.argmax(dim=-1).tolist(), strict=True):
                out[i].append(nxt[i])
                nxt[i] = row
        return out

    def _greedy(self, sessions: list[Session]) -> list[int]:
        """argmax of each session's last logits (checked finite, as Session's sampling does)."""
        logits = torch.stack([s.last_logits for s in sessions]).float()  # [B, V]
        ok = torch.isfinite(logits).all(dim=-1).cpu()
        if not bool(ok.all()):
            b = int((~ok).nonzero()[0])
            raise NonFiniteError(sessions[b]._nonfinite_message(f"decode step of token {len(sessions[b]) - 1}"))
        return logits.argmax(dim=-1).tolist()

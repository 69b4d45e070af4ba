"""Pipelined sessions: a model's layers split over stage processes (Ray actors), one hop per stage.

    import ray, kvloft
    from kvloft.cluster import PipelineConfig, PipelinedSession

    ray.init(address="auto")                                  # or let PipelineConfig(address=...) join
    s = PipelinedSession(model, kvloft.RetrievalConfig(method="exact", budget=2048),
                         pipeline=PipelineConfig(directory="/shared/kv/doc-42", n_stages=3))
    s.feed(long_text); print(s.generate(64)); s.close()

Stage i (kvloft/cluster/stage.py) runs layers [start_i, stop_i) with their weights and, per
session, their tiered KV (static tier, host tier, retriever: the runtime's TieredAttention)
and record files. The driver embeds the tokens and sends the hidden state x [T, hidden]
down the pipeline: one actor call per stage, each taking the previous stage's result by
reference, so Ray moves x from stage to stage without the driver; the last stage returns
the logits of the last token. A decode step costs n_stages hops, whatever the number of
layers. Prefill chunks follow each other down the pipeline (chunk c in stage 2 while chunk
c + 1 is in stage 1), and so do the steps of several sessions driven from several threads.

Failures: a call chain that fails because a stage died (actor killed, node lost) or lost the
session's state is recovered: dead stages are replaced (same placement-group bundle; after
a node loss Ray re-places the bundle on a live node with room, and the session waits up to
PipelineConfig.timeout_s for one), every stage is put back at the last token the driver
confirmed (a stage ahead, or a new one, rebuilds from its record files cut there), and the
chain is sent again. The continuation is identical to an undisturbed run. After
`max_recoveries` attempts: StageUnavailable.

Not supported here: position_mode="extrapolate", scheduler="overlap", Session.save (the
KV persists in the stage directories).
"""

from __future__ import annotations

import shutil
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kvloft.cluster.config import PipelineConfig
from kvloft.cluster.group import StageGroup, StageUnavailable, import_ray
from kvloft.cluster.stage import StoreNotOpen
from kvloft.cluster.store import StageSpec, check_writable
from kvloft.config import CacheConfig, RetrievalConfig, RuntimeConfig
from kvloft.runtime.attention import Timers
from kvloft.runtime.numerics import FiniteWatch
from kvloft.runtime.session import Session

# Ray returns a result up to 100 KiB inline with the reply (max_direct_call_object_size);
# larger ones go through the object store (a put, and a pull across nodes). Logits come back
# in pieces under this size: 2 for SmolLM2's 49152 fp32 logits.
INLINE_BYTES = 96 * 1024


@dataclass(frozen=True)
class Call:
    """One trip down the pipeline: x [T, hidden] of the tokens at positions [T] (CPU)."""

    x: Tensor
    positions: Tensor
    decoding: bool
    feed_after: int
    budget: int

    @property
    def first(self) -> int:
        return int(self.positions[0])

    def rollback(self, mark) -> None:
        """Refused before anything changes: the shards keep the rows a failed call sent them."""
        raise RuntimeError("a sharded session cannot roll back a failed call (its shards keep the rows)")


class StageCalls:
    """A session's state on a StageGroup: call chains down the stages, with recovery."""

    def __init__(self, group: StageGroup, cfg: PipelineConfig, specs: list[StageSpec]) -> None:
        self.group, self.cfg, self.specs = group, cfg, specs
        self.keys = [s.directory for s in specs]
        self.recoveries = 0
        self.recovery_s = 0.0
        self.last_recovery: dict[str, Any] = {}
        vocab_bytes = specs[-1].model.vocab_size * 4  # fp32 logits
        self.pieces = max(1, -(-vocab_bytes // INLINE_BYTES))
        self.open(0)

    def open(self, upto: int) -> None:
        """Every stage holds the session at exactly `upto` tokens (replayed from files if not)."""
        ray = import_ray()
        refs = [self.group.actor(i).open.remote(spec, upto) for i, spec in enumerate(self.specs)]
        ray.get(refs, timeout=self.cfg.timeout_s)

    def _chain(self, call: Call) -> list:
        """Submit one call to every stage, each taking the previous one's result by reference;
        the refs of the last stage's logits, in pieces (INLINE_BYTES)."""
        x, last = call.x, len(self.keys) - 1
        for i, key in enumerate(self.keys[:-1]):
            x = self.group.actor(i).forward.remote(key, x, call.positions, call.decoding, call.feed_after,
                                                   call.budget)
        refs = self.group.actor(last).forward_pieces.options(num_returns=self.pieces).remote(
            self.keys[last], x, call.positions, call.decoding, call.feed_after, call.budget, self.pieces)
        return refs if self.pieces > 1 else [refs]

    def run(self, calls: list[Call], on_done=None) -> Tensor:
        """Send the calls down the pipeline, up to n_stages + 1 in flight, and collect them in
        order; on_done(i) after call i came out. Returns the logits [V] of the last call."""
        ray = import_ray()
        window = self.cfg.n_stages + 1
        pending: deque = deque()
        nxt, attempts, out = 0, 0, None
        while nxt < len(calls) or pending:
            while nxt < len(calls) and len(pending) < window:
                pending.append((nxt, self._chain(calls[nxt])))
                nxt += 1
            i, refs = pending[0]
            try:
                out = torch.cat(ray.get(refs))
            except (*_lost(), StoreNotOpen):
                if attempts == self.cfg.max_recoveries:
                    raise StageUnavailable(
                        f"the pipeline still fails after {attempts} recoveries; check the Ray cluster (ray status) "
                        f"and the stage directories under {self.cfg.directory}") from None
                attempts += 1
                self._recover(calls[i].first)
                pending.clear()
                nxt = i
                continue
            pending.popleft()
            if on_done is not None:
                on_done(i)
        return out

    def _recover(self, upto: int) -> None:
        """Replace dead stages, then put every stage at `upto` tokens (module docstring)."""
        ray = import_ray()
        t0 = time.perf_counter()
        alive = self.group.alive(self.cfg.timeout_s)
        t1 = time.perf_counter()
        for i, ok in enumerate(alive):
            if not ok:
                self.group.replace(i, self.group.actor(i))
                self.group.wait_placed(i, self.cfg.timeout_s)
        t2 = time.perf_counter()
        try:
            self.open(upto)
        except (*_lost(), ray.exceptions.GetTimeoutError):
            pass  # the resent chain fails again and the next attempt replaces the stage
        t3 = time.perf_counter()
        self.group.refill_spares()
        self.recoveries += 1
        self.recovery_s += t3 - t0
        self.last_recovery = {"ping_s": t1 - t0, "replace_s": t2 - t1, "reopen_s": t3 - t2,
                              "replaced": [i for i, ok in enumerate(alive) if not ok]}

    def build(self, n_tokens: int) -> None:
        """Index every stage's host tier after a feed that ended at n_tokens tokens,
        recovering as run() does."""
        ray = import_ray()
        for attempt in range(self.cfg.max_recoveries + 1):
            try:
                ray.get([self.group.actor(i).build.remote(k) for i, k in enumerate(self.keys)])
                return
            except (*_lost(), StoreNotOpen):
                if attempt == self.cfg.max_recoveries:
                    raise StageUnavailable(f"the pipeline still fails after {attempt} recoveries") from None
                self._recover(n_tokens)

    def stats(self) -> list[dict[str, Any]]:
        ray = import_ray()
        return ray.get([self.group.actor(i).stats.remote(k) for i, k in enumerate(self.keys)],
                       timeout=self.cfg.timeout_s)

    def close(self, delete: bool) -> None:
        """Drop the session from the stages (and its files with `delete`); dead stages are skipped."""
        ray = import_ray()
        refs = [self.group.actor(i).close.remote(k, delete) for i, k in enumerate(self.keys)]
        for ref in refs:
            try:
                ray.get(ref, timeout=self.cfg.timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass
        if delete:
            for k in self.keys:
                shutil.rmtree(k, ignore_errors=True)


def _lost() -> tuple[type[Exception], ...]:
    """Errors that mean a stage's process is gone: its actor died (killed, node lost), or a
    result it held went with its node. Resending from the last confirmed token is safe."""
    ex = import_ray().exceptions
    return ex.RayActorError, ex.ObjectLostError


class PipelineBackend:
    """Stands where a Session keeps its attention backend: the stages' state, for reports."""

    def __init__(self, calls: StageCalls) -> None:
        self.calls = calls
        self.timers = Timers()
        self.finite = FiniteWatch()  # the session folds each chunk's logits into it

    def mark(self) -> None:
        return None  # nothing to return to: see rollback

    def rollback(self, mark: None) -> None:
        """Refused: the stages keep the rows a failed call sent them (the session names reset())."""
        raise RuntimeError("a pipelined session cannot roll back a failed call (its stages keep the rows)")

    def bytes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.calls.stats():
            for key, val in s["bytes"].items():
                out[key] = out.get(key, 0) + val
        return out


class PipelinedSession(Session):
    """A Session whose layers run in a pipeline of stage processes (module docstring).

    pipeline: the PipelineConfig. group: a StageGroup of this model to open the session on
    (shared with other sessions, kept open by close()); None makes one from `pipeline` and
    closes it with the session. Use as a context manager, or call close().
    """

    def __init__(self, model, retrieval: RetrievalConfig | None = None, runtime: RuntimeConfig | None = None,
                 cache: CacheConfig | None = None, *, pipeline: PipelineConfig,
                 group: StageGroup | None = None) -> None:
        if not isinstance(pipeline, PipelineConfig):
            raise TypeError(f"pipeline must be a kvloft.cluster.PipelineConfig, got {type(pipeline).__name__}")
        _check_supported(retrieval or RetrievalConfig(), runtime or RuntimeConfig())
        if group is not None and (group.n_stages != pipeline.n_stages or group.model_config != model.config):
            raise ValueError(f"the group runs {group.n_stages} stages of model {group.model_config.name}, the session "
                             f"asks {pipeline.n_stages} of {model.config.name}; pass a matching group or none")
        planned = group.cfg.max_tokens if group is not None else 0
        if planned and pipeline.max_tokens > planned:
            raise ValueError(f"the group's layers are split for max_tokens={planned}, the session asks "
                             f"{pipeline.max_tokens}; lower it or make a group for more")
        _prepare_directory(pipeline)
        self.pipe_cfg = pipeline
        self.max_tokens = pipeline.max_tokens or planned  # 0 = no limit
        self.group = group if group is not None else StageGroup(model, pipeline)
        self._own_group = group is None
        try:
            super().__init__(model, retrieval, runtime, cache)
        except BaseException:
            self.close()
            raise

    def reset(self) -> None:
        """Forget the context: the stages drop the session's state and files, and open it anew."""
        old = getattr(self, "backend", None)
        if isinstance(old, PipelineBackend):
            old.calls.close(delete=True)
        dtype = str(self.model.dtype).removeprefix("torch.")
        specs = [StageSpec(directory=str(Path(self.pipe_cfg.directory) / f"stage-{i:02d}"), layers=layers,
                           model=self.model.config, retrieval=self.retrieval, runtime=self.runtime,
                           cache=self.cache_cfg, dtype=dtype, fsync=self.pipe_cfg.fsync)
                 for i, layers in enumerate(self.group.layers)]
        self.backend = PipelineBackend(StageCalls(self.group, self.pipe_cfg, specs))
        self.tokens: list[int] = []
        self._last_logits = None
        self._times = {"prefill_s": 0.0, "prefill_tokens": 0, "decode_s": 0.0, "decode_tokens": 0}

    def _check_capacity(self, n_new: int) -> None:
        super()._check_capacity(n_new)
        cap = self.max_tokens
        if cap and len(self.tokens) + n_new > cap:
            raise ValueError(f"context would hold {len(self.tokens) + n_new} tokens, over the pipeline's max_tokens="
                             f"{cap} (its layers are split for that many); feed less, or make a group with a "
                             "larger max_tokens (and stage_memory for it)")

    def _embed(self, ids: list[int]) -> Tensor:
        """Token ids -> x [T, hidden] on the CPU (the driver keeps the embedding)."""
        with torch.inference_mode():
            x = self.model.net.embed_tokens(torch.tensor(ids, dtype=torch.long, device=self.model.device))
        return x.to("cpu").clone()

    def _call(self, ids: list[int], start: int, decoding: bool, feed_after: int) -> Call:
        return Call(self._embed(ids), torch.arange(start, start + len(ids)), decoding, feed_after,
                    self.retrieval.budget)

    def _prefill(self, ids: list[int], on_progress=None) -> None:
        chunk, start = self.runtime.resolved_prefill_chunk(self.model.device), len(self.tokens)
        parts = [ids[i : i + chunk] for i in range(0, len(ids), chunk)]
        calls = [self._call(p, start + i * chunk, False, len(ids) - i * chunk - len(p)) for i, p in enumerate(parts)]

        def done(i: int) -> None:
            self.tokens.extend(parts[i])
            if on_progress is not None:
                on_progress(len(self.tokens) - start, len(ids))

        self._last_logits = self.backend.calls.run(calls, on_done=done)
        self.backend.calls.build(len(self.tokens))

    def _forward(self, ids: list[int], start: int, last_only: bool) -> None:
        """One decode token (Session.step) down the pipeline."""
        self._last_logits = self.backend.calls.run([self._call(ids, start, True, 0)])

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        calls = self.backend.calls
        stages = calls.stats()
        out["tier_tokens"] = stages[0].get("tier_tokens")
        out["cluster"] = {"n_stages": self.group.n_stages, "layers": [list(r) for r in self.group.layers],
                          "recoveries": calls.recoveries, "recovery_s": round(calls.recovery_s, 3),
                          "last_recovery": calls.last_recovery,
                          "stages": stages}
        return out

    def save(self, path) -> None:
        raise ValueError("a pipelined session keeps its KV in its stage directories and cannot be saved with "
                         "Session.save; save a single-process Session instead")

    def close(self, delete_files: bool = False) -> None:
        """Drop the session from the stages (files kept unless delete_files); a group this
        session made is closed too."""
        backend = getattr(self, "backend", None)
        if isinstance(backend, PipelineBackend):
            backend.calls.close(delete_files)
            self.backend = None
        if getattr(self, "_own_group", False) and getattr(self, "group", None) is not None:
            self.group.close()
            self.group = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_supported(r: RetrievalConfig, rt: RuntimeConfig) -> None:
    if not isinstance(r, RetrievalConfig) or not isinstance(rt, RuntimeConfig):
        return  # Session's own checks name the type error
    if r.position_mode != "exact":
        raise ValueError("pipelined sessions run position_mode='exact' only; use a plain Session to extrapolate")
    if rt.scheduler != "none":
        raise ValueError("pipelined sessions run without the overlap scheduler (RuntimeConfig.scheduler='none')")


def _prepare_directory(cfg: PipelineConfig) -> None:
    """The directory exists and is writable; an earlier session's stages are removed only with overwrite."""
    root = Path(cfg.directory)
    check_writable(root)
    left = sorted(root.glob("stage-*"))
    if left and not cfg.overwrite:
        raise ValueError(f"{root} holds {len(left)} stage directories of an earlier session; pass "
                         "PipelineConfig(overwrite=True) to delete them, or name another directory")
    for path in left:
        shutil.rmtree(path, ignore_errors=True)

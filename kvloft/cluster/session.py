"""Sharded sessions: the host tier split by token ranges over shard processes (Ray actors).

    import ray, kvloft
    from kvloft.cluster import ShardConfig, ShardedSession

    ray.init(address="auto")                                  # or let ShardConfig(address=...) join
    s = ShardedSession(model, kvloft.RetrievalConfig(method="exact", budget=2048),
                       shards=ShardConfig(directory="/shared/kv/doc-42", n_shards=3, shard_tokens=1 << 18))
    s.feed(long_text); print(s.generate(64)); s.close()

The driver keeps the model, the static tier (sink + window) and the merge. Tokens that
leave the window go to the shard owning their host row (ShardConfig: fixed ranges of
`shard_tokens` rows, a new shard when one is full, up to `n_shards`). Per layer:

  decode   one batch of `.remote()` calls, one per open range (never per head), each
           carrying q [H_q, D] and, for the owner, the token that just left the window;
           each shard appends, retrieves its own top-`budget` and returns a partial
           (out, lse) computed next to its rows. While they run the driver attends to the
           static tier; then  o = merge(static, shard_0, ..., shard_n)  (exact lse merge).
           With global_topk a first batch returns each shard's scored top-`budget`, the
           driver keeps the global top `budget` per KV head, a second batch attends.
  prefill  one batch per layer and chunk: each shard holding rows attends densely with the
           chunk's queries [T, H_q, D] over them, then appends the chunk's evicted rows;
           the driver merges static, shard and causal self-attention partials.
A covering budget (>= rows per shard, or >= the host tier with global_topk) gives dense
attention, as a single-process session does.

Failures: a call that raises RayActorError (actor killed, node lost) gets its shard
replaced (same placement-group bundle; after a node loss Ray re-places the bundle on a live
node with room, and the session waits up to ShardConfig.timeout_s for one), the store
reopened from its files (verified, index replayed) and the call resent; appends are idempotent by row, so a continuation is
identical to an undisturbed run. After `max_recoveries` attempts: ShardUnavailable.

Not supported here: position_mode="extrapolate", scheduler="overlap", method="dense"
(nothing to shard), Session.save (the host tier persists in the shard directory).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kvloft.cluster.config import ShardConfig
from kvloft.cluster.group import ShardGroup, ShardUnavailable, import_ray
from kvloft.cluster.shard import Block, StoreNotOpen, StoreSpec, _check_writable
from kvloft.config import CacheConfig, ModelConfig, RetrievalConfig, RuntimeConfig
from kvloft.index.base import METHOD_MODULES
from kvloft.kernels import KernelSet
from kvloft.runtime.attention import TieredAttention
from kvloft.runtime.kvcache import Evicted, LayerTiers, TieredKVCache
from kvloft.runtime.session import Session

# ---- driver-side tiers: the static tier only, host rows counted -----------------------------


class DriverTiers(LayerTiers):
    """A layer's static tier on the driver; evicted rows leave for the shards, only counted."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._n_host = 0

    @property
    def n_host(self) -> int:
        return self._n_host

    def _to_host(self, ev: Evicted) -> None:
        self._n_host += ev.positions.shape[0]

    def host_keys_head_major(self) -> Tensor:
        raise ValueError("a sharded session's host keys live in its shards; index them there")

    def rollback(self, mark) -> None:
        """Refused before anything changes: the shards keep the rows a failed call sent them."""
        raise RuntimeError("a sharded session cannot roll back a failed call (its shards keep the rows)")


class DriverKVCache(TieredKVCache):
    """TieredKVCache whose layers keep no host rows (DriverTiers)."""

    def __init__(self, cfg: ModelConfig, *, n_sink: int, n_window: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        super().__init__(cfg, n_sink=n_sink, n_window=n_window, host_chunk=1, device=device, dtype=dtype)
        self.layers = [DriverTiers(cfg, n_sink, n_window, 1, device, dtype, False) for _ in range(cfg.n_layers)]


# ---- calls to the shards, with recovery ------------------------------------------------------


class ShardCalls:
    """A session's token ranges on a ShardGroup: routing, batched calls, recovery.

    A call is (method name, args); the store key (its directory) is prepended. Batches go out
    together (`submit`) and are collected together (`wait`); a shard that died is replaced,
    its store reopened from its files, and only its call resent.
    """

    def __init__(self, group: ShardGroup, cfg: ShardConfig, model: ModelConfig, retrieval: RetrievalConfig,
                 dtype: torch.dtype) -> None:
        self.group, self.cfg = group, cfg
        self.model, self.retrieval = model, retrieval
        self.dtype = str(dtype).removeprefix("torch.")
        self.specs: dict[int, StoreSpec] = {}  # open ranges
        self.recoveries = 0
        self.recovery_s = 0.0

    # ---- ranges --------------------------------------------------------------------------

    def range_dir(self, i: int) -> str:
        return str(Path(self.cfg.directory) / f"range-{i:03d}")

    def ranges_with_rows(self, n_host: int) -> list[int]:
        """Ranges holding at least one of the first n_host host rows."""
        return list(range(-(-n_host // self.cfg.shard_tokens)))

    def route(self, ev: Evicted | None) -> dict[int, Block]:
        """Split evicted rows by owning range: {range: (k, v, positions, first row)} on the CPU."""
        if ev is None:
            return {}
        n, t = ev.positions.shape[0], self.cfg.shard_tokens
        out, row = {}, ev.first_row
        while row < ev.first_row + n:
            i = row // t
            end = min(ev.first_row + n, (i + 1) * t)
            s = slice(row - ev.first_row, end - ev.first_row)
            out[i] = (ev.k[s].to("cpu"), ev.v[s].to("cpu"), ev.positions[s].to("cpu"), row)
            row = end
        assert max(out) < self.cfg.n_shards, "capacity is checked by ShardedSession before any change"
        return out

    def open_ranges(self, ranges: list[int], indexed: tuple[int, ...]) -> None:
        for i in ranges:
            self.specs[i] = StoreSpec(directory=self.range_dir(i), first_row=i * self.cfg.shard_tokens,
                                      capacity=self.cfg.shard_tokens, model=self.model, retrieval=self.retrieval,
                                      dtype=self.dtype, indexed=indexed, fsync=self.cfg.fsync)
        self.run({i: ("open", ()) for i in ranges})

    # ---- calls ---------------------------------------------------------------------------

    def _remote(self, i: int, name: str, args: tuple):
        actor = self.group.actor(i)
        if name == "open":
            return actor, actor.open.remote(self.specs[i])
        return actor, getattr(actor, name).remote(self.specs[i].directory, *args)

    def submit(self, calls: dict[int, tuple[str, tuple]]) -> tuple[dict, dict, dict]:
        """Send one call per range (all at once); collect them with wait()."""
        sent = {i: self._remote(i, name, args) for i, (name, args) in calls.items()}
        return calls, {i: a for i, (a, _) in sent.items()}, {i: r for i, (_, r) in sent.items()}

    def wait(self, pending: tuple[dict, dict, dict]) -> dict[int, Any]:
        """Results by range (sorted), recovering shards that died or lost their store."""
        ray = import_ray()
        calls, actors, refs = pending
        done: dict[int, Any] = {}
        for attempt in range(self.cfg.max_recoveries + 1):
            try:
                done.update(zip(refs, ray.get(list(refs.values()))))
                return dict(sorted(done.items()))
            except (*_lost(), StoreNotOpen):
                pass
            failed = self._collect(refs, done)
            if attempt == self.cfg.max_recoveries:
                break
            t0 = time.perf_counter()
            for i, dead in failed.items():
                self._recover(i, actors[i] if dead else None)
            self.recoveries += len(failed)
            self.recovery_s += time.perf_counter() - t0
            calls = {i: calls[i] for i in failed}
            _, actors, refs = self.submit(calls)
        raise ShardUnavailable(f"shard(s) {sorted(refs)} still failing after {self.cfg.max_recoveries} "
                               "re-creation(s); check the Ray cluster (ray status) and the shard directory")

    def _collect(self, refs: dict, done: dict[int, Any]) -> dict[int, bool]:
        """Results of the calls that succeeded into `done`; failed ranges -> whether the actor died.
        Errors other than a dead actor or a lost store propagate (ValueErrors unchanged)."""
        ray = import_ray()
        failed = {}
        for i, ref in refs.items():
            try:
                done[i] = ray.get(ref)
            except _lost():
                failed[i] = True
            except StoreNotOpen:
                failed[i] = False
        return failed

    def _recover(self, i: int, dead) -> None:
        """Replace a dead actor (unless someone did) and reopen the store from its files. The
        new actor starts once its bundle has a node: at once after a killed process, after
        Ray re-places the bundle when its node was lost (ShardUnavailable if none has room)."""
        ray = import_ray()
        actor = self.group.replace(i, dead) if dead is not None else self.group.actor(i)
        self.group.wait_placed(i, self.cfg.timeout_s)
        try:
            ray.get(actor.open.remote(self.specs[i]), timeout=self.cfg.timeout_s)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass  # the resent call fails again and the next attempt replaces it

    def run(self, calls: dict[int, tuple[str, tuple]]) -> dict[int, Any]:
        return self.wait(self.submit(calls))

    def close(self, delete: bool) -> None:
        """Drop the stores from the shards (and their files with `delete`); dead shards are skipped."""
        ray = import_ray()
        refs = [self.group.actor(i).close.remote(spec.directory, delete) for i, spec in self.specs.items()]
        for ref in refs:
            try:
                ray.get(ref, timeout=self.cfg.timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass
        if delete:
            for spec in self.specs.values():
                shutil.rmtree(spec.directory, ignore_errors=True)
        self.specs.clear()


def _lost() -> tuple[type[Exception], ...]:
    """Errors that mean a shard's process is gone: its actor died (killed, node lost), or a
    reply it had stored on its node went with the node. Resending is safe (idempotent)."""
    ex = import_ray().exceptions
    return ex.RayActorError, ex.ObjectLostError


def split_global_topk(scores: list[Tensor], ids: list[Tensor], budget: int) -> list[Tensor]:
    """The global top `budget` per KV head over every shard's candidates, as each shard's share.

    scores[j], ids[j]: shard j's candidates, [H_kv, k_j] fp32 (-inf = pad) and int64 local rows.
    Returns per shard ids [H_kv, m_j] int64 (-1 = pad; m_j = 0 when it has none kept).
    """
    all_scores = torch.cat(scores, dim=1)  # [H_kv, K]
    owner = torch.cat([torch.full(s.shape, j, dtype=torch.int64) for j, s in enumerate(scores)], dim=1)
    local = torch.cat(ids, dim=1)
    top = torch.topk(all_scores, min(budget, all_scores.shape[1]), dim=1).indices  # [H_kv, k]
    own = owner.gather(1, top)
    loc = torch.where(all_scores.gather(1, top) == float("-inf"), -1, local.gather(1, top))
    shares = []
    for j in range(len(scores)):
        mine = own == j  # [H_kv, k]
        m = int(mine.sum(1).max()) if mine.numel() else 0
        order = (~mine).to(torch.int8).argsort(dim=1, stable=True)[:, :m]  # this shard's entries first
        shares.append(torch.where(mine.gather(1, order), loc.gather(1, order), -1))
    return shares


# ---- the attention backend -------------------------------------------------------------------


class ShardIndexes:
    """Stands where TieredAttention keeps its retriever: the shards' indexes, for reports."""

    def __init__(self, calls: ShardCalls, needs_queries: bool) -> None:
        self.calls = calls
        self.needs_queries = needs_queries

    def stats(self) -> dict[str, Any]:
        """Retriever counters summed over shards, and each shard's store stats."""
        stores = list(self.calls.run({i: ("stats", ()) for i in self.calls.specs}).values())
        total: dict[str, Any] = {}
        for s in stores:
            for key, val in s["retriever"].items():
                if isinstance(val, (int, float)) and not isinstance(val, bool):
                    total[key] = total.get(key, 0) + val
        return {**total, "shards": stores}


def method_needs_queries(method: str) -> bool:
    """Whether a retriever class builds from prefill queries (its `needs_queries`, default True)."""
    import importlib

    from kvloft.index import base

    if method not in base._REGISTRY and method in METHOD_MODULES:
        importlib.import_module(f"kvloft.index.{METHOD_MODULES[method]}")
    return bool(getattr(base._REGISTRY.get(method), "needs_queries", True))


class ShardedAttention(TieredAttention):
    """TieredAttention whose host tier and indexes live in shard processes (module docstring)."""

    def __init__(self, cfg: ModelConfig, rcfg: RetrievalConfig, cache: DriverKVCache, calls: ShardCalls,
                 ops: KernelSet, device: torch.device, profile: bool = False) -> None:
        indexes = ShardIndexes(calls, method_needs_queries(rcfg.method))
        super().__init__(cfg, rcfg, cache, indexes, ops, device, profile)
        self.calls = calls

    def bytes(self) -> dict[str, int]:
        stores = self.retriever.stats()["shards"] if self.calls.specs else []
        return {"static": self.cache.bytes()["static"], "host": sum(s["host_bytes"] for s in stores)}

    def build_indexes(self) -> None:
        """Index every open range's rows of each layer not yet built (prefill query samples
        sent once through the object store)."""
        todo = [layer for layer in range(self.cfg.n_layers) if not self.built[layer]]
        if not todo:
            return
        with self.timers("index_build"):
            if self.calls.specs:
                queries = {layer: self.sampler.sample(layer) for layer in todo}
                ref = import_ray().put(queries)
                self.calls.run({i: ("build", (ref,)) for i in self.calls.specs})
        for layer in todo:
            self.built[layer] = True
        self.sampler.clear()

    def _blocks(self, ev: Evicted | None) -> dict[int, Block]:
        """Evicted rows by range; ranges seen for the first time are opened first."""
        blocks = self.calls.route(ev)
        new = [i for i in blocks if i not in self.calls.specs]
        if new:
            built = tuple(layer for layer in range(self.cfg.n_layers) if self.built[layer])
            with self.timers("shard_open"):
                self.calls.open_ranges(new, built)
        return blocks

    def _merge(self, parts: list[tuple[Tensor, Tensor]]) -> Tensor:
        outs = [o.to(self.device) for o, _ in parts]
        return self.ops.merge(outs, [lse.to(self.device) for _, lse in parts])[0]

    def _prefill(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """Dense: static tier here, each shard's rows there, the chunk causally to itself."""
        tiers: LayerTiers = self.cache[layer]
        held = self.calls.ranges_with_rows(tiers.n_host)  # before this chunk's rows arrive
        with self.timers("prefill_attention"):
            sk, sv, _ = tiers.static_kv()
            parts = [self.ops.attend(q, sk, sv, scale=self.scale)] if sk.shape[0] else []
            blocks = self._blocks(tiers.append(k, v, positions))  # after the static part read the tier
            qc = q.to("cpu")
            if len(held) > 1:
                qc = import_ray().put(qc)
            calls = {i: ("prefill", (layer, qc if i in held else None, blocks.get(i)))
                     for i in sorted(set(held) | set(blocks))}
            pending = self.calls.submit(calls)
            own = self.ops.attend(q, k, v, scale=self.scale, causal=True)
            with self.timers("shard_wait"):
                got = self.calls.wait(pending)
            parts += [got[i] for i in held] + [own]
            out = self._merge(parts)
        self.sampler.observe(layer, q, positions)
        return out

    def _decode(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        tiers: LayerTiers = self.cache[layer]
        blocks = self._blocks(tiers.append(k, v, positions))
        q1 = q[0]  # [H_q, D]
        budget = self.rcfg.budget
        if tiers.n_host == 0 or budget == 0:  # nothing to retrieve; evicted rows still go out
            pending = self.calls.submit({i: ("append", (layer, b)) for i, b in blocks.items()})
            o_s, _ = self._static(tiers, q1)
            self.calls.wait(pending)
            return o_s[None]
        held = self.calls.ranges_with_rows(tiers.n_host)
        if self.calls.cfg.global_topk:
            return self._decode_global(layer, tiers, q1, held, blocks)
        qc = q1.to("cpu")
        pending = self.calls.submit({i: ("step", (layer, qc, budget, blocks.get(i))) for i in held})
        o_s, l_s = self._static(tiers, q1)
        with self.timers("shard_wait"):
            got = self.calls.wait(pending)
        self.scanned += sum(g[2] for g in got.values())
        return self._merge([(o_s, l_s)] + [(g[0], g[1]) for g in got.values()])[None]

    def _static(self, tiers: LayerTiers, q1: Tensor) -> tuple[Tensor, Tensor]:
        with self.timers("static_attention"):
            sk, sv, _ = tiers.static_kv()
            return self.ops.decode_attend(q1, sk, sv, scale=self.scale)

    def _decode_global(self, layer: int, tiers: LayerTiers, q1: Tensor, held: list[int],
                       blocks: dict[int, Block]) -> Tensor:
        """Two rounds: every shard's scored top-`budget`, then attention over the global top."""
        qc, budget = q1.to("cpu"), self.rcfg.budget
        pending = self.calls.submit({i: ("candidates", (layer, qc, budget, blocks.get(i))) for i in held})
        o_s, l_s = self._static(tiers, q1)
        with self.timers("shard_wait"):
            cand = self.calls.wait(pending)
            self.scanned += sum(c[2] for c in cand.values())
            shares = split_global_topk([c[0] for c in cand.values()], [c[1] for c in cand.values()], budget)
            keep = {i: s for i, s in zip(cand, shares) if bool((s >= 0).any())}
            got = self.calls.run({i: ("attend_ids", (layer, qc, ids)) for i, ids in keep.items()})
        return self._merge([(o_s, l_s)] + list(got.values()))[None]

    def close(self, delete: bool = False) -> None:
        self.calls.close(delete)


# ---- the session -----------------------------------------------------------------------------


class ShardedSession(Session):
    """A Session whose host tier lives in shard processes (module docstring).

    shards: the ShardConfig. group: a ShardGroup to open the ranges on (shared with other
    sessions, kept open by close()); None makes one from `shards` and closes it with the
    session. Use as a context manager, or call close().
    """

    def __init__(self, model, retrieval: RetrievalConfig | None = None, runtime: RuntimeConfig | None = None,
                 cache: CacheConfig | None = None, *, shards: ShardConfig, group: ShardGroup | None = None) -> None:
        if not isinstance(shards, ShardConfig):
            raise TypeError(f"shards must be a kvloft.cluster.ShardConfig, got {type(shards).__name__}")
        _check_supported(retrieval or RetrievalConfig(), runtime or RuntimeConfig())
        if group is not None and group.n_shards < shards.n_shards:
            raise ValueError(f"the group has {group.n_shards} shards, ShardConfig.n_shards asks {shards.n_shards}; "
                             "pass a larger group or lower n_shards")
        _prepare_directory(shards)
        self.shard_cfg = shards
        self.group = group if group is not None else ShardGroup.from_config(shards)
        self._own_group = group is None
        try:
            super().__init__(model, retrieval, runtime, cache)
        except BaseException:
            self.close()
            raise

    def reset(self) -> None:
        """Forget the context: the ranges' stores and files are deleted, the shards kept."""
        old = getattr(self, "backend", None)
        if isinstance(old, ShardedAttention):
            old.close(delete=True)
        cfg, m = self.model.config, self.model
        kv = DriverKVCache(cfg, n_sink=self.retrieval.n_sink, n_window=self.retrieval.n_window, device=m.device,
                           dtype=m.dtype)
        calls = ShardCalls(self.group, self.shard_cfg, cfg, self.retrieval, m.dtype)
        self.backend = ShardedAttention(cfg, self.retrieval, kv, calls, self.ops, m.device, self.runtime.profile)
        self.tokens: list[int] = []
        self._last_logits = None
        self._times = {"prefill_s": 0.0, "prefill_tokens": 0, "decode_s": 0.0, "decode_tokens": 0}

    def _check_capacity(self, n_new: int) -> None:
        super()._check_capacity(n_new)
        r, c = self.retrieval, self.shard_cfg
        host = max(0, len(self.tokens) + n_new - r.n_sink - r.n_window)
        if host > c.capacity:
            raise ValueError(
                f"{len(self.tokens) + n_new} tokens put {host} in the host tier, over the shards' capacity of "
                f"{c.capacity} (n_shards={c.n_shards} x shard_tokens={c.shard_tokens}); raise them or feed less"
            )

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        calls = self.backend.calls
        out["cluster"] = {"ranges_open": len(calls.specs), "n_shards": self.shard_cfg.n_shards,
                          "global_topk": self.shard_cfg.global_topk, "recoveries": calls.recoveries,
                          "recovery_s": round(calls.recovery_s, 3)}
        return out

    def save(self, path) -> None:
        raise ValueError("a sharded session keeps its host tier in its shard directory and cannot be saved "
                         "with Session.save; save a single-process Session instead")

    def close(self, delete_files: bool = False) -> None:
        """Drop the session's stores from the shards (files kept unless delete_files); a group
        this session made is closed too."""
        backend = getattr(self, "backend", None)
        if isinstance(backend, ShardedAttention):
            backend.close(delete_files)
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
    if r.method == "dense":
        raise ValueError("method='dense' keeps every token on the device: nothing to shard; use a retrieval "
                         "method (e.g. 'exact') or a plain kvloft.Session")
    if r.position_mode != "exact":
        raise ValueError("sharded sessions run position_mode='exact' only; use a plain Session to extrapolate")
    if rt.scheduler != "none":
        raise ValueError("sharded sessions run without the overlap scheduler (RuntimeConfig.scheduler='none')")


def _prepare_directory(cfg: ShardConfig) -> None:
    """The directory exists and is writable; an earlier session's ranges are removed only with overwrite."""
    root = Path(cfg.directory)
    _check_writable(root)
    left = sorted(root.glob("range-*"))
    if left and not cfg.overwrite:
        raise ValueError(f"{root} holds {len(left)} shard range(s) of an earlier session; pass "
                         "ShardConfig(overwrite=True) to delete them, or name another directory")
    for path in left:
        shutil.rmtree(path, ignore_errors=True)

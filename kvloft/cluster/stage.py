"""A pipeline stage: a contiguous range of layers, their weights, and per session their tiered KV.

`StageActor` is the process (a Ray actor: `ray.remote(StageActor)`, placed by
kvloft/cluster/group.py). It holds the weights of layers [start, stop) (`StageNet`, the
runtime's own `Block`s) and, per session, a `StageRunner`: the runtime's TieredAttention
(static tier, host tier, retriever) over those layers, and the session's record files
(kvloft/cluster/store.py). A call carries the hidden state x [T, hidden] of T tokens; the
stage runs its layers and returns the next hidden state, or, for the last stage, the
logits of the last token.

Each layer's k, v of a call are appended to its record file before the layer attends, so a
stage that dies loses nothing the driver saw. `open(spec, upto)` (re)builds a runner from
its files, cut to the first `upto` tokens: rows appended in the same calls as first, the
index built where it was first built with the recorded query sample. With the exact
position mode, a retriever whose index depends only on those calls (exact, faiss,
attention_graph) and the tiers end as they were, so the continuation is identical to a
run that never stopped. (A query-sampling retriever whose stage is lost during the first
feed, before its index is built, samples only the queries after the loss.)
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import torch
from torch import Tensor, nn

from kvloft.cluster.store import Block, StageSpec, StageStore
from kvloft.config import ModelConfig
from kvloft.index.base import make_retriever
from kvloft.kernels import kernel_set
from kvloft.runtime.attention import DenseAttention, TieredAttention
from kvloft.runtime.model import Block as LayerBlock
from kvloft.runtime.model import RMSNorm, rope_inv_freq
from kvloft.tiers.kvcache import TieredKVCache


class StoreNotOpen(LookupError):
    """The stage process does not hold this session (it was restarted): open it again."""


def stage_weights(net: nn.Module, start: int, stop: int, last: bool) -> dict[str, Tensor]:
    """The tensors a stage of layers [start, stop) needs from a runtime Transformer's state
    dict, renamed to StageNet's keys (layer i -> i - start); the final norm and lm_head for
    the last stage."""
    out = {}
    for name, t in net.state_dict().items():
        parts = name.split(".")
        if parts[0] == "layers" and start <= int(parts[1]) < stop:
            out[".".join(["layers", str(int(parts[1]) - start), *parts[2:]])] = t.detach().to("cpu")
        elif last and parts[0] in ("norm", "lm_head"):
            out[name] = t.detach().to("cpu")
    return out


class StageNet(nn.Module):
    """Layers [start, stop) of the decoder (runtime Blocks), and the head on the last stage."""

    def __init__(self, cfg: ModelConfig, layers: tuple[int, int], last: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(LayerBlock(cfg) for _ in range(layers[1] - layers[0]))
        self.last = last
        if last:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions [T] int64 -> cos, sin [T, D] fp32 (as Transformer.rope)."""
        ang = positions.double()[:, None] * self.inv_freq.double()[None]
        ang = torch.cat((ang, ang), dim=-1)
        return ang.cos().float(), ang.sin().float()

    @torch.inference_mode()
    def forward(self, x: Tensor, positions: Tensor, backend) -> Tensor:
        """x [T, hidden] -> the next stage's x [T, hidden], or (last stage) logits [V] fp32 of
        the last token."""
        cos, sin = self.rope(positions)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, i, backend, positions)
        if not self.last:
            return x
        return self.lm_head(self.norm(x[-1:])).float()[0]


class RecordingBackend:
    """The attention backend a StageNet sees: each call's k, v go to the records first."""

    def __init__(self, inner, store: StageStore) -> None:
        self.inner, self.store = inner, store

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        self.store.append(layer, k, v, positions)
        return self.inner.attend(layer, q, k, v, positions)


class StageRunner:
    """One session's state on one stage: tiers and retriever of its layers, its record files."""

    def __init__(self, spec: StageSpec, device: torch.device) -> None:
        self.spec = spec
        start, stop = spec.layers
        self.cfg = dataclasses.replace(spec.model, n_layers=stop - start)  # local layer ids 0..n-1
        dtype = getattr(torch, spec.dtype)
        ops = kernel_set(spec.runtime.kernels, device)
        r, c = spec.retrieval, spec.cache
        if r.method == "dense":
            self.backend = DenseAttention(self.cfg, ops, device, dtype, spec.runtime.profile)
        else:
            kv = TieredKVCache(self.cfg, n_sink=r.n_sink, n_window=r.n_window, host_chunk=c.host_chunk_tokens,
                               device=device, dtype=dtype, evict_batch=c.resolved_evict_batch(device),
                               host_dtype=c.host_dtype)
            retriever = make_retriever(r, self.cfg, device)
            self.backend = TieredAttention(self.cfg, r, kv, retriever, ops, device, spec.runtime.profile)
        self.device = device
        self.store = StageStore(spec)
        self.n_tokens = 0
        self.replayed_tokens = 0
        self.restore_s = 0.0
        self.last: tuple[int, int, Tensor] | None = None  # (first position, T, output) of the last call

    @property
    def tiered(self) -> bool:
        return isinstance(self.backend, TieredAttention)

    def restore(self, upto: int) -> None:
        """Redo the recorded calls covering the first `upto` tokens (module docstring)."""
        for event in self.store.replay(upto):
            if isinstance(event, int):
                self._build_from_records()
                continue
            self._append_block(event)
            self.n_tokens += event.pos[0].shape[0]
        self.replayed_tokens = self.n_tokens

    def _append_block(self, block: Block) -> None:
        b = self.backend
        for i, (k, v, pos) in enumerate(zip(block.k, block.v, block.pos)):
            k, v, pos = k.to(self.device), v.to(self.device), pos.to(self.device)
            if self.tiered:
                b.append_rows(i, k, v, pos)
            else:
                b.layers[i].append(k, v)

    def _build_from_records(self) -> None:
        if not self.tiered:
            return
        for i in range(self.cfg.n_layers):
            q = self.store.query_sample(i)  # [H_q, M, D]
            self.backend.sampler.replace(i, None if q is None else q.transpose(0, 1))
        self.backend.build_indexes()

    def forward(self, net: StageNet, x: Tensor, positions: Tensor, decoding: bool, feed_after: int,
                budget: int) -> Tensor:
        """Run the stage's layers on x [T, hidden] at positions [T] (the next tokens), retrieving
        `budget` host keys per step (the session's RetrievalConfig.budget, which may change)."""
        first = int(positions[0])
        if self.last is not None and (first, positions.shape[0]) == self.last[:2]:
            return self.last[2]  # a resend of the last call (a later stage failed): its output again
        if first != self.n_tokens:
            raise ValueError(f"stage {self.spec.layers}: a call at position {first}, but the stage holds "
                             f"{self.n_tokens} tokens; the driver must reopen it at {first}")
        if self.tiered:
            self.backend.decoding, self.backend.feed_after = decoding, feed_after
            if budget != self.backend.rcfg.budget:
                self.backend.rcfg = self.backend.rcfg.replace(budget=budget)
        out = net(x.to(self.device), positions.to(self.device), RecordingBackend(self.backend, self.store))
        self.n_tokens += positions.shape[0]
        self.last = (first, positions.shape[0], out.to("cpu"))
        return self.last[2]

    def at(self, upto: int) -> bool:
        """Whether the runner can continue from `upto` tokens as it is: it holds exactly
        that many, or its last call started there (a resend gets that call's output)."""
        return self.n_tokens == upto or (self.last is not None and self.last[0] == upto)

    def build(self) -> None:
        """Index the host tier (after a feed): the query samples recorded first, once."""
        if not self.tiered:
            return
        if self.store.built_at is None:
            samples = {i: self.backend.sampler.sample(i) for i in range(self.cfg.n_layers)}
            self.store.mark_built(self.n_tokens, samples)
        self.backend.build_indexes()

    def stats(self) -> dict[str, Any]:
        b = self.backend
        out = {"layers": list(self.spec.layers), "tokens": self.n_tokens, "bytes": b.bytes(),
               "replayed_tokens": self.replayed_tokens, "restore_s": round(self.restore_s, 3), "timings_s": b.timers.as_dict()}
        if self.tiered:
            tiers = b.cache[0]
            out["tier_tokens"] = {"static": tiers.n_static, "host": tiers.n_host}
            out["keys_scanned"] = b.scanned
            out["retriever"] = b.retriever.stats()
        return out

    def close(self, delete: bool = False) -> None:
        if self.tiered:
            self.backend.cache.close()
            if hasattr(self.backend.retriever, "close"):
                self.backend.retriever.close()
        self.store.close(delete)


class StageActor:
    """One stage process: the weights of its layers and the runners of any number of sessions,
    keyed by their stage directory. Run as a Ray actor (kvloft/cluster/group.py).

    Made empty and given its layers by load(). A spare (kvloft/cluster/group.py) is loaded and
    idles; it takes over a dead stage at once, instead of a process start and a weight transfer.
    """

    def __init__(self, threads: int = 1) -> None:
        torch.set_num_threads(threads)
        self.layers: tuple[int, int] | None = None  # a spare until load()
        self.net: StageNet | None = None
        self.runners: dict[str, StageRunner] = {}

    def load(self, cfg: ModelConfig, layers: tuple[int, int], last: bool, weights: dict[str, Tensor], dtype: str,
             device: str = "cpu") -> None:
        """Become the stage of layers [start, stop) with these weights (StageNet's keys)."""
        t0 = time.perf_counter()
        self.device = torch.device(device)
        with torch.device("meta"):  # no random init: the weights are assigned
            net = StageNet(cfg, tuple(layers), last)
        net.load_state_dict(weights, strict=True, assign=True)
        net.inv_freq = rope_inv_freq(cfg)  # RoPE frequencies stay fp32
        net.to(dtype=getattr(torch, dtype))
        self.net, self.layers = net.eval(), tuple(layers)
        self.to(device)
        self.load_s = time.perf_counter() - t0

    def to(self, device: str) -> None:
        """Move the weights to `device`."""
        self.device = torch.device(device)
        self.net.to(self.device)
        self.net.inv_freq = self.net.inv_freq.float()

    def _runner(self, key: str) -> StageRunner:
        runner = self.runners.get(key)
        if runner is None:
            raise StoreNotOpen(f"stage {self.layers} does not hold session {key} (restarted?); open it again")
        return runner

    def open(self, spec: StageSpec, upto: int) -> int:
        """Hold the session `spec.directory` at exactly `upto` tokens: kept if it is there, else
        rebuilt from its files cut to `upto` tokens. Returns the tokens replayed."""
        if tuple(spec.layers) != self.layers:
            raise ValueError(f"this stage runs layers {self.layers}, the session asks {tuple(spec.layers)}")
        runner = self.runners.get(spec.directory)
        if runner is not None and runner.at(upto):
            return 0
        if runner is not None:
            runner.close()
        t0 = time.perf_counter()
        runner = self.runners[spec.directory] = StageRunner(spec, self.device)
        runner.restore(upto)
        runner.restore_s = time.perf_counter() - t0
        return runner.replayed_tokens

    def forward(self, key: str, x: Tensor, positions: Tensor, decoding: bool, feed_after: int,
                budget: int) -> Tensor:
        """x [T, hidden], positions [T] -> x [T, hidden] (or logits [V] on the last stage)."""
        return self._runner(key).forward(self.net, x, positions, decoding, feed_after, budget)

    def forward_pieces(self, key: str, x: Tensor, positions: Tensor, decoding: bool, feed_after: int,
                       budget: int, pieces: int) -> tuple[Tensor, ...] | Tensor:
        """forward, its output split into `pieces` parts (call with num_returns=pieces): each part
        under Ray's inline limit comes back with the reply instead of through the object store."""
        out = self.forward(key, x, positions, decoding, feed_after, budget)
        return out if pieces == 1 else tuple(t.clone() for t in out.tensor_split(pieces))

    def build(self, key: str) -> None:
        self._runner(key).build()

    def stats(self, key: str) -> dict[str, Any]:
        return self._runner(key).stats()

    def close(self, key: str, delete: bool = False) -> None:
        """Drop a session (its files stay unless `delete`)."""
        runner = self.runners.pop(key, None)
        if runner is not None:
            runner.close(delete)
        elif delete:
            import shutil

            shutil.rmtree(key, ignore_errors=True)

    def where(self) -> dict[str, Any]:
        """The node and process this stage runs in (node_id is Ray's, when run as an actor)."""
        node = None
        try:
            import ray

            if ray.is_initialized():
                node = ray.get_runtime_context().get_node_id()
        except ImportError:
            pass
        return {"node_id": node, "pid": os.getpid(), "layers": list(self.layers), "sessions": sorted(self.runners),
                "load_s": round(getattr(self, "load_s", 0.0), 3)}

    def ping(self) -> bool:
        return True

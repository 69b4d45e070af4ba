"""Per-layer attention behind the model's one call per layer (DESIGN.md, data path).

DenseAttention   the baseline: every token on the compute device, causal softmax.
TieredAttention  static tier (sink + window) + host tier. Prefill chunks attend densely
                 to everything before them (one partial per tier chunk, merged); a decode
                 token attends to the static tier and to the host rows its retriever
                 selects, the two partials merged exactly by log-sum-exp:
                     o = merge((o_s, lse_s), (o_r, lse_r))
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch
from torch import Tensor

from kvloft.config import ModelConfig, RetrievalConfig
from kvloft.index.base import Retriever
from kvloft.kernels import KernelSet
from kvloft.runtime.kvcache import DenseKV, LayerTiers, TieredKVCache


class Timers:
    """Wall-clock seconds per category.

    CPU ops are synchronous. With `sync` (CUDA), each region synchronizes the device on
    entry and exit so the breakdown is exact; that serializes work, so use it for
    breakdowns (RuntimeConfig.profile), not for end-to-end latency.
    """

    def __init__(self, sync: bool = False) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.sync = sync

    @contextmanager
    def __call__(self, name: str):
        if self.sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.seconds[name] += time.perf_counter() - t0

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 6) for k, v in self.seconds.items()}


class DenseAttention:
    def __init__(self, cfg: ModelConfig, ops: KernelSet, device: torch.device, dtype: torch.dtype,
                 profile: bool = False) -> None:
        self.layers = [DenseKV(cfg, device, dtype) for _ in range(cfg.n_layers)]
        self.ops = ops
        self.scale = cfg.head_dim**-0.5
        self.timers = Timers(sync=profile and device.type == "cuda")

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        store = self.layers[layer]
        store.append(k, v)
        kk, vv = store.kv()
        with self.timers("attention"):
            out, _ = self.ops.attend(q, kk, vv, scale=self.scale, causal=True)
        return out

    @property
    def n_tokens(self) -> int:
        return self.layers[0].n

    def bytes(self) -> dict[str, int]:
        return {"static": sum(s.nbytes() for s in self.layers), "host": 0}


class QuerySampler:
    """Keeps a strided sample of prefill queries per layer, at most `cap` tokens.

    Every `stride`-th token is kept; when the sample passes `cap`, every other kept
    token is dropped and the stride doubles, so the sample stays uniform over the prompt.
    """

    def __init__(self, n_layers: int, cap: int) -> None:
        self.cap = cap
        self.stride = 1
        self.kept: list[list[Tensor]] = [[] for _ in range(n_layers)]
        self.pos: list[list[Tensor]] = [[] for _ in range(n_layers)]

    def observe(self, layer: int, q: Tensor, positions: Tensor) -> None:
        if self.cap == 0:
            return
        m = positions % self.stride == 0
        self.kept[layer].append(q[m].to("cpu"))
        self.pos[layer].append(positions[m].to("cpu"))
        if sum(len(p) for p in self.pos[layer]) > self.cap and layer == len(self.kept) - 1:
            self.stride *= 2
            for i in range(len(self.kept)):
                qs, ps = torch.cat(self.kept[i]), torch.cat(self.pos[i])
                m2 = ps % self.stride == 0
                self.kept[i], self.pos[i] = [qs[m2]], [ps[m2]]

    def sample(self, layer: int) -> Tensor | None:
        """Queries [H_q, M, D] of this layer, or None if none were kept."""
        if not self.kept[layer]:
            return None
        return torch.cat(self.kept[layer]).transpose(0, 1).contiguous()

    def clear(self) -> None:
        for lst in (*self.kept, *self.pos):
            lst.clear()


class TieredAttention:
    def __init__(self, cfg: ModelConfig, rcfg: RetrievalConfig, cache: TieredKVCache,
                 retriever: Retriever, ops: KernelSet, device: torch.device, profile: bool = False) -> None:
        self.cfg, self.rcfg, self.cache = cfg, rcfg, cache
        self.retriever, self.ops, self.device = retriever, ops, device
        self.scale = cfg.head_dim**-0.5
        self.built = [False] * cfg.n_layers
        cap = rcfg.query_sample if getattr(retriever, "needs_queries", True) else 0
        self.sampler = QuerySampler(cfg.n_layers, cap)
        self.decoding = False
        self.timers = Timers(sync=profile and device.type == "cuda")
        self.scanned = 0

    @property
    def n_tokens(self) -> int:
        return self.cache.n_tokens

    def bytes(self) -> dict[str, int]:
        return self.cache.bytes()

    def build_indexes(self) -> None:
        """Index every layer's host tier (once, after the first prefill)."""
        for layer in range(self.cfg.n_layers):
            if self.built[layer]:
                continue
            with self.timers("index_build"):
                keys = self.cache[layer].host_keys_head_major()
                self.retriever.build(layer, keys, self.sampler.sample(layer))
            self.built[layer] = True
        self.sampler.clear()

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        if self.decoding and q.shape[0] == 1 and self.built[layer]:
            return self._decode(layer, q, k, v, positions)
        return self._prefill(layer, q, k, v, positions)

    def _append(self, layer: int, k: Tensor, v: Tensor, positions: Tensor) -> None:
        ev = self.cache[layer].append(k, v, positions)
        if ev is not None and self.built[layer]:
            with self.timers("index_add"):
                self.retriever.add(layer, ev.k.transpose(0, 1).to("cpu"), ev.positions.to("cpu"))

    def _prefill(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """Dense: the chunk attends to every earlier token (tier by tier) and causally to itself."""
        tiers: LayerTiers = self.cache[layer]
        outs, lses = [], []
        with self.timers("prefill_attention"):
            sk, sv, _ = tiers.static_kv()
            parts = [(sk, sv)] if sk.shape[0] else []
            parts += [(hk.to(self.device), hv.to(self.device))
                      for (_, hk), (_, hv) in zip(tiers.host_k.iter_chunks(), tiers.host_v.iter_chunks())]
            for pk, pv in parts:
                o, lse = self.ops.attend(q, pk, pv, scale=self.scale)
                outs.append(o)
                lses.append(lse)
            o, lse = self.ops.attend(q, k, v, scale=self.scale, causal=True)
            outs.append(o)
            lses.append(lse)
            out, _ = self.ops.merge(outs, lses)
        self.sampler.observe(layer, q, positions)
        self._append(layer, k, v, positions)
        return out

    def _decode(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        tiers: LayerTiers = self.cache[layer]
        self._append(layer, k, v, positions)
        q1 = q[0]  # [H_q, D]
        with self.timers("static_attention"):
            sk, sv, _ = tiers.static_kv()
            o_s, l_s = self.ops.decode_attend(q1, sk, sv, scale=self.scale)
        if tiers.n_host == 0 or self.rcfg.budget == 0:
            return o_s[None]
        with self.timers("search"):
            sel = self.retriever.select(layer, q1, self.rcfg.budget)
        self.scanned += sel.scanned
        with self.timers("retrieved_attention"):
            o_r, l_r = self._retrieved(tiers, q1, sel.ids)
            out, _ = self.ops.merge([o_s, o_r], [l_s, l_r])
        return out[None]

    def _retrieved(self, tiers: LayerTiers, q: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Attention of q [H_q, D] over selected host rows (ids [H_kv, k] or [k], -1 = pad)."""
        one_chunk = len(tiers.host_k.chunks) == 1
        zero_copy = self.ops.name == "triton" and tiers.host_k.pin
        if one_chunk and (self.device.type == "cpu" or zero_copy):
            # one host chunk: the kernel gathers straight from it (on CUDA: reading pinned
            # host memory through unified addressing, only the selected rows cross PCIe)
            kc, vc = tiers.host_k.chunks[0], tiers.host_v.chunks[0]
            return self.ops.gather_attend(q, kc, vc, ids.to(q.device), scale=self.scale)
        ids = ids.to("cpu")
        hkv = self.cfg.n_kv_heads
        per_head = ids if ids.dim() == 2 else ids[None].expand(hkv, -1)
        safe = per_head.clamp_min(0)
        heads = torch.arange(hkv)[:, None].expand_as(safe)
        gk = tiers.host_k.rows(safe, heads).transpose(0, 1).to(self.device)  # [k, H_kv, D]
        gv = tiers.host_v.rows(safe, heads).transpose(0, 1).to(self.device)
        local = torch.arange(safe.shape[1])[None].expand_as(safe)
        local = torch.where(per_head >= 0, local, -1).to(self.device)
        return self.ops.gather_attend(q, gk, gv, local, scale=self.scale)

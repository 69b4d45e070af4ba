"""ActQKV: an activation-aware probe query over block memory (arXiv 2502.13542).

Memory (InfLLM, arXiv 2402.04617): host rows are grouped into blocks of `block_size`
consecutive tokens (32; InfLLM uses 64 for Qwen-like models, which measured worse on the
Qwen2.5 trace: see "Blocks cut needles" below). Each block is represented, per KV head, by the mean of its
`n_repr` representative keys, kept as it is (not normalized: the keys' shared direction
and norms are part of the logits the block will produce). Representatives are the keys
that receive the most attention inside their block, with the block's own keys as the
queries: score_j = mean_i softmax_j(k_i · k_j / sqrt(D)) (self included). InfLLM ranks a
key by the attention it receives from the local window's prefill queries; the retriever
protocol hands over keys only at add(), so the keys stand in for them (on the SmolLM2
trace, ranking by the attention or the dot product from the following prefill queries
put the needle's block further down: docs/methods_hip_actqkv.md). The trailing partial
block is a block too, re-represented as rows arrive.

Block scoring (scoring="dot", InfLLM's relevance): the inner product of the probe with the
block vector, averaged over query heads and put on the attention-logit scale,

    score_b = mean_h p_h · v_{b, kv(h)} / sqrt(D),

one selection shared by all heads (Selection.ids [k]). ActQKV keeps InfLLM's block memory
and changes the probe. Its public code scores by the cosine between the concatenation of
all heads' probes and of the (group-expanded) block vectors: scoring="cosine". On real keys,
which share a large common direction (46-84% of a key's norm on SmolLM2), normalizing away
the block vector's norm ranks blocks by direction alone and drops the blocks whose keys
give the largest logits; "dot" is the default (measurements in docs/methods_hip_actqkv.md).

Probe query: ActQKV builds it from the chunk of queries being processed (256 per chunk in
its prefill): q_probe = sum_t phi_t q_t / sum(phi). A decode step is a chunk of one query,
so at decode the probe is the current query (window=1, the default). With window > 1 the
last `window` queries (the prompt's last queries from build's sample, then the decode
queries seen by select, the current one included) are weighted by the activation bias of
query t in head h,

    phi_t = mean_c (q_t,c - mu_c)^2 / (sigma_c^2 + mean_c(sigma_c^2) * var_floor)

over the channels c of the head, with mu, sigma^2 running (Welford) statistics of every
query the layer has seen. Statistics are kept per layer (the public code shares one
set across layers). With fewer than two queries seen the weights are uniform.

Dynamic cut-off: layer l gets a share of the total n_layers * budget tokens in
proportion to the normalized entropy of softmax(scores / temperature) over its blocks
(a flatter distribution gets more), clipped to [min_tokens, max_factor * budget] and
rounded down to whole blocks (at least one). Scores are logits for "dot" and cosines for
"cosine"; at temperature 1 the first is the distribution attention itself would put on
the block vectors, the second the public code's softmax(cosines). select() runs one layer
at a time, so the split for step t uses each layer's entropy from step t - 1 (a layer's
step is its count of select calls); layers without one yet count at the mean of the known
entropies, and the first step splits evenly. Shares sum to the total before clipping, so
the tokens a layer selects vary around `budget` and reach at most max_factor * budget.

Blocks cut needles: a selection of whole blocks drops the part of a needle that lies past
a block edge whenever the next block's representatives are ordinary haystack keys (a
few digits among 32-64 tokens rarely make the top 4). On Qwen2.5-Coder-0.5B, passkey
"60494" at 8K, block 64, budget 1024, the layers where the needle holds >= 5% of the
answer queries' attention kept 31% of that mass when a block edge split the digits, 65%
when it did not (docs/methods.md, "Limits"). So each selected block brings `halo` rows of
both neighbours (default block / 4, inside the layer's share): with blocks of 32 and a
halo of 8 the same layers keep 61-85% at every edge placement measured.

Memory: the index keeps one fp32 vector per block and KV head (1/block_size of the
keys, at fp32) plus the keys of the partial block; search cost per step is one
dot product per block and KV head (`scanned` = n_blocks * H_kv).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from kvloft.config import ModelConfig, RetrievalConfig
from kvloft.index.act_probe import QueryStats, activation_bias
from kvloft.index.base import (
    RetrieverStats,
    Selection,
    check_select,
    params_from_options,
    register,
    state_tensor,
)
from kvloft.index.block_spans import halo_spans
from kvloft.tiers.chunked import ChunkedRows

__all__ = ["ActQKVParams", "ActQKVRetriever", "activation_bias", "block_scores", "block_vectors",
           "halo_spans", "normalized_entropy"]

SCORINGS = ("dot", "cosine")


@dataclass(frozen=True)
class ActQKVParams:
    """Method options (RetrievalConfig.options), with the paper's defaults.

    block_size: tokens per memory block (0: 32).
    n_repr: representative keys per block.
    window: queries in the probe window (1: the current query, ActQKV's decode-time chunk).
    scoring: "dot" (InfLLM's inner product, on the logit scale) or "cosine" (the public
        ActQKV code's cosine over the concatenated heads).
    dynamic_cutoff: split the total budget across layers by entropy (False: `budget` each).
    min_tokens / max_factor: a layer's share is clipped to [min_tokens, max_factor * budget].
    temperature: scores / temperature -> softmax -> the distribution whose entropy is measured
        (at 1: attention's own scale for "dot" logits, the public code's softmax for cosines).
    var_floor: sigma^2 is floored by var_floor * mean(sigma^2) in the activation bias (1/100).
    halo: rows of the neighbouring blocks taken on each side of a selected block, inside the
        layer's token share (-1: block / 4; 0: whole blocks only, the paper's rule).
    block_batch: blocks represented per batch at build (bounds the [b, b] attention buffers).
    """

    block_size: int = 0
    n_repr: int = 4
    window: int = 1
    scoring: str = "dot"
    dynamic_cutoff: bool = True
    min_tokens: int = 32
    max_factor: float = 2.0
    temperature: float = 1.0
    var_floor: float = 0.01
    halo: int = -1
    block_batch: int = 1024

    def __post_init__(self) -> None:
        for name, minimum in (("block_size", 0), ("n_repr", 1), ("window", 1), ("min_tokens", 1),
                              ("halo", -1), ("block_batch", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"actqkv option {name} must be an int >= {minimum}, got {value!r}")
        if self.block_size and self.n_repr > self.block_size:
            raise ValueError(f"actqkv n_repr ({self.n_repr}) must be <= block_size ({self.block_size})")
        if self.scoring not in SCORINGS:
            raise ValueError(f"actqkv option scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if type(self.dynamic_cutoff) is not bool:
            raise ValueError(f"actqkv option dynamic_cutoff must be a bool, got {self.dynamic_cutoff!r}")
        for name, minimum in (("max_factor", 1.0), ("temperature", 0.0), ("var_floor", 0.0)):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or value < minimum or (minimum == 0.0 and value <= 0):
                bound = f">= {minimum}" if minimum else "> 0"
                raise ValueError(f"actqkv option {name} must be a finite number {bound}, got {value!r}")

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> ActQKVParams:
        return params_from_options(cls, options, "actqkv")


def block_vectors(keys: Tensor, n_repr: int) -> Tensor:
    """Mean of each block's representative keys (not normalized).

    keys: [B, b, H_kv, D] (B blocks of b tokens). Returns [B, H_kv, D] fp32.
    """
    kf = keys.float().permute(0, 2, 1, 3)  # [B, H_kv, b, D]
    att = torch.softmax(kf @ kf.transpose(-1, -2) * kf.shape[-1] ** -0.5, dim=-1)  # [B, H_kv, b(i), b(j)]
    received = att.mean(dim=2)  # [B, H_kv, b]: mean attention key j receives from the block
    top = received.topk(min(n_repr, kf.shape[2]), dim=-1).indices  # [B, H_kv, r]
    reps = kf.gather(2, top[..., None].expand(-1, -1, -1, kf.shape[-1]))  # [B, H_kv, r, D]
    return reps.mean(dim=2)


def block_scores(vecs: Tensor, probe: Tensor, scoring: str) -> Tensor:
    """Score of each block for one probe.

    vecs: [B, H_kv, D] fp32 block vectors; probe: [H_q, D] fp32 (GQA groups of H_q / H_kv
    consecutive heads). Returns [B]: "dot": mean_h probe_h · vecs[:, kv(h)] / sqrt(D);
    "cosine": cos(concat_h probe_h, concat_h vecs[:, kv(h)]).
    """
    n_blocks, hkv, d = vecs.shape
    group = probe.shape[0] // hkv
    # sum over a group of p_h · v = v · (sum of the group's probes): one [B, H_kv * D] matvec
    psum = probe.view(hkv, group, d).sum(dim=1).flatten()  # [H_kv * D]
    flat = vecs.reshape(n_blocks, hkv * d)
    dots = flat @ psum  # [B]: sum over query heads of p_h · v_kv(h)
    if scoring == "dot":
        return dots / (probe.shape[0] * math.sqrt(d))
    # the group-expanded block vector has norm sqrt(group) * ||v||
    norms = flat.norm(dim=1) * math.sqrt(group) * probe.norm()
    return dots / norms.clamp_min(torch.finfo(torch.float32).tiny)


@dataclass
class _LayerState:
    """One layer's block memory and probe state.

    vecs: complete blocks' vectors, rows [H_kv, D] fp32 (row i = block i).
    tail: keys of the trailing partial block [m < b, H_kv, D]; tail_vec its vector [H_kv, D].
    window: the last queries [w <= W, H_q, D] fp32.
    entropy: step -> normalized entropy of the block scores at that step (last two kept): a
        0-dim fp64 tensor where select() left it (on the device), a float where a state was loaded.
    """

    vecs: ChunkedRows
    tail: Tensor
    tail_vec: Tensor | None = None
    n_rows: int = 0
    stats: QueryStats = field(default_factory=QueryStats)
    window: Tensor | None = None
    step: int = 0
    entropy: dict[int, Tensor | float] = field(default_factory=dict)


@register("actqkv")
class ActQKVRetriever:
    small_state = True  # state_dict() is a query window and statistics per layer: kept to roll back a call
    def __init__(self, cfg: RetrievalConfig, model_cfg: ModelConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.device = torch.device(device)
        self.params = ActQKVParams.from_options(cfg.options)
        self.block = self.params.block_size or 32
        self.halo = self.block // 4 if self.params.halo < 0 else self.params.halo
        if self.params.n_repr > self.block:
            raise ValueError(f"actqkv n_repr ({self.params.n_repr}) must be <= block_size ({self.block})")
        self.layers: dict[int, _LayerState] = {}
        self._stats = RetrieverStats(extra={"tokens": {}, "entropy": {}})
        # the split of the last (step, budget): (key, the entropies it read, shares [n_layers])
        self._split: tuple[tuple[int, int], list[Any], list[float]] | None = None

    # ---- index maintenance -------------------------------------------------------------

    def _new_layer(self, dtype: torch.dtype) -> _LayerState:
        hkv, d = self.model_cfg.n_kv_heads, self.model_cfg.head_dim
        vecs = ChunkedRows((hkv, d), torch.float32, 4096, self.device)
        return _LayerState(vecs=vecs, tail=torch.empty((0, hkv, d), dtype=dtype, device=self.device))

    def _check_keys(self, keys: Tensor) -> None:
        hkv, d = self.model_cfg.n_kv_heads, self.model_cfg.head_dim
        if keys.dim() != 3 or keys.shape[0] != hkv or keys.shape[2] != d:
            raise ValueError(f"keys must be [H_kv={hkv}, N, D={d}], got {tuple(keys.shape)}")

    def build(self, layer: int, keys: Tensor, queries: Tensor | None) -> None:
        """keys [H_kv, N, D] after RoPE; queries [H_q, M, D] prefill sample in position order (or None)."""
        self._check_keys(keys)
        st = self._new_layer(keys.dtype)
        self.layers[layer] = st
        self._append(st, keys.transpose(0, 1).to(self.device))
        if queries is not None and queries.numel():
            hq, d = self.model_cfg.n_heads, self.model_cfg.head_dim
            if queries.dim() != 3 or queries.shape[0] != hq or queries.shape[2] != d:
                raise ValueError(f"queries must be [H_q={hq}, M, D={d}], got {tuple(queries.shape)}")
            qs = queries.transpose(0, 1).to(self.device, torch.float32)  # [M, H_q, D]
            st.stats.update(qs)
            st.window = qs[-self.params.window :].clone()

    def add(self, layer: int, keys: Tensor, positions: Tensor) -> None:
        """keys [H_kv, n, D] leaving the window: complete blocks get their vectors."""
        self._check_keys(keys)
        if layer not in self.layers:
            self.layers[layer] = self._new_layer(keys.dtype)
        self._append(self.layers[layer], keys.transpose(0, 1).to(self.device))

    def _append(self, st: _LayerState, rows: Tensor) -> None:
        # rows [n, H_kv, D]: joined to the partial block, then cut into whole blocks + a new tail
        rows = torch.cat([st.tail, rows.to(st.tail.dtype)])
        n_full = rows.shape[0] // self.block
        full = rows[: n_full * self.block].view(n_full, self.block, *rows.shape[1:])
        for start in range(0, n_full, self.params.block_batch):
            st.vecs.append(block_vectors(full[start : start + self.params.block_batch], self.params.n_repr))
        st.tail = rows[n_full * self.block :].clone()
        st.tail_vec = block_vectors(st.tail[None], self.params.n_repr)[0] if len(st.tail) else None
        st.n_rows = len(st.vecs) * self.block + len(st.tail)

    # ---- search ------------------------------------------------------------------------

    def select(self, layer: int, q: Tensor, budget: int) -> Selection:
        """q [H_q, D] -> Selection(ids [k] shared by all heads; k follows this layer's share)."""
        check_select(q, budget, self.model_cfg)
        st = self.layers.get(layer)
        if st is None or st.n_rows == 0 or budget == 0:
            sel = Selection(ids=torch.empty(0, dtype=torch.long, device=self.device), scanned=0)
            self._stats.record(sel)
            return sel
        probe = self._probe(st, q.to(self.device, torch.float32))  # [H_q, D]
        scores = self._block_scores(st, probe)  # [n_blocks]
        tokens = self.layer_tokens(layer, budget)
        st.entropy[st.step] = normalized_entropy(scores, self.params.temperature)
        st.entropy.pop(st.step - 2, None)
        st.step += 1
        self._stats.extra["tokens"][layer] = tokens
        self._stats.extra["entropy"][layer] = st.entropy[st.step - 1]
        ids = self._expand(scores, tokens, st.n_rows)
        sel = Selection(ids=ids, scanned=scores.numel() * self.model_cfg.n_kv_heads)
        self._stats.record(sel)
        return sel

    def _probe(self, st: _LayerState, q: Tensor) -> Tensor:
        """Push q [H_q, D] into the window and stats; return the phi-weighted window sum [H_q, D]."""
        st.stats.update(q[None])
        win = q[None] if st.window is None else torch.cat([st.window, q[None]])[-self.params.window :]
        st.window = win
        if st.stats.count < 2:
            return win.mean(dim=0)
        phi = activation_bias(win, st.stats.mean.float(), st.stats.var.float(), self.params.var_floor)  # [W, H_q]
        total = phi.sum(dim=0, keepdim=True)
        w = torch.where(total > 0, phi / total.clamp_min(1e-30), torch.full_like(phi, 1.0 / len(win)))
        return (w[..., None] * win).sum(dim=0)

    def _block_scores(self, st: _LayerState, probe: Tensor) -> Tensor:
        """block_scores of every block (complete ones, then the partial one) for probe [H_q, D]: [n_blocks]."""
        parts = [block_scores(vecs, probe, self.params.scoring) for _, vecs in st.vecs.iter_chunks()]
        if st.tail_vec is not None:
            parts.append(block_scores(st.tail_vec[None], probe, self.params.scoring))
        return torch.cat(parts)

    def _expand(self, scores: Tensor, tokens: int, n_rows: int) -> Tensor:
        """Best blocks covering `tokens` (whole blocks, at least one), each with `halo` rows of
        its neighbours on both sides -> sorted row ids [k], k <= max(tokens, block + 2 * halo)."""
        n_blocks = min(max(tokens // self.block, 1), scores.numel())
        if n_blocks * self.block >= n_rows:
            return torch.arange(n_rows, device=self.device)
        top = torch.topk(scores, n_blocks).indices
        if self.halo:
            return self._with_halo(top, tokens, n_rows)
        ids = (top[:, None] * self.block + torch.arange(self.block, device=self.device)).flatten()
        return torch.sort(ids[ids < n_rows]).values

    def _with_halo(self, ranked: Tensor, tokens: int, n_rows: int) -> Tensor:
        """Spans [b * block - halo, (b + 1) * block + halo) of the blocks `ranked` [m] (best
        first), taken in rank order while their union fits in `tokens` (the first always).

        The walk is over host integers (halo_spans): one device read of `ranked`, not one per
        block (a device bitmap cost a sync and a launch per block, ~100 per layer and step)."""
        spans = halo_spans(ranked.tolist(), self.block, self.halo, tokens, n_rows)
        ids = torch.cat([torch.arange(lo, hi, dtype=torch.long) for lo, hi in spans])
        return ids.to(self.device)

    # ---- cross-layer budget split ----------------------------------------------------------

    def _entropies(self, step: int) -> list[Tensor | float | None]:
        """Each layer's entropy at `step` as stored (None where it has none)."""
        return [st.entropy.get(step) if (st := self.layers.get(layer)) is not None else None
                for layer in range(self.model_cfg.n_layers)]

    def layer_shares(self, step: int, budget: int) -> Tensor:
        """Unclipped token shares [n_layers] fp64 for `step`, from each layer's entropy at step - 1.

        They sum to n_layers * budget; the first step (no entropies yet) splits evenly. The
        entropies left on the device are read together, in one transfer.
        """
        n_layers = self.model_cfg.n_layers
        found = {layer: e for layer, e in enumerate(self._entropies(step - 1)) if e is not None}
        on_device = [e for e in found.values() if isinstance(e, Tensor)]
        read = iter(torch.stack(on_device).tolist() if on_device else [])
        known = {layer: next(read) if isinstance(e, Tensor) else e for layer, e in found.items()}
        neutral = sum(known.values()) / len(known) if known else 1.0
        e = torch.tensor([known.get(layer, neutral) for layer in range(n_layers)], dtype=torch.float64)
        if float(e.sum()) <= 0:  # every layer perfectly peaked: no signal, split evenly
            e = torch.ones_like(e)
        return n_layers * budget * e / e.sum()

    def layer_tokens(self, layer: int, budget: int) -> int:
        """Tokens layer `layer` selects at its current step: its share, clipped."""
        if not self.params.dynamic_cutoff:
            return budget
        step = self.layers[layer].step if layer in self.layers else 0
        share = self._layer_split(step, budget)[layer]
        hi = self.params.max_factor * budget
        lo = min(self.params.min_tokens, hi)
        return int(min(max(share, lo), hi))

    def _layer_split(self, step: int, budget: int) -> list[float]:
        """layer_shares(step, budget) as floats, computed by the first layer of a step to ask and
        kept while the entropies it read are the ones stored: one read per step, not one per layer
        (each a wait for the device)."""
        seen = self._entropies(step - 1)
        split = self._split
        stale = split is None or any(a is not b for a, b in zip(split[1], seen, strict=True))
        if stale or split[0] != (step, budget):
            split = self._split = ((step, budget), seen, self.layer_shares(step, budget).tolist())
        return split[2]

    def stats(self) -> dict[str, Any]:
        entropy = self._stats.extra["entropy"]
        self._stats.extra["entropy"] = {layer: float(e) for layer, e in entropy.items()}  # read here, once
        return self._stats.as_dict()

    def state_dict(self, host: bool = True) -> dict[str, Any]:
        """Each layer's query statistics, query window, step and recent entropies, and the
        counters; the block vectors are rebuilt from the host tier's keys by build() on load.
        Tensors are fp64 statistics [H_q, D] and the fp32 window [w, H_q, D], on the host or
        (host=False) copied on the device (base.state_tensor)."""
        s = self._stats
        out: dict[str, Any] = {**s.counts(host),
                               "tokens": [[int(k), int(v)] for k, v in s.extra["tokens"].items()],
                               "entropy": [[int(k), _entropy(v, host)]
                                           for k, v in s.extra["entropy"].items()]}
        for layer, st in self.layers.items():
            p = f"layer{layer}."
            out.update({p + "step": st.step, p + "count": st.stats.count,
                        p + "entropies": [[int(k), _entropy(v, host)] for k, v in st.entropy.items()]})
            for name, t in (("mean", st.stats.mean), ("m2", st.stats.m2), ("window", st.window)):
                if t is not None:
                    out[p + name] = state_tensor(t, host)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state_dict() (after build() of every layer it names)."""
        s = self._stats
        s.load_counts(state)
        s.extra["tokens"] = {int(k): int(v) for k, v in state["tokens"]}
        s.extra["entropy"] = {int(k): _entropy(v, False) for k, v in state["entropy"]}
        for key in state:
            if not key.endswith(".step"):
                continue
            layer = int(key.removeprefix("layer").split(".")[0])
            p, st = f"layer{layer}.", self.layers[layer]
            st.step = int(state[p + "step"])
            st.entropy = {int(k): _entropy(v, False) for k, v in state[p + "entropies"]}
            mean, m2, window = (state.get(p + n) for n in ("mean", "m2", "window"))
            st.stats = QueryStats(int(state[p + "count"]), None if mean is None else mean.to(self.device),
                                   None if m2 is None else m2.to(self.device))
            st.window = None if window is None else window.to(self.device)


def _entropy(value: Tensor | float, host: bool) -> Tensor | float:
    """An entropy for a state_dict: a float on the host (host=True), else as it is (a device
    tensor stays there: a mark before each call reads nothing)."""
    return float(value) if host or not isinstance(value, Tensor) else value


def normalized_entropy(scores: Tensor, temperature: float) -> Tensor:
    """Entropy of softmax(scores / temperature) over n blocks, divided by log(n) (1.0 when n < 2):
    a 0-dim fp64 tensor on the scores' device (read when the next step splits its budget)."""
    n = scores.numel()
    if n < 2:
        return torch.ones((), dtype=torch.float64, device=scores.device)
    logp = torch.log_softmax(scores.double() / temperature, dim=0)
    return -(logp.exp() * logp).sum() / math.log(n)

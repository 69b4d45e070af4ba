"""Exact top-k retrieval: the ground truth every other method is measured against.

Per KV head, each host key j is ranked by the logits q_h · k_j of the query heads h
of its GQA group, combined by `RetrievalConfig.gqa_reduce`: "max" (default; a key that
matters to any head of the group is kept) or "sum". Keys are scanned from a copy kept on
the retriever's device (a GPU key mirror on CUDA, all its chunks in one launch:
index/key_scan.py), so the cost is one pass over all keys: N * H_kv * D * bytes per step.

options={"rank": "prob"} ranks by each head's log-probability instead (logit minus that
head's log-sum-exp over the host keys; then the group's max): raw logits compare heads on
their own scales, and on Qwen2.5-0.5B (GQA 7 heads a group) the heads with the larger
logits took the shared slots of layers 0, 1 and 4, whose mass recall at budget 2048 went
0.93-0.94 -> 0.96-0.98 ranked by probability (docs/methods.md, "Limits"). It keeps a
[H_q, N] fp32 logit buffer for the step. With `RetrievalConfig.max_similar`
the top-k takes at most that many near-identical keys per KV head (index/diversity.py).

A batched decode step searches its sessions' exact retrievers together on CUDA (select_batch:
every row's key copy scored in one launch through one address table, kernels/scoring_batched.py,
then one top-k over the -inf padded scores).

On the CPU the retriever searches the session's host tier in place (attach_host_tier;
options={"keys_on": "device"} keeps a copy instead, as on CUDA): no second copy of every host
key, nothing to add while decoding, and the per-head logits it ranked every row by are the
attention's logits for those rows, so the selection hands them over (Selection.logits) and
the CPU decode step reads the selected rows' logits instead of gathering their keys and
multiplying again (kernels/cpu_decode.py). Ranked by the group max (the default), the decode
step's search and attention are one compiled pass over the rows of a batched step
(scans_in_place: runtime/batch_host.py, kernels/cpu_rows.py), equal to select() and that
attention row for row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from kvloft.config import ModelConfig, RetrievalConfig
from kvloft.index.base import RetrieverStats, Selection, check_keys, check_select, register
from kvloft.index.diversity import capped_topk, similarity_buckets
from kvloft.index.key_scan import scan_store
from kvloft.kernels import cpu_rank, cpu_rows, cpu_score, reference
from kvloft.tiers.chunked import ChunkedRows


@register("exact")
class ExactRetriever:
    batched_select = True  # select_batch on CUDA (search_key None elsewhere: each row alone)
    needs_queries = False  # ranks keys by the live query only
    small_state = True  # state_dict() is O(budget) per layer: a session keeps it to roll back a failed call

    def __init__(self, cfg: RetrievalConfig, model_cfg: ModelConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.device = device
        self.chunk_rows = int(cfg.options.get("chunk_rows", 16384))
        self.rank = cfg.options.get("rank", "logit")
        if self.rank not in ("logit", "prob"):
            raise ValueError(f"exact option rank must be 'logit' or 'prob', got {self.rank!r}")
        self.keys_on = cfg.options.get("keys_on", "host" if self.device.type == "cpu" else "device")
        if self.keys_on not in ("host", "device") or (self.keys_on == "host" and self.device.type != "cpu"):
            raise ValueError(f"exact option keys_on must be 'device', or 'host' on the CPU (the host tier searched "
                             f"in place), got {self.keys_on!r} on {self.device.type}")
        self.keys: dict[int, ChunkedRows] = {}  # a copy of the keys, per layer not attached
        self.tiers: dict[int, Any] = {}  # LayerTiers searched in place, per layer attached
        self._stats = RetrieverStats()

    def _store(self, layer: int, dtype: torch.dtype) -> ChunkedRows:
        if layer not in self.keys:
            shape = (self.model_cfg.n_kv_heads, self.model_cfg.head_dim)
            self.keys[layer] = ChunkedRows(shape, dtype, self.chunk_rows, self.device)
        return self.keys[layer]

    def attach_host_tier(self, layer: int, tiers: Any) -> bool:
        """keys_on="host": search the session's host tier (tiers/layer_tiers.py LayerTiers) in place
        instead of a copy of its keys. Returns False (the runtime then calls build) where its
        rows are not model-dtype rows in memory: stored 8-bit (CacheConfig.host_dtype) or
        spilled to a disk tier (the copy keeps the search off the disk)."""
        if self.keys_on != "host" or getattr(tiers, "host_dtype", None) is not None:
            return False
        if tiers.host_k.spill is not None:
            return False
        self.keys.pop(layer, None)
        self.tiers[layer] = tiers
        return True

    def _keys_of(self, layer: int) -> ChunkedRows | None:
        if layer in self.tiers:
            return self.tiers[layer].host_k
        return self.keys.get(layer)

    def build(self, layer: int, keys: Tensor, queries: Tensor | None) -> None:
        # keys [H_kv, N, D] -> stored token-major [N, H_kv, D]
        check_keys(keys, self.model_cfg)
        self.tiers.pop(layer, None)
        self.keys.pop(layer, None)
        self._store(layer, keys.dtype).append_from(keys.transpose(0, 1))

    def add(self, layer: int, keys: Tensor, positions: Tensor) -> None:
        check_keys(keys, self.model_cfg)
        if layer in self.tiers:  # the tier holds the rows already
            return
        self._store(layer, keys.dtype).append_from(keys.transpose(0, 1))

    def scores(self, layer: int, q: Tensor) -> Tensor:
        """Group-reduced logits of every stored key: q [H_q, D] -> [H_kv, N] fp32."""
        return self._rank(layer, q)[0]

    def _rank(self, layer: int, q: Tensor) -> tuple[Tensor, Tensor | None]:
        """q [H_q, D] -> (group-reduced ranking scores [H_kv, N] fp32, the per-head logits
        q·k [H_q, N] fp32 where they were computed whole, else None)."""
        store = self._keys_of(layer)
        hkv = self.model_cfg.n_kv_heads
        if store is None or len(store) == 0:
            return torch.empty((hkv, 0), dtype=torch.float32, device=self.device), None
        q = q.to(self.device)
        scale = self.model_cfg.head_dim**-0.5  # the softmax attention will take
        if self.device.type != "cpu":  # one launch over the mirror's chunks, the group folded in registers
            if self.rank == "prob":
                return self._logp_reduced(scan_store(q, store, scale=scale)), None
            return scan_store(q, store, reduce=self.cfg.gqa_reduce), None
        logits = scan_store(q, store)  # [H_q, N] fp32, unscaled
        if self.rank == "prob":
            return self._logp_reduced(logits * scale), logits
        return reference.reduce_group(logits, hkv, self.cfg.gqa_reduce), logits

    def _logp_reduced(self, logits: Tensor) -> Tensor:
        """Scaled logits [H_q, N] -> each head's log-probabilities, reduced over its group [H_kv, N]."""
        logp = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        return reference.reduce_group(logp, self.model_cfg.n_kv_heads, self.cfg.gqa_reduce)

    def select(self, layer: int, q: Tensor, budget: int) -> Selection:
        """q [H_q, D] -> Selection(ids [H_kv, k]); with the host tier attached, its logits
        [H_q, N] (unscaled q·k of every host row) come along for the attention."""
        sel = self._select_compiled(layer, q, budget)
        if sel is not None:
            return sel
        s, logits = self._rank(layer, q)
        n = s.shape[1]
        padded = False
        if budget >= n:  # a budget covering the host tier selects all of it
            ids = torch.arange(n, device=s.device)[None].expand(s.shape[0], -1).contiguous()
        elif self.cfg.max_similar:
            buckets = torch.cat([similarity_buckets(chunk, self.cfg.similar_bits)
                                 for _, chunk in self._keys_of(layer).iter_chunks()], dim=1)
            ids, padded = capped_topk(s, buckets, budget, self.cfg.max_similar), True
        else:
            # in no order on the CPU (attention does not care; sorting 1K of 1.5K ids cost 3x the pick)
            ids = torch.topk(s, budget, dim=-1, sorted=s.device.type != "cpu").indices
        sel = Selection(ids=ids, scanned=n * s.shape[0], padded=padded,
                        logits=logits if layer in self.tiers else None)
        self._stats.record(sel)
        return sel

    def _select_compiled(self, layer: int, q: Tensor, budget: int) -> Selection | None:
        """select on the CPU with fp32 logits ranked by the group max: the group max and the
        top-k in one compiled pass on the caller's thread (kernels/cpu_rank.py; the torch route's
        amax and topk each wait on the OpenMP threads under load). None where it does not apply."""
        if self.device.type != "cpu" or self.rank != "logit" or self.cfg.gqa_reduce != "max" \
                or self.cfg.max_similar:
            return None
        store = self._keys_of(layer)
        if store is None or len(store) <= budget:
            return None
        logits = scan_store(q.to(self.device), store)  # [H_q, N] fp32, unscaled
        hkv = self.model_cfg.n_kv_heads
        if not cpu_rank.applies(logits, hkv, budget):
            return None
        ids = cpu_rank.group_max_topk(logits, hkv, budget)
        if ids is None:
            return None
        sel = Selection(ids=ids, scanned=logits.shape[1] * hkv, padded=False,
                        logits=logits if layer in self.tiers else None)
        self._stats.record(sel)
        return sel

    def scans_in_place(self, layer: int) -> bool:
        """This layer's search can run as the CPU decode step's compiled pass over the host tier
        (runtime/batch_host.py, kernels/cpu_rows.py): the host tier attached and searched in
        place, fp32, logits ranked by the group max with the compiled ranking."""
        tiers = self.tiers.get(layer)
        return (tiers is not None and self.device.type == "cpu" and self.rank == "logit"
                and self.cfg.gqa_reduce == "max" and not self.cfg.max_similar and cpu_rank.enabled
                and cpu_score.enabled and cpu_rows.enabled and tiers.host_k.dtype == torch.float32)

    def record_selection(self, sel: Selection) -> None:
        """Count a selection made for this retriever outside select() (runtime/batch_host.py)."""
        self._stats.record(sel)

    def record_fixed(self, n_keys: int, budget: int) -> None:
        """Count a selection made on the device inside a captured decode step (runtime/whole_exact.py:
        the top-`budget` of `n_keys` stored keys per KV head) as select() counts its own."""
        hkv = self.model_cfg.n_kv_heads
        ids = torch.zeros((), dtype=torch.int64).expand(hkv, min(budget, n_keys))  # counted, never read
        self._stats.record(Selection(ids=ids, scanned=n_keys * hkv, padded=False))

    def search_key(self) -> tuple[Any, ...] | None:
        """Retrievers with equal keys search together in select_batch; None where this one
        searches alone: off CUDA (the CPU search hands its logits to the attention),
        rank="prob", or max_similar (a per-row top-k)."""
        if self.device.type != "cuda" or self.rank != "logit" or self.cfg.max_similar:
            return None
        m = self.model_cfg
        return (type(self), self.device, self.cfg.gqa_reduce, m.n_heads, m.n_kv_heads, m.head_dim)

    @classmethod
    def select_batch(cls, retrievers: Sequence[ExactRetriever], layer: int, q: Tensor,
                     budgets: Sequence[int]) -> list[Selection]:
        """Each row's select(layer, q[g], budgets[g]) for the rows of a batched decode step:
        every row's keys scored in one launch (kernels/scoring_batched.py: each row's key copy
        through its run of one address table) and one top-k over the -inf padded [G, H_kv, N]
        scores, instead of a launch per key chunk and a top-k per row. q [G, H_q, D]. The
        scores equal each row's own launches bit for bit; a top-k of other length may order
        exactly tied keys otherwise (attention does not care)."""
        if len(retrievers) != q.shape[0] or len(budgets) != q.shape[0]:
            raise ValueError(f"select_batch needs one retriever and budget per query row; got {len(retrievers)} "
                             f"retrievers, {len(budgets)} budgets, q {tuple(q.shape)}")
        out: list[Selection | None] = [None] * len(retrievers)
        rows = []
        for g, (r, budget) in enumerate(zip(retrievers, budgets, strict=True)):
            check_select(q[g], budget, r.model_cfg)
            store = r._keys_of(layer)
            n = 0 if store is None else len(store)
            if n == 0 or budget >= n or not _scans_in_place(store):
                out[g] = r.select(layer, q[g], budget)
            else:
                rows.append((g, r, store, budget))
        if len(rows) == 1:
            g, r, _, budget = rows[0]
            out[g] = r.select(layer, q[g], budget)
        elif rows:
            for (g, r, store, _), sel in zip(rows, _search_rows(rows, q), strict=True):
                r._stats.record(sel)
                out[g] = sel
        return out  # type: ignore[return-value]

    def stats(self) -> dict[str, Any]:
        return self._stats.as_dict()

    def state_dict(self, host: bool = True) -> dict[str, Any]:
        """Counters only: the key mirror is rebuilt from the host tier by build() on load
        (host=False: the selected count may stay a device tensor, RetrieverStats.counts)."""
        return self._stats.counts(host)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state_dict() (after build() of every layer)."""
        self._stats.load_counts(state)


def _scans_in_place(store: ChunkedRows) -> bool:
    """The batched kernel reads the store's chunks through their addresses in blocks that
    never straddle two chunks (chunk_rows a multiple of the kernel's BLOCK_N)."""
    from kvloft.kernels.scoring import BLOCK_N

    return store.chunk_rows % BLOCK_N == 0 and getattr(store, "host_dtype", None) is None


def _search_rows(rows: list[tuple[int, ExactRetriever, ChunkedRows, int]], q: Tensor) -> list[Selection]:
    """The selections of G >= 2 rows (index g into q, retriever, key store, budget) in one scoring
    launch and one top-k."""
    from kvloft.kernels.scoring_batched import score_batched

    r0 = rows[0][1]
    dev = r0.device
    stores = [st for _, _, st, _ in rows]
    offsets = [0]
    for st in stores[:-1]:
        offsets.append(offsets[-1] + len(st.chunks))
    lengths = [len(st) for st in stores]
    meta = torch.tensor([lengths, offsets, [st.chunk_rows for st in stores]], dtype=torch.int64)
    table = torch.cat([st.pointer_table(dev) for st in stores])
    g_rows = [g for g, _, _, _ in rows]
    qg = q if g_rows == list(range(q.shape[0])) else q[torch.tensor(g_rows, device=q.device)]
    scores = score_batched(qg.to(dev), table, stores[0].chunks[0], meta.to(dev, non_blocking=True), max(lengths),
                           reduce=r0.cfg.gqa_reduce)  # [G, H_kv, N_max]
    k_max = max(budget for _, _, _, budget in rows)
    ids = torch.topk(scores, k_max, dim=-1, sorted=True).indices  # [G, H_kv, k_max]
    hkv = scores.shape[1]
    return [Selection(ids=ids[i, :, :budget], scanned=n * hkv, padded=False)
            for i, ((_, _, _, budget), n) in enumerate(zip(rows, lengths, strict=True))]

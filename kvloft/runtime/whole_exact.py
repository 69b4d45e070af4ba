"""Tiered rows inside the whole decode step (runtime/whole_step.py): exact retrieval over a key copy on the device.

A tiered row (TieredAttention: sink + ring on the device, older rows in the host tier) fits a
captured step once three things are out of the layer:

  rows moving down   the plan phase moved them already (TieredAttention.make_room): the layer
                     only writes its token into the freed static slot, through address tables
                     (kernels/table_rows.py, its position too)
  the selection      exact with keys_on="device" keeps every host row's key in chunks on the
                     device (index/exact.py); scoring them is a fixed-shape launch over a
                     capacity `cap` (kernels/scoring_batched.py: the chunks through an address
                     table, the count of keys read on the device, -inf past it), then a top-k
                     of a fixed width (the largest budget), -1 where a row has fewer keys
  the attention      two fixed launches (kernels/batched_decode.py attend_table_fixed): the
                     static tier's filled prefix, and the selected host rows read in place
                     through a table of the host tier's chunks (pinned on CUDA); their
                     (out, lse) merged exactly (kernels/merge.py on CUDA)

Per layer and row the host fills, beside the dense columns (the static tier's K/V addresses,
the slot, the prefix count): the position buffer's address, [3] scoring metadata (keys,
table offset, chunk rows), [5] host-row metadata (slot base, chunk rows, 0, 0, the rows the
row reads: min(budget, n_host)), the key copy's chunk addresses [kc] and the host tier's K
and V chunk addresses [hc] each. `cap`, `kc`, `hc` and the width are the graph's shape
(`ExactShape`, powers of two over the batch's largest row: a row past them makes a new
capture). A dense row in the same batch reads its buffer as its static tier and no host rows.

Equal to the segmented step: the same rows selected (the top-k of the same group-reduced
logits; exactly tied keys may break otherwise), the same softmax split in two parts and merged.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from kvloft.index.exact import ExactRetriever
from kvloft.kernels import reference
from kvloft.kernels.batched_decode import attend_table_fixed
from kvloft.kernels.merge import merge
from kvloft.kernels.scoring import BLOCK_N
from kvloft.kernels.scoring_batched import score_batched
from kvloft.runtime.attention import TieredAttention

__all__ = ["MAX_CAP", "ExactShape", "ExactTables", "exact_route", "exact_shape", "shape_why"]

MAX_CAP = 1 << 24  # host rows a row may hold in the captured step (the scores are [B, H_kv, cap] fp32)
_FIXED = 1 + 3 + 5  # per layer and row: the position buffer, the scoring meta [3], the host-row meta [5]


class ExactShape(NamedTuple):
    """The sizes a captured step of tiered rows is made for."""

    cap: int  # score columns: the most host rows any row may hold (a power of two >= BLOCK_N)
    width: int  # top-k width: the largest budget of the batch
    kc: int  # key-copy chunks per row in the table
    hc: int  # host-tier chunks per row in the table
    reduce: str  # gqa_reduce of every row's ranking

    def columns(self, batch: int) -> int:
        """int64 numbers per layer of the step's table."""
        return batch * (_FIXED + self.kc + 2 * self.hc)

    def tables(self, batch: int, n_layers: int, flat: Tensor) -> ExactTables:
        """The step's tiered columns over flat [n_layers * columns(batch)] int64."""
        return ExactTables(self, batch, n_layers, flat)


def exact_route(be: TieredAttention) -> str | None:
    """Why `be`'s decode step cannot run inside the whole step, or None where it can: exact
    retrieval at true positions with its keys on the device, rows read in place, every layer
    indexed, host rows in the model dtype in memory, no finite watch."""
    r, rc = be.retriever, be.rcfg
    if type(r) is not ExactRetriever:
        return (f"its retriever ({type(r).__name__}) selects with host work or sizes that vary; of the "
                "tiered routes only exact with keys_on='device' and hip are captured")
    if rc.position_mode != "exact":
        return "extrapolate mode remaps the positions of the rows it selects per step"
    if not be.plans_room():
        return "its rows are fetched by the scheduler (OverlapFetch), not read in place"
    if r.keys_on != "device":
        return "exact searches the host tier in place (keys_on='host'); keys_on='device' is captured"
    if r.rank != "logit" or rc.max_similar:
        return "exact with rank='prob' or max_similar selects per row on the host"
    if r.chunk_rows % BLOCK_N:
        return f"exact's key chunks (option chunk_rows={r.chunk_rows}) must be a multiple of {BLOCK_N} rows"
    if be.finite.on:
        return "the backend watches appended rows for non-finite numbers (a host check)"
    if not all(be.built) or be.attached:
        return "a layer's index is not built (or searches the host tier in place)"
    if be.cache.host_dtype is not None or be.cache.spill_dir is not None:
        return "its host tier is 8-bit or spills to disk (the step reads model-dtype rows in memory)"
    return None


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def shape_why(backends: list[Any]) -> str | None:
    """Why these rows (each with a captured route, tiered ones exact) cannot share one step, or None."""
    tiered = [be for be in backends if isinstance(be, TieredAttention)]
    if len({be.retriever.cfg.gqa_reduce for be in tiered}) > 1:
        return "the rows' exact retrievers reduce their GQA groups differently (gqa_reduce)"
    n_host = max((be.cache.layers[0].n_host for be in tiered), default=0)
    if n_host > MAX_CAP:
        return f"a row holds {n_host} host rows, over the captured step's {MAX_CAP}"
    return None


def exact_shape(backends: list[Any]) -> Any:
    """The shape a step of these rows (tiered ones exact) needs (after their make_room), None
    where none is tiered."""
    tiered = [be for be in backends if isinstance(be, TieredAttention)]
    if not tiered:
        return None
    width = max(max(be.rcfg.budget for be in tiered), 1)
    n_host = max(t.n_host for be in tiered for t in be.cache.layers)
    cap = _pow2(max(n_host, width, BLOCK_N))
    kc = max(-(-cap // be.retriever.chunk_rows) for be in tiered)
    hc = max(-(-cap // be.cache.host_chunk) for be in tiered)
    return ExactShape(cap, _pow2(width), kc, hc, tiered[0].retriever.cfg.gqa_reduce)


class ExactTables:
    """The tiered columns of a step's table (views into its device buffer) and the launches that
    read them. flat: [L * shape.columns(batch)] int64 on the device."""

    def __init__(self, shape: ExactShape, batch: int, n_layers: int, flat: Tensor) -> None:
        self.shape, self.batch, self.n_layers = shape, batch, n_layers
        nb, kc, hc = batch, shape.kc, shape.hc
        per = flat.view(n_layers, shape.columns(batch))  # [L, columns]
        self.p_tab = per[:, :nb]  # [L, B] position buffer addresses (0: none)
        self.score_meta = [per[i, nb : 4 * nb].view(3, nb) for i in range(n_layers)]  # [3, B] each
        self.host_meta = [per[i, 4 * nb : 9 * nb].view(nb, 5) for i in range(n_layers)]  # [B, 5] each
        a = 9 * nb
        self.key_tab = per[:, a : a + nb * kc]  # [L, B * kc]
        self.hk_tab = per[:, a + nb * kc : a + nb * (kc + hc)]  # [L, B * hc]
        self.hv_tab = per[:, a + nb * (kc + hc) : a + nb * (kc + 2 * hc)]  # [L, B * hc]
        self.pattern: tuple[int, ...] | None = None  # the step's graph key past (bucket, shape): one for exact rows

    # ---- the host's part ---------------------------------------------------------------------

    def host_columns(self, backends: list[Any]) -> np.ndarray:
        """[L, columns] int64: every tiered row's numbers (after its make_room); dense rows and
        padding rows read no host rows and keep no positions."""
        sh, nb, nl = self.shape, self.batch, self.n_layers
        out = np.zeros((nl, sh.columns(nb)), dtype=np.int64)
        meta = out[:, 4 * nb : 9 * nb].reshape(nl, nb, 5)
        meta[:, :, 1] = 1  # a row without host rows: one-row slots, nothing read
        out[:, 3 * nb : 4 * nb] = 1  # and one-row key chunks (no key scored; never a division by 0)
        for b, be in enumerate(backends):
            if isinstance(be, TieredAttention):
                for layer in range(nl):
                    self._fill(out[layer], b, be, layer)
        return out

    def _fill(self, col: np.ndarray, b: int, be: TieredAttention, layer: int) -> None:
        """Row b's numbers of one layer into col [columns]."""
        n = be.cache.layers[layer].n_host
        self._fill_rows(col, b, be, layer, be.retriever.keys[layer], min(be.rcfg.budget, n))

    def _fill_rows(self, col: np.ndarray, b: int, be: TieredAttention, layer: int, store: Any, n_read: int) -> None:
        """Row b's numbers of one layer into col [columns]: store the key copy (ChunkedRows) the
        search reads, None where it reads the host tier's own keys (no wait on the host for the
        copy down: the replay's stream waits); n_read the selected host rows the attention reads."""
        sh, nb = self.shape, self.batch
        tiers = be.cache.layers[layer]
        stream = torch.cuda.current_stream(tiers.k.device) if tiers.k.is_cuda else None
        host = list(tiers.host_chunk_pairs(stream))  # the replay waits for the copy down in flight
        n = tiers.n_host if store is None else len(store)
        assert n == tiers.n_host and n <= sh.cap, (n, tiers.n_host, sh.cap)
        col[b] = tiers.pos.data_ptr()
        rows = be.cache.host_chunk if store is None else store.chunk_rows
        col[nb + b], col[2 * nb + b], col[3 * nb + b] = n, b * sh.kc, rows
        col[4 * nb + 5 * b : 4 * nb + 5 * b + 5] = (b * sh.hc, be.cache.host_chunk, 0, 0, n_read)
        a = 9 * nb + b * sh.kc
        chunks = [kc for _, kc, _ in host] if store is None else store.chunks[: -(-n // rows)]
        col[a : a + len(chunks)] = [c.data_ptr() for c in chunks]
        a = 9 * nb + nb * sh.kc + b * sh.hc
        col[a : a + len(host)] = [kc.data_ptr() for _, kc, _ in host]
        a += nb * sh.hc
        col[a : a + len(host)] = [vc.data_ptr() for _, _, vc in host]

    def after(self, be: TieredAttention, b: int) -> None:
        """Row be's (slot b's) counters once the step ran: each layer's token counted in its static
        tier, the selections in the retriever's and the backend's counters (as select() counts them)."""
        hkv = be.cfg.n_kv_heads
        for tiers in be.cache.layers:
            tiers.count_put()
            n = tiers.n_host
            if n and be.rcfg.budget:
                be.retriever.record_fixed(n, be.rcfg.budget)
                be.scanned += n * hkv
        be.room_made.clear()

    # ---- the graph's part --------------------------------------------------------------------

    def select(self, layer: int, q: Tensor, like: Tensor, stages: int | None = None) -> Tensor:
        """q [B, H_q, D] -> ids [B, H_kv, width] int64: each row's top host rows, best first, -1 padded
        (stages: a staged search's refresh pattern of the layer; exact has one pass, run every step)."""
        sh = self.shape
        scores = score_batched(q, self.key_tab[layer], like, self.score_meta[layer], sh.cap,
                               reduce=sh.reduce)  # [B, H_kv, cap] fp32, -inf past each row's keys
        top = torch.topk(scores, sh.width, dim=-1)  # [B, H_kv, width], best first
        return torch.where(top.values > float("-inf"), top.indices, -1)

    def attend(self, layer: int, q: Tensor, like: Tensor, o_s: Tensor, lse_s: Tensor, scale: float,
               splits: int, stages: int | None = None) -> Tensor:
        """q [B, H_q, D] over the static part (o_s [B, H_q, D], lse_s [B, H_q]) and the top-`width`
        host rows of every row -> out [B, H_q, D]. Fixed shapes: capturable. stages: the bits of
        the search stages this layer runs (select's; None: every one)."""
        ids = self.select(layer, q, like, stages)
        o_h, lse_h = attend_table_fixed(q, like, self.hk_tab[layer], self.hv_tab[layer], self.host_meta[layer],
                                        scale=scale, num_splits=splits, ids=ids)
        # the Triton merge on CUDA (one launch), its torch twin elsewhere (the interpreter's programs
        # cost more than the few torch ops of two parts)
        out, _ = (merge if q.is_cuda else reference.merge)([o_s, o_h], [lse_s, lse_h])
        return out

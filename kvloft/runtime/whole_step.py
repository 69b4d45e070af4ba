"""The whole batched decode step as one CUDA graph, for batches whose rows' attention takes fixed shapes.

runtime/graphs.py cuts a step at every attention call (n_layers + 1 graphs, attention eager
in between), because a retriever picks different rows, sizes and host transfers every step.
A row whose attention needs none of that can stay inside the graph: its step is fixed
shapes plus a few numbers (where its buffers are, how many keys it has), and those numbers
can be data in device buffers instead of arguments baked into the launches. `WholeStep`
captures the step once per batch bucket (and, for HiP rows, per refresh pattern):

    host (per step)   the plan's rows -> one int64 table: token, position, and per layer and
                      row its K/V buffer addresses, the row its token goes to, its key count
                      -> one host-to-device copy into the graph's static buffer
    graph (replay)    x = embed(ids); cos, sin = rope(pos)
                      per layer: q, k, v = pre(x)
                                 write_rows_table: k, v into each row's buffers (kernels/table_rows.py)
                                 attend_table_fixed: one launch, each row over its first n_b keys,
                                   read from the device metadata, over a fixed grid
                                 x = post(x, o)
                      logits = head(x)
    host (after)      each row's buffers hold one more token (DenseKV.n += 1)

So a step is one copy and one replay; sequences join and leave and buffers grow (reallocate)
without a new capture: the graph holds no sequence's buffers, only the tables' addresses.
Rows past the batch (padding of the bucket) have key count 0 and write nothing.

Which routes can be captured is declared here per backend type (ROUTES), never probed:
dense attention can (every key on the compute device, contiguous, one buffer a layer);
TieredAttention can where its retriever is exact with its keys on the device (whole_exact.py
exact_route): the rows its ring displaces moved down in the plan phase (make_room), the
layer writes its token into the freed slot, scores the key copy over a fixed capacity, takes
the top-k of a fixed width and attends to the static tier and the selected host rows in two
fixed launches, merged (whole_exact.py); and where its retriever is HiP with the Triton stage
kernels (whole_hip.py tiered_route), keys on the device or read in place from the host tier:
the plan phase computes which stages refresh and every count of the search, the graph runs
each stage as one fixed-grid launch over the batch, its masks kept in the step's buffer; only
the (layer, stage) pairs some row refreshes this step are in the graph: one graph per refresh
pattern, an LRU of them beside the graph of every stage (whole_graphs.py).
Other retrievers select per layer on the host or with sizes that vary: the engine runs the
segmented graphs for them. A batch with a tiered
row runs the tiered graph (its dense rows read no host rows); a dense batch the dense one.
The same code runs eagerly (capture=False): on the CPU through the Triton interpreter, which
is how it is tested.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kvloft.index.hip import HipRetriever
from kvloft.kernels import checks
from kvloft.kernels.batched_decode import attend_table_fixed, fixed_splits
from kvloft.kernels.sparse_decode import _split_kernel
from kvloft.kernels.table_rows import write_rows_table
from kvloft.runtime import whole_graphs
from kvloft.runtime.attention import TieredAttention
from kvloft.runtime.dense import DenseAttention
from kvloft.runtime.model import Transformer
from kvloft.runtime.whole_exact import ExactShape, exact_shape, shape_why
from kvloft.runtime.whole_hip import HipShape, hip_shape, hip_shape_why, tiered_route

__all__ = ["ROUTES", "WholeStep", "captured_route", "graph_counts", "not_whole", "step_shape"]

# backend type -> why its decode cannot be captured (None: it can; a function: asks the backend).
# A type not listed cannot.
ROUTES: dict[type, str | None | Callable[[Any], str | None]] = {
    DenseAttention: None,
    TieredAttention: tiered_route,
}
_TIERED_WHY = ("tiered attention appends to a ring whose evictions copy rows to the host tier, and its "
               "retriever selects per layer with host work or varying sizes")
_COLUMNS = 3  # per layer, a [B] column each: k buffer addresses, v buffer addresses, the rows written


def captured_route(backend: Any) -> str | None:
    """Why `backend`'s decode step cannot run inside a captured whole step, or None where it can
    (ROUTES, by exact type: a subclass may change the route; dense attention with its finite
    watch on checks every appended row on the host)."""
    kind = type(backend)
    if kind not in ROUTES:
        return _TIERED_WHY if hasattr(backend, "cache") else f"{kind.__name__} declares no captured route"
    why = ROUTES[kind]
    if callable(why):
        return why(backend)
    if why is None and backend.finite.on:
        return "the backend watches appended rows for non-finite numbers (a host check)"
    return why


def not_whole(backends: list[Any], device: torch.device) -> str | None:
    """Why a batch of rows with these backends cannot run as one whole step on `device` (the
    first reason), or None where it can. The step's kernels are Triton: CUDA, or the CPU
    through the interpreter only."""
    if device.type != "cuda" and not checks.is_interpreted(_split_kernel):
        return "the whole step's Triton kernels need CUDA (or the Triton interpreter on the CPU)"
    for b, be in enumerate(backends):
        why = captured_route(be)
        if why is not None:
            return f"row {b}: {why}"
    tiered = _tiered(backends)
    if len({type(be.retriever) for be in tiered}) > 1:
        return "the batch's tiered rows retrieve with different methods (exact and hip: two steps' shapes)"
    return hip_shape_why(tiered) if _is_hip(tiered) else shape_why(backends)


def step_shape(backends: list[Any]) -> ExactShape | HipShape | None:
    """The shape of the whole step these rows need (after their make_room; not_whole said None):
    None for dense rows only, else the exact or the HiP step's sizes."""
    tiered = _tiered(backends)
    return hip_shape(tiered) if _is_hip(tiered) else exact_shape(backends)


def graph_counts(wholes: Iterable[WholeStep]) -> dict[str, int]:
    """The graphs of these whole steps, summed (whole_graphs.py PatternGraphs.counts): held now,
    patterns admitted to an LRU, CUDA graphs captured, evicted, steps run by the graph of every
    stage because an LRU was full."""
    out = {"held": 0, "patterns": 0, "captures": 0, "evictions": 0, "fallbacks": 0}
    for w in wholes:
        out["held"] += w.graphs.held
        for k, v in w.graphs.counts.items():
            out[k] += v
    return out


def _tiered(backends: list[Any]) -> list[TieredAttention]:
    return [be for be in backends if isinstance(be, TieredAttention)]


def _is_hip(tiered: list[TieredAttention]) -> bool:
    return bool(tiered) and type(tiered[0].retriever) is HipRetriever


class WholeStep:
    """Decode steps of `net` for `batch` rows (the bucket) whose backends declare a captured
    route, as one CUDA graph when `capture` (see the module doc), else the same code eagerly.
    shape: None for dense rows only; the sizes of the tiered step (whole_exact.py exact_shape)
    where a row is tiered."""

    def __init__(self, net: Transformer, capture: bool, batch: int, shape: ExactShape | HipShape | None = None) -> None:
        w = net.embed_tokens.weight
        if capture and w.device.type != "cuda":
            raise ValueError("CUDA graphs need a model on a CUDA device; use capture=False")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be an int >= 1, got {batch!r}")
        cfg = net.config
        self.net, self.capture, self.batch = net, capture, batch
        self.n_layers = len(net.layers)
        self.scale = cfg.head_dim**-0.5  # DenseAttention's
        self.like = torch.empty((1, cfg.n_kv_heads, cfg.head_dim), dtype=w.dtype, device=w.device)  # row layout
        self.splits = fixed_splits(cfg.n_kv_heads, batch, w.device)
        # one buffer, one copy per step: ids [B], pos [B], then [L, _COLUMNS, B] columns and meta [L, B, 5]
        nl = self.n_layers
        self.shape = shape
        dense_end = 2 * batch + nl * batch * (_COLUMNS + 5)
        extra = 0 if shape is None else nl * shape.columns(batch)
        self._flat = torch.zeros(dense_end + extra, dtype=torch.int64, device=w.device)
        self.ids, self.pos = self._flat[:batch], self._flat[batch : 2 * batch]
        cols = self._flat[2 * batch : 2 * batch + nl * batch * _COLUMNS].view(nl, _COLUMNS, batch)
        self.k_tab, self.v_tab, self.rows = cols[:, 0], cols[:, 1], cols[:, 2]  # [L, B] each, rows contiguous
        self.meta = self._flat[2 * batch + nl * batch * _COLUMNS : dense_end].view(nl, batch, 5)  # [L, B, 5]
        self.exact = None if shape is None else shape.tables(batch, nl, self._flat[dense_end:])
        # one graph per refresh pattern of the step (whole_graphs.py), read at construction:
        # whole_graphs.MAX_PATTERN_GRAPHS (tests set it small)
        self.graphs = whole_graphs.PatternGraphs(self._forward, capture, whole_graphs.MAX_PATTERN_GRAPHS)
        self.read_why: str | None = None

    def share_buffers(self, other: WholeStep) -> bool:
        """Take `other`'s HiP stable-part buffers where they fit this step (same layers, bucket and
        width; the capacity may differ): one set per engine and bucket, not one per shape (they
        hold rows of host tiers, and their host record says whose mask: whole_stable.py); and its
        rank="z" statistics buffers where both steps have them (same layers and bucket: per-step
        data the plan rewrites). Call before this step's first run. Returns whether the stable
        buffers were taken."""
        z_mine, z_theirs = getattr(self.exact, "z", None), getattr(other.exact, "z", None)
        if z_mine is not None and z_theirs is not None and z_mine.cov is None \
                and (z_mine.n_layers, z_mine.batch) == (z_theirs.n_layers, z_theirs.batch):
            self.exact.z = z_theirs
        mine, theirs = getattr(self.exact, "stable", None), getattr(other.exact, "stable", None)
        if mine is None or theirs is None or mine is theirs:
            return False
        if (mine.n_layers, mine.batch, mine.width) != (theirs.n_layers, theirs.batch, theirs.width):
            return False
        self.exact.stable = theirs
        return True

    @property
    def buffer_bytes(self) -> int:
        """Device bytes this step holds outside its graphs' pool (whose intermediates are the
        pool's): its table, HiP rows' mask buffers, and the stable-part and rank="z" statistics
        buffers it uses (whole_stable.py, whole_hip.py ZBuffers; shared with the engine's other
        steps of its bucket (and width): `stable_buffers`, `z_buffers` name them, to count each once)."""
        ex, n = self.exact, self._flat.numel() * 8
        if self.stable_buffers is not None:
            n += ex.masks.numel() * 8 + self.stable_buffers.nbytes
        if self.z_buffers is not None:
            n += self.z_buffers.nbytes
        return n

    @property
    def stable_buffers(self) -> Any:
        """The HiP rows' StableRows this step uses (None: no HiP shape)."""
        return getattr(self.exact, "stable", None)

    @property
    def z_buffers(self) -> Any:
        """The rank="z" rows' statistics buffers this step uses (whole_hip.py ZBuffers; None: none,
        shared like the stable ones: count each once)."""
        return getattr(self.exact, "z", None)

    # ---- the host's part ---------------------------------------------------------------------

    def _host_table(self, tokens: Tensor, positions: Tensor, backends: list[Any]) -> Tensor:
        """The step's numbers in _flat's layout (a CPU int64 tensor; numpy columns filled a row at
        a time: ~2K numbers for 8 rows of 32 layers). Makes room for one more token in every
        dense row's buffers first (growing them by DenseKV's own rule); tiered rows made theirs
        in the plan phase (TieredAttention.make_room)."""
        nb, nl, n = self.batch, self.n_layers, len(backends)
        head = np.zeros(2 * nb, dtype=np.int64)
        head[:n], head[nb : nb + n] = tokens.numpy(), positions.numpy()
        cols = np.zeros((nl, _COLUMNS, nb), dtype=np.int64)
        cols[:, 2, n:] = -1  # padding rows write nothing
        meta = np.zeros((nl, nb, 5), dtype=np.int64)
        meta[:, n:, 1] = 1  # padding rows: one-row slots, no keys
        for b, be in enumerate(backends):
            if isinstance(be, TieredAttention):
                self._tiered_row(cols, meta, b, be)
                continue
            self._check_layout(be.layers[0])
            for store in be.layers:
                if store.n + 1 > store.k.shape[0]:
                    self._grow(store)
            stores = be.layers
            cols[:, 0, b] = [s.k.data_ptr() for s in stores]
            cols[:, 1, b] = [s.v.data_ptr() for s in stores]
            cols[:, 2, b] = [s.n for s in stores]
            meta[:, b, 0] = b
            meta[:, b, 1] = [s.k.shape[0] for s in stores]
            meta[:, b, 4] = cols[:, 2, b] + 1
        parts = [head, cols.ravel(), meta.ravel()]
        if self.exact is not None:
            parts.append(self.exact.host_columns(backends).ravel())
        return torch.from_numpy(np.concatenate(parts))

    def _tiered_row(self, cols: np.ndarray, meta: np.ndarray, b: int, be: TieredAttention) -> None:
        """Row b's static-tier columns: its token goes to each layer's next slot (room made), and
        the static attention reads the filled prefix then (one more than now)."""
        if self.exact is None:
            raise ValueError("a tiered row needs a WholeStep made with its shape (whole_exact.exact_shape)")
        tiers = be.cache.layers
        self._check_layout(tiers[0])
        cols[:, 0, b] = [t.k.data_ptr() for t in tiers]
        cols[:, 1, b] = [t.v.data_ptr() for t in tiers]
        cols[:, 2, b] = [t.next_slot() for t in tiers]
        meta[:, b, 0] = b
        meta[:, b, 1] = [t.k.shape[0] for t in tiers]
        meta[:, b, 4] = [t.n_static + 1 for t in tiers]

    def _grow(self, store: Any) -> None:
        """Room for one more row in a DenseKV: a row appended through its own growth rule, then
        forgotten (the graph writes the real one)."""
        z = self.like.new_zeros(self.like.shape)
        store.append(z, z)
        store.truncate(store.n - 1)

    def _check_layout(self, store: Any) -> None:
        """A row's dense buffers have the graph's row layout (DenseKV makes every layer's alike)."""
        like = self.like
        for buf in (store.k, store.v):
            if not buf.is_contiguous() or buf.dtype != like.dtype or buf.shape[1:] != like.shape[1:] \
                    or buf.device != like.device:
                raise ValueError(f"a dense KV buffer must be contiguous [rows, {like.shape[1]}, {like.shape[2]}] "
                                 f"{like.dtype} on {like.device} for the captured step, got {buf.dtype} "
                                 f"{tuple(buf.shape)} on {buf.device}")

    # ---- the step ----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, tokens: Tensor, positions: Tensor, backends: list[Any]) -> Tensor:
        """tokens, positions [n] int64 (CPU; n <= batch) of the rows whose backends are given,
        in order -> logits [n, V] fp32 (a view of this object's buffer once captured: copy what
        you keep). Every row's buffers then hold the token (each DenseKV's n is one more; each
        tiered layer's static tier one more token, its selections counted)."""
        n = len(backends)
        if not 1 <= n <= self.batch or tokens.shape != (n,) or positions.shape != (n,):
            raise ValueError(f"WholeStep.step: 1..{self.batch} rows with one token and position each, got "
                             f"{n} backends, tokens {tuple(tokens.shape)}, positions {tuple(positions.shape)}")
        self._flat.copy_(self._host_table(tokens, positions, backends))
        stable = getattr(self.exact, "stable", None)  # HiP rows: why one read all in place (whole_stable.py)
        self.read_why = None if stable is None else stable.why
        logits = self.graphs.run(None if self.exact is None else self.exact.pattern)
        for b, be in enumerate(backends):
            if isinstance(be, TieredAttention):
                self.exact.after(be, b)
                continue
            for store in be.layers:
                store.n += 1
        return logits[:n]

    def _forward(self, pattern: tuple[int, ...] | None = None) -> Tensor:
        """The step over the static buffers -> logits [batch, V] fp32 (what a graph holds). pattern:
        per layer the bits of the search stages that run (whole_hip.py; None: every stage)."""
        net = self.net
        x = net.embed_tokens(self.ids)  # [B, hidden]
        cos, sin = net.rope(self.pos)
        ex = self.exact
        for layer, block in enumerate(net.layers):
            q, k, v = block.pre(x, cos, sin)  # [B, H_q, D], [B, H_kv, D] x 2
            k_tab, v_tab = self.k_tab[layer], self.v_tab[layer]
            if ex is None:
                write_rows_table(k, v, k_tab, v_tab, self.rows[layer], self.like)
            else:  # tiered rows keep each static slot's position
                write_rows_table(k, v, k_tab, v_tab, self.rows[layer], self.like, pos=self.pos,
                                 p_table=ex.p_tab[layer])
            o, lse = attend_table_fixed(q, self.like, k_tab, v_tab, self.meta[layer], scale=self.scale,
                                        num_splits=self.splits)
            if ex is not None:  # and the host rows each row selects (whole_exact.py)
                stages = None if pattern is None else pattern[layer]
                o = ex.attend(layer, q, self.like, o, lse, self.scale, self.splits, stages)
            x = block.post(x, o)
        return net.head(x)

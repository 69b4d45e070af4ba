"""The retriever protocol (DESIGN.md, Retrievers) and the registry of methods.

A retriever indexes the host tier of every layer and, per decode step, picks the
host-tier tokens that one query should attend to. Ids are host-tier row indices
(0 = the oldest token that left the window); `-1` pads per-head lists.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from kvloft.config import ModelConfig, RetrievalConfig


@dataclass
class Selection:
    """What one select() call picked.

    ids: [H_kv, k] int64 (per KV head, -1 = padding) or [k] int64 (shared by all heads).
    scanned: keys whose score the search computed (per head summed), to plot quality vs work.
    stable: optional [m] int64 host rows (shared ids only) that this selection reuses from
        an earlier step: ids == cat(ids[:n_fresh], stable[:len(ids) - n_fresh]). A retriever
        returns the same tensor object for as long as that part is unchanged (HiP between
        refreshes of its last stage), so the runtime may keep a device copy of those rows
        and read only the fresh ones from the host tier (runtime/rowspace.py).
    n_fresh: how many ids come before the stable part (0 without one).
    padded: False when ids hold no -1 (the count of selected rows is then ids.numel(),
        known without reading the device).
    logits: optional [H_q, N] fp32, q·k (unscaled) of every host row, from a search that
        scored the host tier's own keys (ExactRetriever attached to it on the CPU): the
        attention reads the selected rows' logits here instead of from their keys.
    """

    ids: Tensor
    scanned: int
    stable: Tensor | None = None
    n_fresh: int = 0
    padded: bool = True
    logits: Tensor | None = None

    @property
    def shared(self) -> bool:
        return self.ids.dim() == 1


@runtime_checkable
class Retriever(Protocol):
    def build(self, layer: int, keys: Tensor, queries: Tensor | None) -> None:
        """keys [H_kv, N, D]: the host tier after prefill; queries [H_q, M, D]: a prefill sample."""

    def add(self, layer: int, keys: Tensor, positions: Tensor) -> None:
        """keys [H_kv, n, D] of tokens leaving the window during decode; positions [n]."""

    def select(self, layer: int, q: Tensor, budget: int) -> Selection:
        """q [H_q, D] -> the host-tier rows to attend to."""

    def stats(self) -> dict[str, Any]:
        """Counters for reports (calls, keys scanned, cache hits, ...)."""


@runtime_checkable
class BatchedSearch(Protocol):
    """A retriever that searches the rows of a batched decode step together (declared by the
    class attribute `batched_select = True`, never probed by calling): one layer's queries of
    G sessions, each row searched in its own index state (host tiers of different lengths),
    in one set of launches. Rows of equal search_key() may share a call; select_batch returns
    for every row exactly what rows[g].select(layer, q[g], budgets[g]) would have."""

    batched_select: bool

    def search_key(self) -> tuple[Any, ...] | None:
        """Retrievers with equal keys can be searched by one select_batch call; None: this
        retriever's options keep its rows out of select_batch (each searched by select())."""

    @classmethod
    def select_batch(cls, retrievers: Any, layer: int, q: Tensor, budgets: Any) -> list[Selection]:
        """retrievers: Sequence[cls] (one per row), q [G, H_q, D], budgets: Sequence[int]
        -> one Selection per row, in order."""


def batch_search_key(retriever: Any) -> tuple[Any, ...] | None:
    """The retriever's search_key() where its class declares batched_select, else None (the
    row searches alone; a wrapper that does not declare it keeps the per-row path)."""
    if getattr(type(retriever), "batched_select", False) is not True:
        return None
    return retriever.search_key()


class RetrieverStats:
    """calls, key vectors scanned, rows selected (valid ids), and method-specific extras.

    A selection is counted where its ids are (a running sum, read when `selected` is):
    reading it back every call would make the host wait for the GPU in every layer of
    every decode step. A mark before each call (counts(host=False)) keeps that sum unread.
    """

    def __init__(self, calls: int = 0, scanned: int = 0, selected: int = 0,
                 extra: dict[str, Any] | None = None) -> None:
        self.calls, self.scanned, self._selected = calls, scanned, selected
        self.extra: dict[str, Any] = {} if extra is None else extra
        self._pending: Tensor | None = None  # device-side count not yet read back

    @property
    def selected(self) -> int:
        if self._pending is not None:
            self._selected += int(self._pending)
            self._pending = None
        return self._selected

    @selected.setter
    def selected(self, value: int | Tensor) -> None:
        """An int, or a 0-dim tensor still on the device (a count saved by counts(host=False))."""
        if isinstance(value, Tensor):
            self._selected, self._pending = 0, value
        else:
            self._selected, self._pending = int(value), None

    def record(self, sel: Selection) -> None:
        self.calls += 1
        self.scanned += sel.scanned
        if not sel.padded:
            self._selected += sel.ids.numel()
            return
        n = (sel.ids >= 0).sum()
        self._pending = n if self._pending is None else self._pending + n

    def as_dict(self) -> dict[str, Any]:
        return {**self.counts(), **self.extra}

    def counts(self, host: bool = True) -> dict[str, int | Tensor]:
        """calls, scanned, selected: the counters every retriever's state_dict() saves. host=False
        (the state_dict of a mark, taken before every call) leaves a selected count still on the
        device there, a 0-dim tensor, unread."""
        if host or self._pending is None:
            return {"calls": self.calls, "scanned": self.scanned, "selected": self.selected}
        return {"calls": self.calls, "scanned": self.scanned, "selected": self._pending + self._selected}

    def load_counts(self, state: dict[str, Any]) -> None:
        """Restore counts() from a state_dict()."""
        self.calls, self.scanned = int(state["calls"]), int(state["scanned"])
        self.selected = state["selected"]


def state_tensor(t: Tensor, host: bool) -> Tensor:
    """A tensor of a retriever's state_dict(host): copied to the host (to be saved), or cloned
    where it lives (a session's mark before each call, to roll a failed one back: no wait for
    the device, no copy across the bus)."""
    return t.cpu() if host else t.clone()


def check_keys(keys: Tensor, model_cfg: ModelConfig) -> None:
    """Validate keys [H_kv, N, D] handed to build/add; raises ValueError naming the problem."""
    want = (model_cfg.n_kv_heads, model_cfg.head_dim)
    if keys.dim() != 3 or (keys.shape[0], keys.shape[2]) != want:
        raise ValueError(f"keys must be [H_kv={want[0]}, N, D={want[1]}], got {tuple(keys.shape)}")
    if keys.is_floating_point() and not torch.isfinite(keys).all():
        raise ValueError("keys contain NaN or inf; check the model weights and inputs")


def check_select(q: Tensor, budget: int, model_cfg: ModelConfig) -> None:
    """Validate select()'s query [H_q, D] and budget (an int >= 0); raises ValueError."""
    hq, d = model_cfg.n_heads, model_cfg.head_dim
    if not isinstance(q, Tensor) or tuple(q.shape) != (hq, d):
        raise ValueError(f"q must be a tensor [H_q={hq}, D={d}], got {tuple(getattr(q, 'shape', ())) or type(q)}")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ValueError(f"budget must be an int >= 0, got {budget!r}")


def params_from_options(cls: type, options: dict[str, Any], method: str) -> Any:
    """A method's Params dataclass from RetrievalConfig.options; unknown keys are an error."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown {method} options {unknown}; known: {sorted(known)}")
    return cls(**options)


_REGISTRY: dict[str, type] = {}

# method name -> module in kvloft/index/ that registers it (imported on first use)
METHOD_MODULES = {
    "exact": "exact",
    "attention_graph": "attention_graph",
    "tokenselect": "tokenselect",
    "recycled": "recycled",
    "hip": "hip",
    "actqkv": "actqkv",
    "faiss": "faiss_ann",
}


def register(name: str):
    """Class decorator: make a retriever available as RetrievalConfig(method=name)."""

    def deco(cls: type) -> type:
        _REGISTRY[name] = cls
        return cls

    return deco


def make_retriever(
    cfg: RetrievalConfig, model_cfg: ModelConfig, device: torch.device | str = "cpu"
) -> Retriever:
    """Instantiate the retriever for `cfg.method` (each class takes (cfg, model_cfg, device))."""
    if cfg.method not in _REGISTRY and cfg.method in METHOD_MODULES:
        importlib.import_module(f"kvloft.index.{METHOD_MODULES[cfg.method]}")
    if cfg.method not in _REGISTRY:
        raise ValueError(
            f"retrieval method {cfg.method!r} is not available here; available: {sorted(_REGISTRY)}"
        )
    return _REGISTRY[cfg.method](cfg, model_cfg, torch.device(device))

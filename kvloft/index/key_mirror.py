"""A retriever's per-layer state around its own copy (mirror) of the host tier's keys.

tokenselect and recycled search a mirror of each layer's host-tier keys, token-major rows
[N, H_kv, D] grown in chunks (tiers/chunked.py), kept beside a few fields of their own (a
dataclass whose field `keys` holds the mirror). build() restarts a layer from the keys after
prefill; add() appends the keys leaving the window, which become host rows N .. N + n - 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from kvloft.config import ModelConfig
from kvloft.tiers.chunked import ChunkedRows


class LayerMirrors(dict):
    """layer -> that layer's state, `new(mirror)`, made on the layer's first use.

    A dict (get, items, pop as usual) that also makes the states: `of` the layer's state,
    `build` a fresh one from the keys after prefill, `append` the keys leaving the window."""

    def __init__(self, new: Callable[[ChunkedRows], Any], model_cfg: ModelConfig, chunk_rows: int,
                 device: torch.device) -> None:
        super().__init__()
        self._new = new
        self._row_shape = (model_cfg.n_kv_heads, model_cfg.head_dim)
        self._chunk_rows = chunk_rows
        self._device = device

    def of(self, layer: int, dtype: torch.dtype) -> Any:
        """The layer's state; on first use a new one around an empty mirror of `dtype`."""
        if layer not in self:
            self[layer] = self._new(ChunkedRows(self._row_shape, dtype, self._chunk_rows, self._device))
        return self[layer]

    def build(self, layer: int, keys: Tensor) -> Any:
        """keys [H_kv, N, D] of the host tier after prefill: the layer restarts from a mirror of them."""
        self.pop(layer, None)
        return self.append(layer, keys)

    def append(self, layer: int, keys: Tensor) -> Any:
        """keys [H_kv, n, D] leaving the window: appended to the layer's mirror; its state."""
        st = self.of(layer, keys.dtype)
        st.keys.append_from(keys.transpose(0, 1))
        return st

"""HiP rows' stable selections kept on the device inside the whole decode step (runtime/whole_hip.py).

A HiP row's selection is the rows that arrived since its last stage ran ("fresh", few), then
that stage's mask (index/hip.py Selection.stable), which changes only when the stage refreshes
(every refresh_steps[-1] steps per layer). Read in place each step, the mask's ~budget rows
cross PCIe in every layer; the segmented engine instead copies them to the device once per
refresh (runtime/rowspace.py). The whole step does the same with fixed shapes:

    buffers     K and V [L, B, width, H_kv, D] in the model dtype, one [width] slab per
                (layer, slot): L * B * width * H_kv * D * 2 * itemsize bytes (Llama-3-8B,
                B = 1, width 2048: 256 MiB), allocated with the step's first tiered row
    copy        where the last stage refreshes (the pattern's bit: a layer no row refreshes
                has no copy in its graph), kernels/gather_fixed.py over the new masks, per
                row min(mask length, width) rows where the row refreshes, 0 elsewhere
    attention   three parts merged by lse: the static tier, the stable part (this buffer's
                first n_stable rows: attend_table_fixed with ids=None, device memory only) and
                the host part (the selection's first n_sel - n_stable ids read in place: the
                fresh rows; the kernel spreads each row's own count over its splits, so the
                launch reads those few rows whatever its width)

The host decides per (row, layer) in the plan phase (`route`): the stable part is used where
the buffer holds the row's current mask (copied this step, or marked at a step's end as the
copy of the very mask view the row's state holds) and the fresh rows are within the bound
(refresh_steps[-1] + max(evict_batch, 1): the rows one schedule period can bring). Elsewhere
n_stable = 0 and the host part is the whole selection, read in place as before: equal
results, and `why` says which row fell back. Sums run in another order than the segmented
step's (three parts instead of two): equal within the attention's rounding, not bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kvloft.kernels.batched_decode import attend_table_fixed
from kvloft.kernels.gather_fixed import gather_fixed

__all__ = ["FRESH_BOUND", "StableRows", "fresh_bound"]

FRESH_BOUND: int | None = None  # fresh rows a row may read in place beside its stable part (None: derived)


def fresh_bound(refresh_last: int, evict_batch: int) -> int:
    """Host rows that can arrive between two runs of the last stage (refresh_last steps apart),
    with evict_batch rows moving down at a time (0: one a step): FRESH_BOUND where set."""
    return FRESH_BOUND if FRESH_BOUND is not None else refresh_last + max(evict_batch, 1)


class StableRows:
    """The stable parts' buffers of a whole step (see the module doc) and the host's record of
    which mask each (slot, layer) holds."""

    def __init__(self, n_layers: int, batch: int, width: int) -> None:
        self.n_layers, self.batch, self.width = n_layers, batch, width
        self.k: Tensor | None = None  # [L, B, width, H_kv, D]
        self.v: Tensor | None = None
        self.k_tab: Tensor | None = None  # [L, B] int64: each slab's base address
        self.v_tab: Tensor | None = None
        self._marks: dict[tuple[int, int], tuple[Any, Tensor]] = {}  # (slot, layer) -> (state, mask view)
        self.why: str | None = None  # the first (row, layer) of the last plan read all in place, and why

    @property
    def nbytes(self) -> int:
        """Device bytes of the buffers (0 before the first tiered row)."""
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size()

    def allocate(self, like: Tensor) -> None:
        """The buffers in the layout of like [rows, H_kv, D] (a static tier's) on its device, once."""
        if self.k is not None:
            return
        shape = (self.n_layers, self.batch, self.width, *like.shape[1:])
        self.k = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.v = torch.zeros_like(self.k)
        tab = [[[buf[i, b].data_ptr() for b in range(self.batch)] for i in range(self.n_layers)]
               for buf in (self.k, self.v)]
        self.k_tab, self.v_tab = torch.tensor(tab, dtype=torch.int64, device=like.device).unbind(0)

    # ---- the host's part ---------------------------------------------------------------------

    def holds(self, b: int, layer: int, st: Any) -> bool:
        """Whether slot b's buffer of `layer` holds the rows of st's current last mask."""
        mark = self._marks.get((b, layer))
        return mark is not None and mark[0] is st and st.masks[-1] is not None and mark[1] is st.masks[-1]

    def mark(self, b: int, layer: int, st: Any) -> None:
        """After a step that copied st's new last mask into slot b's buffer of `layer`."""
        self._marks[(b, layer)] = (st, st.masks[-1])

    def route(self, b: int, layer: int, st: Any, refresh_last: bool, fresh: int, n_sel: int, bound: int) -> int:
        """Rows of the selection row b reads from its buffer this step (n_stable; 0: all in place)."""
        if not (refresh_last or self.holds(b, layer, st)):
            self._note(f"row {b} layer {layer}: its stable buffer does not hold its current mask (a row new to the "
                       "slot or masks set outside the step) until its last stage refreshes")
            return 0
        if fresh > bound:
            self._note(f"row {b} layer {layer}: {fresh} fresh rows, over the bound of {bound}")
            return 0
        return max(n_sel - fresh, 0)

    def _note(self, why: str) -> None:
        if self.why is None:
            self.why = "the selection is read in place from the host tier: " + why

    # ---- the graph's part --------------------------------------------------------------------

    def copy(self, layer: int, ids: Tensor, counts: Tensor, hk_tab: Tensor, hv_tab: Tensor, host_meta: Tensor,
             like: Tensor) -> None:
        """Slot b's first counts[b] rows of ids [B, width] (host row ids of its last mask) from its
        host chunks (hk_tab, hv_tab [B * hc] through host_meta [B, 5]) into its buffer of `layer`."""
        gather_fixed(hk_tab, hv_tab, host_meta, ids, counts, self.k[layer], self.v[layer], like)

    def attend(self, layer: int, q: Tensor, like: Tensor, meta: Tensor, scale: float,
               splits: int) -> tuple[Tensor, Tensor]:
        """q [B, H_q, D] over each slot's first meta[b, 4] buffered rows (meta [B, 5]: the slot, width,
        0, 0, n_stable) -> (out [B, H_q, D], lse [B, H_q] fp32); device memory only."""
        return attend_table_fixed(q, like, self.k_tab[layer], self.v_tab[layer], meta, scale=scale,
                                  num_splits=splits)

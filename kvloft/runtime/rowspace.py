"""One address space over a layer's decode rows: a decode step's attention in one launch.

A decode step attends to three sets of rows: the static tier (sink + window ring, on the
compute device), the rows the retriever picked from the host tier (pinned host memory,
read zero-copy through unified addressing), and, for retrievers whose selection mostly
stays the same from step to step (HiP between refreshes of its last stage:
Selection.stable), a device copy of that stable part. `LayerRowSpace` lays them out in
slots of `slot_rows` rows (the host tier's chunk rows) behind one table of base addresses:

    slots 0 .. C-1     the host chunks (host row r is row r: selected ids need no change)
    next ceil(S / R)   the static tier's buffer [S, H_kv, D] (S = sink + window + batch)
    next ceil(B / R)   the cached selection [B, H_kv, D] (B = the retrieval budget)

so sparse_decode.gather_attend_table reads all of them in one launch: no second kernel for
the static tier and no merge of two partial attentions; a token's rows are read where
they are, and the stable part of a selection crosses PCIe once per refresh (gather_rows
into the cache) instead of once per step. The table is made again only when the host tier
gains a chunk; the row ids of the static tier and the cache are precomputed aranges, so a
step adds one concatenation to the selection's ids.

Used on the Triton path when the host tier is pinned and in memory (kernels read it in
place); elsewhere the runtime attends the static tier and the selection separately
(runtime/attention.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvloft.kernels.checks import address_table
from kvloft.tiers.kvcache import LayerTiers
from kvloft.tiers.packed import PackedRows

__all__ = ["LayerRowSpace"]


class LayerRowSpace:
    """The decode rows of one layer (see the module doc). cache_rows: rows of the device
    copy of a stable selection (0: none), allocated when the first one arrives (retrievers
    without Selection.stable never allocate it)."""

    def __init__(self, tiers: LayerTiers, device: torch.device, cache_rows: int = 0) -> None:
        self.tiers = tiers
        self.device = torch.device(device)
        self.slot_rows = tiers.host_k.chunk_rows
        self.cache_rows = cache_rows
        self.cache_k = self.cache_v = None  # allocated with the first stable selection
        self.cached_src: Tensor | None = None  # the Selection.stable whose rows the cache holds
        self.cached_n = 0
        self.fills = 0  # times the cache was filled (one per refresh of the stable part)
        self._key: tuple | None = None
        self.tables: tuple[Tensor, Tensor] | None = None
        self.static_ids: Tensor | None = None
        self.cache_ids: Tensor | None = None

    def _layout(self) -> None:
        hk, hv = self.tiers.host_k, self.tiers.host_v
        key = (len(hk.chunks), len(hv.chunks), self.cache_k is not None)
        if key == self._key:
            return
        r = self.slot_rows
        regions = [(self.tiers.k, self.tiers.v)]
        if self.cache_k is not None:
            regions.append((self.cache_k, self.cache_v))
        packed = isinstance(hk, PackedRows)  # 8-bit host chunks: the kernel reads codes + scales there
        k_slots = list(hk.codes.chunks if packed else hk.chunks)  # the stored chunks, not copies
        v_slots = list(hv.codes.chunks if packed else hv.chunks)
        offsets = []
        for k, v in regions:  # a region of S rows takes ceil(S / r) slots: views r rows apart
            offsets.append(len(k_slots) * r)
            k_slots += [k[j : j + r] for j in range(0, k.shape[0], r)]
            v_slots += [v[j : j + r] for j in range(0, v.shape[0], r)]
        self.tables = address_table(k_slots, self.device), address_table(v_slots, self.device)
        if packed:
            from kvloft.kernels.sparse_decode import SlotTables

            self.tables = SlotTables(*self.tables, hk.scale_table(self.device), hv.scale_table(self.device),
                                     len(hk.codes.chunks), hk.host_dtype)
        self.static_ids = torch.arange(offsets[0], offsets[0] + self.tiers.k.shape[0], device=self.device)
        if self.cache_k is not None:
            self.cache_ids = torch.arange(offsets[1], offsets[1] + self.cache_rows, device=self.device)
        self._key = key

    def ids(self, sel_ids: Tensor, stable: Tensor | None, n_fresh: int, n_static: int) -> Tensor:
        """Row ids in this space for one step: the selection (host rows; its stable part read
        from the device cache, filled here when the stable part changed) and the filled
        static slots. sel_ids [k] or [H_kv, k] (-1 = padding) on the compute device.
        Waits (on the host) for a copy of evicted rows to the host tier still in flight: the
        kernel may read those rows."""
        return torch.cat(self.id_parts(sel_ids, stable, n_fresh, n_static), dim=-1)

    def id_parts(self, sel_ids: Tensor, stable: Tensor | None, n_fresh: int, n_static: int) -> list[Tensor]:
        """ids() before the concatenation: its parts, all [k_i] or all [H_kv, k_i] (a batched
        step concatenates every row's parts at once: runtime/batch_attention.py)."""
        self.tiers.wait_host()
        cached = stable is not None and self.cache_rows > 0 and sel_ids.dim() == 1
        if cached and self.cached_src is not stable:
            self._fill(stable)
        self._layout()
        parts = [sel_ids]
        used = sel_ids.shape[0] - n_fresh
        if cached and 0 <= used <= self.cached_n:
            parts = [sel_ids[:n_fresh]] if n_fresh else []
            parts.append(self.cache_ids[:used])
        static = self.static_ids[:n_static]
        if sel_ids.dim() == 2:
            static = static.expand(sel_ids.shape[0], n_static)
        parts.append(static)
        return parts

    def _fill(self, stable: Tensor) -> None:
        """Copy the rows of `stable` (host row ids, on the device) into the cache."""
        from kvloft.scheduler.rowcopy import gather_rows

        if self.cache_k is None:
            like = self.tiers.k
            self.cache_k = torch.empty((self.cache_rows, *like.shape[1:]), dtype=like.dtype, device=like.device)
            self.cache_v = torch.empty_like(self.cache_k)
        m = min(stable.shape[0], self.cache_rows)
        hk, hv = self.tiers.host_k, self.tiers.host_v  # waits for a copy down in flight
        if isinstance(hk, PackedRows):
            self._fill_packed(hk, hv, stable[:m])
        else:
            tables = hk.pointer_table(self.device), hv.pointer_table(self.device)
            gather_rows(hk.chunks, hv.chunks, stable[:m], self.cache_k, self.cache_v, tables=tables)
        self.cached_src, self.cached_n = stable, m
        self.fills += 1

    def _fill_packed(self, hk: PackedRows, hv: PackedRows, ids: Tensor) -> None:
        """8-bit host rows `ids` [m] (device) into the cache: their codes and scales gathered
        zero-copy (gather_rows over the code chunks, then the scale chunks), dequantized on the
        cache's device (rowquant.dequantize_rows, the kernels' arithmetic). Half the bytes of
        model-dtype rows cross PCIe, and the host does no work (a gather and dequantization on the
        host took ~16 ms a refresh for the Llama-3-8B shape on an H100 machine)."""
        from kvloft.kernels.rowquant import dequantize_rows
        from kvloft.scheduler.rowcopy import gather_rows

        m, shape = ids.shape[0], self.cache_k.shape[1:]
        codes = [torch.empty((m, *shape), dtype=hk.codes.chunks[0].dtype, device=self.device) for _ in "kv"]
        scales = [torch.empty((m, shape[0]), dtype=torch.float32, device=self.device) for _ in "kv"]
        gather_rows(hk.codes.chunks, hv.codes.chunks, ids, *codes,
                    tables=(hk.pointer_table(self.device), hv.pointer_table(self.device)))
        gather_rows(hk.scales.chunks, hv.scales.chunks, ids, *scales,
                    tables=(hk.scale_table(self.device), hv.scale_table(self.device)))
        self.cache_k[:m].copy_(dequantize_rows(codes[0], scales[0], hk.host_dtype, self.cache_k.dtype))
        self.cache_v[:m].copy_(dequantize_rows(codes[1], scales[1], hv.host_dtype, self.cache_v.dtype))

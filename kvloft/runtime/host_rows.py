"""Selected host rows read where they lie: the default row source of the decode path.

gather_rows   host rows of a selection as whole tokens (their union moves once), split per
              KV head on the device (DESIGN.md, Tiers); prefill and the fallback decode path
InPlaceRows   the RowFetch (scheduler/fetch.py) of a backend without a scheduler: the search
              runs inline after the static attention, and attention over the selected rows
              reads them in place where the kernels can (one pinned chunk, a table of pinned
              chunks, the CPU next to the data for a retriever that attends on the host),
              else from a gather
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvloft.index.base import Retriever, Selection
from kvloft.runtime.context import AttentionContext
from kvloft.runtime.prefill import gather_token_rows
from kvloft.scheduler.fetch import Retrieved
from kvloft.tiers.chunked import ChunkedRows
from kvloft.tiers.kvcache import Evicted, LayerTiers
from kvloft.tiers.packed import PackedRows


def gather_rows(tiers: LayerTiers, ids: Tensor, device: torch.device,
                zero_copy: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Host rows ids [H_kv, k] / [k] (-1 = pad): k, v [k, H_kv, D] on `device` (pads hold some
    host row) and valid [H_kv, k] (CPU). The union of the heads' rows is gathered as whole
    tokens (DESIGN.md, Tiers), then split per head on the device.

    zero_copy (the Triton kernel set): where the host tier's chunks can be read in place
    (model-dtype rows, none spilled; pinned on CUDA), a GPU kernel copies the union's rows
    through unified addressing (scheduler/rowcopy.py: no CPU gather, no staging copy; ~51
    GB/s for 2 KB rows on the H200 against 19-42 GB/s for a CPU gather + H2D). Else the CPU
    gathers the union into a pinned buffer that is copied without blocking."""
    hkv = tiers.host_k.row_shape[0]
    per_head = (ids if ids.dim() == 2 else ids[None].expand(hkv, -1)).to("cpu")
    valid = per_head >= 0
    union = torch.unique(per_head[valid])  # [n] ascending: each token moves once, all its heads
    if not union.numel():
        union = torch.zeros(1, dtype=torch.int64)  # nothing valid: pads read row 0
    elif int(union[-1]) >= tiers.n_host:
        raise IndexError(f"host row ids must lie in [0, {tiers.n_host}), got {int(union[-1])}")
    hk, hv = tiers.host_k, tiers.host_v
    if zero_copy and _in_place(hk, device) and _in_place(hv, device):
        uk, uv = _gather_in_place(hk, hv, union, device)  # [n, H_kv, D] each
    else:
        # CUDA: gathered into pinned memory and copied asynchronously (a pageable copy blocks
        # the host and runs at about half the PCIe rate)
        pin = device.type == "cuda"
        uk = gather_token_rows(hk, union, pin).to(device, non_blocking=pin)  # [n, H_kv, D]
        uv = gather_token_rows(hv, union, pin).to(device, non_blocking=pin)
    local = torch.searchsorted(union, per_head.clamp_min(0)).clamp_max(union.numel() - 1)
    # row (token, head) of the union as one flat index: index_select, several times faster than
    # advanced indexing on the CPU
    flat = (local * hkv + torch.arange(hkv)[:, None]).view(-1).to(device)  # [H_kv * k]
    k = per_head.shape[1]
    gk = uk.reshape(-1, uk.shape[-1]).index_select(0, flat).view(hkv, k, -1).transpose(0, 1)  # [k, H_kv, D]
    gv = uv.reshape(-1, uv.shape[-1]).index_select(0, flat).view(hkv, k, -1).transpose(0, 1)
    return gk, gv, valid


def _in_place(store: ChunkedRows | PackedRows, device: torch.device) -> bool:
    """A kernel on `device` can read the store's chunks where they lie: model-dtype rows, none
    spilled to disk, pinned (CUDA) or on the CPU itself (the Triton interpreter)."""
    return (isinstance(store, ChunkedRows) and store.n_spilled == 0 and len(store.chunks) > 0
            and (device.type == "cpu" or (device.type == "cuda" and store.pin)))


def _gather_in_place(hk: ChunkedRows, hv: ChunkedRows, union: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """Rows `union` [n] (CPU int64, ascending) of K and V -> two [n, H_kv, D] on `device`, one
    Triton launch reading the chunks through their address tables."""
    from kvloft.scheduler.rowcopy import gather_rows as copy_rows

    out_k = torch.empty((union.shape[0], *hk.row_shape), dtype=hk.dtype, device=device)
    out_v = torch.empty_like(out_k)
    tables = (hk.pointer_table(device), hv.pointer_table(device))
    copy_rows(hk.chunks, hv.chunks, union.to(device), out_k, out_v, tables=tables)
    return out_k, out_v


class InPlaceRows:
    def __init__(self, ctx: AttentionContext, retriever: Retriever) -> None:
        self.ctx, self.retriever = ctx, retriever

    # ---- RowFetch ----------------------------------------------------------------------------

    def start(self, layer: int, tiers: LayerTiers, q: Tensor, evicted: Evicted | None, budget: int,
              index_add: bool) -> None:
        """The evicted rows into the index now; the search waits for attend()."""
        self.add(layer, evicted, index_add)

    def add(self, layer: int, evicted: Evicted | None, index_add: bool) -> None:
        """Rows that moved to the host tier into the index (where index_add: the retriever keeps
        its own copy), timed as "index_add"."""
        if evicted is not None and index_add:
            with self.ctx.timers("index_add"):
                self.retriever.add(layer, evicted.k.transpose(0, 1).to("cpu"), evicted.positions.to("cpu"))

    def attend(self, layer: int, tiers: LayerTiers, q: Tensor, budget: int, pending: None) -> Retrieved:
        """Search, then q [H_q, D] over the selected rows in place (see retrieved)."""
        if not budget:
            return Retrieved()
        sel = self.select(layer, q, budget)
        with self.ctx.timers("retrieved_attention"):
            out, lse = self.retrieved(tiers, q, sel.ids)
        return Retrieved([out], [lse], sel.scanned)

    def reset(self) -> None:
        pass  # nothing is kept across steps

    def bytes(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        pass

    # ---- reading selected rows ---------------------------------------------------------------

    def select(self, layer: int, q: Tensor, budget: int) -> Selection:
        """The retriever's selection for q [H_q, D], timed as "search"."""
        with self.ctx.timers("search"):
            return self.retriever.select(layer, q, budget)

    def gather(self, tiers: LayerTiers, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """gather_rows onto the compute device; counted in prefill_stats["host_keys"] when prefilling."""
        gk, gv, valid = gather_rows(tiers, ids, self.ctx.device, zero_copy=self.ctx.ops.name == "triton")
        if not self.ctx.decoding:
            self.ctx.prefill_stats["host_keys"] += int(valid.sum())
        return gk, gv, valid

    def retrieved(self, tiers: LayerTiers, q: Tensor, ids: Tensor,
                  rot_delta: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Attention of q [H_q, D] over selected host rows (ids [H_kv, k] or [k], -1 = pad).

        rot_delta: optional [H_kv, k] or [k] int64, aligned with ids: rotate each selected
        key by that many positions first (extrapolation mode).
        """
        ctx = self.ctx
        rot = {}
        if rot_delta is not None:
            rot = {"rot_delta": rot_delta.to(q.device), "inv_freq": ctx.inv_freq}
        if getattr(self.retriever, "attend_on_host", False) and rot_delta is None and ctx.device.type != "cpu":
            # RetrievalAttention: attention over the selected rows runs on the CPU next to the
            # data; only q goes down and (out, lse) comes back (2 * H_q * (D + 1) numbers)
            from kvloft.index.attention_graph import cpu_partial_attention

            out, lse = cpu_partial_attention(q.to("cpu"), tiers.host_k, tiers.host_v, ids.to("cpu"),
                                             scale=ctx.scale)
            return out.to(q.device, non_blocking=True), lse.to(q.device, non_blocking=True)
        host_k, host_v = tiers.host_k, tiers.host_v
        # an 8-bit tier's chunks read as tensors are dequantized whole: its rows go through the
        # chunk tables (codes read in place) or the gather below, never through chunks[0]
        one_chunk = len(host_k.chunks) == 1 and getattr(host_k, "host_dtype", None) is None
        zero_copy = ctx.ops.name == "triton" and host_k.pin
        if one_chunk and (ctx.device.type == "cpu" or zero_copy):
            # one host chunk: the kernel gathers straight from it (on CUDA: reading pinned
            # host memory through unified addressing, only the selected rows cross PCIe)
            kc, vc = host_k.chunks[0], host_v.chunks[0]
            return ctx.ops.gather_attend(q, kc, vc, ids.to(q.device), scale=ctx.scale, **rot)
        if zero_copy and host_k.n_spilled == 0 and host_v.n_spilled == 0:
            # several pinned chunks: the kernel finds each row's chunk through a table of
            # their addresses and reads it in place, as above
            from kvloft.kernels.sparse_decode import gather_attend_chunks

            tables = host_k.pointer_table(ctx.device), host_v.pointer_table(ctx.device)
            return gather_attend_chunks(q, host_k.chunks, host_v.chunks, ids.to(q.device), scale=ctx.scale,
                                        tables=tables, **rot)
        gk, gv, valid = self.gather(tiers, ids)
        local = torch.arange(valid.shape[1])[None].expand_as(valid)
        local = torch.where(valid, local, -1).to(ctx.device)
        return ctx.ops.gather_attend(q, gk, gv, local, scale=ctx.scale, **rot)

"""One attention launch per layer for the rows of a batched decode step that can share it.

A session's one-launch decode route (exact_decode.py over rowspace.py's LayerRowSpace) is
two halves: prepare (the retriever's selection, the row ids in the layer's slot table, the
selection cache filled) and run (gather_attend_table, one launch). ExactDecode.prepare
returns the first half as a `TableLaunch`. A batched step (batch_layer.py's RowAttention) prepares
every row, then `run_launches` runs the rows whose launches can share one as
kernels/batched_decode.py's gather_attend_table_batched:

    tables   stack_tables(row tables)           each row's slots end to end (2-4 small cats)
    ids      cat(every row's id parts + -1 pad)  one cat -> [B, H_kv, n_max] (a strided view)
    q        stack(row queries)                  [B, H_q, D]
    launch   one split kernel + one merge for the group, instead of B of each

Rows share a launch where their q, row layout, scale and device match (sessions of one
model do) and their 8-bit slot formats do not differ (int8 and fp8 host tiers launch apart;
a model-dtype host tier joins either); a group of one runs as the row alone would. Each row's "attention" timer gets the whole group's launch (the
latency it saw, as Engine's decode_s gets the whole step); counters and cache fills happen
in prepare, as on the row's own path.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from kvloft.runtime.dense import Timers

if TYPE_CHECKING:
    from kvloft.kernels.sparse_decode import SlotTables

__all__ = ["TableLaunch", "batched_ids", "launch_groups", "run_launches"]


@dataclass(eq=False)
class TableLaunch:
    """One row's decode attention over its layer's slot table, prepared and not yet run."""

    q: Tensor  # [H_q, D] the row's query
    like_k: Tensor  # [S, H_kv, D] the static tier: the row layout every slot shares
    like_v: Tensor  # [S, H_kv, D]
    id_parts: list[Tensor]  # all [k_i] or all [H_kv, k_i], -1 = padding: row ids in `tables`' slots
    tables: tuple[Tensor, Tensor] | SlotTables  # [n_slots] int64 slot base addresses (+ 8-bit scales)
    slot_rows: int
    scale: float
    timers: Timers  # the row's session's

    @property
    def n(self) -> int:
        return sum(p.shape[-1] for p in self.id_parts)

    def run(self) -> Tensor:
        """The row alone: out [1, H_q, D] (gather_attend_table)."""
        from kvloft.kernels.sparse_decode import gather_attend_table

        with self.timers("attention"):
            ids = torch.cat(self.id_parts, dim=-1)
            out, _ = gather_attend_table(self.q, self.like_k, self.like_v, ids, self.tables, self.slot_rows,
                                         scale=self.scale)
        return out[None]

    def group_key(self) -> tuple[Any, ...]:
        """Rows with equal keys can share a launch if their 8-bit formats agree (codes_kind)."""
        return (self.q.shape, self.q.dtype, self.q.device, self.like_k.dtype, self.like_k.stride(),
                self.like_k.shape[1:], self.scale)

    def codes_kind(self) -> str | None:
        """The 8-bit format of the row's packed slots ("int8" / "fp8"), None where it has none."""
        return getattr(self.tables, "kind", None) if getattr(self.tables, "n_packed", 0) else None


def batched_ids(launches: Sequence[TableLaunch]) -> tuple[Tensor, list[int]]:
    """Every row's id parts in one concatenation: ids [B, H_kv, n_max] (or [B, n_max] where every
    row's ids are shared over KV heads), each row padded with -1 to n_max, and the rows' counts.
    The result is a view with strides (n_max, B * n_max, 1): no copy after the one cat."""
    lengths = [ln.n for ln in launches]
    n_max = max(lengths)
    per_head = any(p.dim() == 2 for ln in launches for p in ln.id_parts)
    hkv = launches[0].like_k.shape[1]
    first = launches[0].id_parts[0] if launches[0].id_parts else launches[0].q
    pad = torch.full((), -1, dtype=torch.int64, device=first.device)
    pieces = []
    for ln, m in zip(launches, lengths, strict=True):
        parts = [*ln.id_parts, pad.expand(n_max - m)] if m < n_max else ln.id_parts
        pieces += [p.expand(hkv, p.shape[-1]) for p in parts] if per_head else parts
    flat = torch.cat(pieces, dim=-1)  # [H_kv, B * n_max] or [B * n_max]
    nb = len(launches)
    ids = flat.view(hkv, nb, n_max).transpose(0, 1) if per_head else flat.view(nb, n_max)
    return ids, lengths


def _run_group(group: Sequence[TableLaunch]) -> Tensor:
    """The rows of `group` in one launch -> out [G, H_q, D]."""
    from kvloft.kernels.batched_decode import gather_attend_table_batched, stack_tables

    sync = any(ln.timers.sync for ln in group)
    if sync:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    stacked = stack_tables([ln.tables for ln in group], [ln.slot_rows for ln in group])
    ids, lengths = batched_ids(group)
    q = torch.stack([ln.q for ln in group])
    first = group[0]
    out, _ = gather_attend_table_batched(q, first.like_k, first.like_v, ids, stacked, scale=first.scale,
                                         lengths=lengths)
    if sync:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    for ln in group:
        ln.timers.seconds["attention"] += dt
    return out


def launch_groups(launches: dict[int, TableLaunch]) -> list[list[int]]:
    """The rows of each launch, in row order: rows of one group_key, split by 8-bit format (one
    per launch); rows without 8-bit slots join the first format's launch (their packed-slot
    count is 0)."""
    by_key: dict[tuple[Any, ...], dict[str | None, list[int]]] = {}
    for b, ln in launches.items():
        by_key.setdefault(ln.group_key(), {}).setdefault(ln.codes_kind(), []).append(b)
    groups = []
    for kinds in by_key.values():
        plain = kinds.pop(None, [])
        formats = list(kinds.values()) or [[]]
        formats[0] = sorted(formats[0] + plain)
        groups += formats
    return groups


def run_launches(launches: dict[int, TableLaunch], out: Tensor) -> None:
    """Run prepared rows {row b: launch}, writing row b's result into out[b] (out [B', H_q, D]):
    one launch per group of rows that can share one (TableLaunch.group_key)."""
    for rows in launch_groups(launches):
        if len(rows) == 1:
            out[rows[0] : rows[0] + 1] = launches[rows[0]].run()
            continue
        got = _run_group([launches[b] for b in rows])
        if rows == list(range(rows[0], rows[0] + len(rows))):
            out[rows[0] : rows[0] + len(rows)] = got
        else:
            out[torch.tensor(rows, device=out.device)] = got

"""One decode token of each of B sequences in one launch, over rows addressed through slot tables.

sparse_decode.gather_attend_table reads one sequence's decode rows (host chunks, static tier,
cached selection) through a table of slot base addresses. A batched decode step has B such
tables, one per sequence; `stack_tables` lays them end to end in one table (sequence b's
slots start at its slot base; the scale tables of 8-bit slots likewise), and
`gather_attend_table_batched` runs the same split-K kernel (_split_kernel) with a batch axis
on its grid, (H_kv, S, B): program (h, s, b) reads sequence b's q, ids and its row of the
per-row metadata [B, 5] (slot base, slot rows, packed slots, scale base, key count), so
sequences may differ in slot size, 8-bit slots and number of selected rows.

Cost next to B calls of gather_attend_table: the same reads of rows, ids and q; one launch of
the split kernel and one of the merge instead of B each; one host-to-device copy of the
metadata (40 bytes a sequence). Splits are sized for n = the longest sequence's key count;
a shorter sequence's programs past its own count return at once.
Reference: gather_attend_table on each sequence (tests/kernels/test_batched_decode.py).

`attend_table_fixed` is the launch of a captured decode step (runtime/whole_step.py): the
metadata [B, 5] already on the device (filled by the host before a replay, never copied inside
the launch), ids of a fixed width (a budget; or none: rows 0 .. n_b - 1 of a dense buffer) and
a grid fixed by the caller, each sequence spreading its own n_b keys over its S splits (the
kernel's EVEN_SPLITS), so the same launch serves every step whatever the lengths.
Reference: decode_attend over each sequence's first n_b rows, gather_attend_table over its
first n_b ids (tests/kernels/test_table_rows.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
from torch import Tensor

from kvloft.kernels import checks
from kvloft.kernels.sparse_decode import SlotTables
from kvloft.kernels.split_kernel import _split_kernel
from kvloft.kernels.split_launch import DEFAULT_LAUNCH, INTERPRETER_SPLITS, DecodeLaunch, _attend_rows

__all__ = ["MAX_BATCH_ROWS", "StackedTables", "attend_table_fixed", "fixed_splits", "gather_attend_table_batched",
           "stack_tables"]

MAX_BATCH_ROWS = 65_535  # the grid's third axis (CUDA allows 65535 blocks there)


class StackedTables(NamedTuple):
    """B sequences' slot tables end to end. tables: every sequence's slots (k, v [n_slots]
    int64) and, where any sequence has 8-bit slots, their scale tables end to end too;
    rows: per sequence (slot base, slot rows, packed slots, scale base), plain ints."""

    tables: SlotTables
    rows: tuple[tuple[int, int, int, int], ...]


def stack_tables(tables: Sequence[tuple[Tensor, Tensor] | SlotTables], slot_rows: Sequence[int]) -> StackedTables:
    """One table over B sequences' tables (each a gather_attend_table `tables`, slot_rows[b]
    rows a slot). 8-bit slots of one format only: int8 and fp8 sequences cannot share a launch."""
    if not tables or len(tables) != len(slot_rows):
        raise ValueError(f"stack_tables: needs one slot_rows per table (>= 1), got {len(tables)} tables and "
                         f"{len(slot_rows)} slot_rows")
    kinds = {t.kind for t in tables if isinstance(t, SlotTables) and t.kind is not None and t.n_packed}
    if len(kinds) > 1:
        raise ValueError(f"stack_tables: 8-bit slots of one format per launch, got {sorted(kinds)}; "
                         "launch the sequences of each format apart")
    rows, ks, vs, k_scales, v_scales = [], [], [], [], []
    slot_base = scale_base = 0
    for t, r in zip(tables, slot_rows, strict=True):
        packed = isinstance(t, SlotTables) and t.kind is not None and t.n_packed
        n_packed = t.n_packed if packed else 0
        rows.append((slot_base, int(r), n_packed, scale_base))
        ks.append(t[0])
        vs.append(t[1])
        if packed:
            k_scales.append(t.k_scales[:n_packed])
            v_scales.append(t.v_scales[:n_packed])
        slot_base += t[0].shape[0]
        scale_base += n_packed
    k, v = torch.cat(ks), torch.cat(vs)
    if not kinds:
        return StackedTables(SlotTables(k, v), tuple(rows))
    n_packed = scale_base  # > 0: the kernel reads codes where a row's slot is below its own count
    return StackedTables(SlotTables(k, v, torch.cat(k_scales), torch.cat(v_scales), n_packed, kinds.pop()),
                         tuple(rows))


def gather_attend_table_batched(
    q: Tensor, like_k: Tensor, like_v: Tensor, ids: Tensor, stacked: StackedTables, *, scale: float,
    lengths: Sequence[int] | None = None, num_splits: int | None = None, launch: DecodeLaunch = DEFAULT_LAUNCH,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """gather_attend_table for B sequences in one launch.

    q: [B, H_q, D]; like_k, like_v: the row layout [rows, H_kv, D] every slot shares (dtype,
    strides); ids: [B, H_kv, n] or [B, n] (shared over KV heads), any strides with n contiguous,
    sequence b's row ids in its own slots (as for gather_attend_table over its own table), -1 =
    padding, not range-checked;
    stacked: stack_tables of the B sequences' tables, in q's order; lengths: per sequence the
    ids in use (ids[b, ..., :lengths[b]]; the rest are never read), default n for all.
    Returns (out [B, H_q, D] in q.dtype, lse [B, H_q] fp32), row b = gather_attend_table of
    sequence b; a sequence with no key gives out = 0, lse = -inf.
    """
    nb = _validate(q, like_k, like_v, ids, stacked)
    n = ids.shape[-1]
    lengths = [n] * nb if lengths is None else list(lengths)
    if len(lengths) != nb or any(not 0 <= int(m) <= n for m in lengths):
        raise ValueError(f"gather_attend_table_batched: lengths must give one count in [0, n={n}] per "
                         f"sequence ({nb}), got {lengths}")
    meta = torch.tensor([[*r, int(m)] for r, m in zip(stacked.rows, lengths, strict=True)], dtype=torch.int64)
    meta = meta.to(q.device, non_blocking=True)
    t = stacked.tables
    codes = (t.k_scales, t.v_scales, t.n_packed, t.kind) if t.kind is not None and t.n_packed else None
    if codes is not None and not (like_k.is_contiguous() and like_v.is_contiguous()):
        raise ValueError("gather_attend_table_batched: 8-bit slots need contiguous model-dtype rows "
                         f"[rows, H_kv, D] as like_k / like_v, got strides {like_k.stride()}")
    ids = ids if ids.stride(-1) == 1 else ids.contiguous()  # other strides are passed to the kernel
    return _attend_rows(q.contiguous(), like_k, like_v, ids, n, scale, num_splits, launch,
                        tables=(t.k, t.v, 1), codes=codes, row_meta=meta)


def _validate(q: Tensor, like_k: Tensor, like_v: Tensor, ids: Tensor, stacked: StackedTables) -> int:
    """The cheap checks of the hot path; returns B."""
    op = "gather_attend_table_batched"
    checks.require_dim("q", q, 3, "[B, H_q, D] (one decode token per sequence)")
    checks.require_dim("like_k", like_k, 3, "[rows, H_kv, D] (token-major)")
    checks.require_float("q", q)
    checks.require_float("like_k", like_k, q.dtype)
    checks.require_index("ids", ids)
    nb, hq, d = q.shape
    hkv = like_k.shape[1]
    if not 1 <= nb <= MAX_BATCH_ROWS:
        raise ValueError(f"{op}: B must lie in [1, {MAX_BATCH_ROWS}], got {nb}; split the batch")
    if like_k.stride() != like_v.stride() or like_k.dtype != like_v.dtype or like_k.shape[1:] != like_v.shape[1:]:
        raise ValueError(f"{op}: keys and values must share dtype and row layout")
    if like_k.shape[2] != d or hq % hkv:
        raise ValueError(f"{op}: q [B, H_q={hq}, D={d}] needs rows [rows, H_kv, D={d}] with H_q a multiple of "
                         f"H_kv, got like_k {tuple(like_k.shape)}")
    if ids.shape not in ((nb, hkv, ids.shape[-1]), (nb, ids.shape[-1])):
        raise ValueError(f"{op}: ids must be [B={nb}, H_kv={hkv}, n] or [B={nb}, n], got {tuple(ids.shape)}")
    if len(stacked.rows) != nb:
        raise ValueError(f"{op}: stacked tables hold {len(stacked.rows)} sequences but q has {nb}; stack one "
                         "table per sequence, in q's order")
    checks.require_same_device(op, q, ids=ids, k_table=stacked.tables.k, v_table=stacked.tables.v)
    checks.require_runnable(q.device, _split_kernel, op)
    checks.require_last_dim_contiguous("like_k", like_k)
    return nb


def fixed_splits(n_kv: int, batch: int, device: torch.device, launch: DecodeLaunch = DEFAULT_LAUNCH) -> int:
    """Splits per sequence of a launch whose key counts are not known when it is made: enough
    (KV head, split, sequence) programs to fill the device (launch.programs_per_sm per SM),
    whatever the lengths; INTERPRETER_SPLITS on the CPU."""
    if device.type != "cuda":
        return INTERPRETER_SPLITS
    target = checks.sm_count(device.index or 0) * launch.programs_per_sm
    return max(1, triton.cdiv(target, n_kv * batch))


def attend_table_fixed(
    q: Tensor, like: Tensor, k_table: Tensor, v_table: Tensor, row_meta: Tensor, *, scale: float,
    num_splits: int, ids: Tensor | None = None, launch: DecodeLaunch = DEFAULT_LAUNCH,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """One decode token of each of B sequences over n_b rows of its own slots, with every size
    fixed: the counts are read on the device and the grid is the caller's.

    q: [B, H_q, D]; like: [rows, H_kv, D] the row layout every slot shares (dtype, strides);
    k_table, v_table: [n_slots] int64 slot base addresses; row_meta: [B, 5] int64 on q's device,
    per sequence (slot base, slot rows, 0, 0, n_b): row r lives in slot slot_base + r // slot_rows;
    n_b = 0 reads nothing (a padding row: out 0, lse -inf).
    ids: None, sequence b reads its rows 0 .. n_b - 1 (a dense KV buffer); or [B, H_kv, n] / [B, n]
    (shared over KV heads), n contiguous, a fixed width (a budget), sequence b reads the rows
    ids[b, ..., :n_b] (-1 = padding; not range-checked), n_b <= n.
    num_splits: S, the grid's splits per (KV head, sequence), fixed (fixed_splits).
    Returns (out [B, H_q, D] in q.dtype, lse [B, H_q] fp32). No host sync and no host-to-device
    copy: the launch is the same every step, so a CUDA graph can hold it."""
    op = "attend_table_fixed"
    checks.require_dim("q", q, 3, "[B, H_q, D] (one decode token per sequence)")
    checks.require_dim("like", like, 3, "[rows, H_kv, D] (token-major)")
    checks.require_float("q", q)
    checks.require_float("like", like, q.dtype)
    nb, hq, d = q.shape
    hkv = like.shape[1]
    if not 1 <= nb <= MAX_BATCH_ROWS or like.shape[2] != d or hq % hkv:
        raise ValueError(f"{op}: q [B in 1..{MAX_BATCH_ROWS}, H_q, D] needs rows [rows, H_kv, D] "
                         f"with H_q a multiple of H_kv, got q {tuple(q.shape)}, like {tuple(like.shape)}")
    if row_meta.shape != (nb, 5) or row_meta.dtype != torch.int64 or not row_meta.is_contiguous():
        raise ValueError(f"{op}: row_meta must be contiguous [B={nb}, 5] int64, got "
                         f"{row_meta.dtype} {tuple(row_meta.shape)}")
    if k_table.dtype != torch.int64 or v_table.dtype != torch.int64 or k_table.dim() != 1 or v_table.dim() != 1:
        raise ValueError(f"{op}: k_table, v_table must be [n_slots] int64 base addresses")
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"{op}: num_splits must be an int >= 1, got {num_splits!r}")
    n = launch.block_n * num_splits  # only sizes the fallback arithmetic: each row sizes its own splits
    if ids is not None:
        checks.require_index("ids", ids)
        if ids.shape not in ((nb, hkv, ids.shape[-1]), (nb, ids.shape[-1])) or ids.stride(-1) != 1:
            raise ValueError(f"{op}: ids must be [B={nb}, H_kv={hkv}, n] or [B={nb}, n], contiguous along n, "
                             f"got {tuple(ids.shape)} with strides {ids.stride()}")
        checks.require_same_device(op, q, ids=ids)
    checks.require_same_device(op, q, k_table=k_table, v_table=v_table, row_meta=row_meta)
    checks.require_runnable(q.device, _split_kernel, op)
    checks.require_last_dim_contiguous("like", like)
    return _attend_rows(q.contiguous(), like, like, ids, n, scale, num_splits, launch,
                        tables=(k_table, v_table, 1), row_meta=row_meta, even_splits=True)

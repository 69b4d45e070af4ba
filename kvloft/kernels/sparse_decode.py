"""Sparse decode attention for one query token, in Triton (split-K, "flash-decoding").

Two sources of keys, one kernel:
  decode_attend   contiguous token-major k, v [T, H_kv, D] (the sink + window segment;
                  key order does not matter because keys are stored after RoPE);
  gather_attend   rows picked through index lists ids [H_kv, n] (per KV head) or [n]
                  (shared), -1 = padding, from token-major k_rows, v_rows [N, H_kv, D].
                  The gather is fused: the kernel reads rows by index, so the selected
                  rows are never copied. k_rows/v_rows may be pinned host tensors when q
                  is on CUDA: the GPU then reads them zero-copy over PCIe.
  gather_attend_chunks  the same over rows kept in equal chunks (a host tier grown chunk
                  by chunk): each row's chunk is found through a table of base addresses.
  gather_attend_table   the same over any regions laid out in slots of equal rows through
                  a caller-made address table (runtime/rowspace.py: a layer's host chunks,
                  its static tier and its cached selection in one launch).

The kernel, its grid, memory traffic and arithmetic: kernels/split_kernel.py; its launcher
and launch parameters: kernels/split_launch.py. Here: the entry points and their checks.
Reference: kernels/reference.py `decode_attend`, `gather_attend`, `rotate_keys`; for 8-bit
rows, rowquant.dequantize_rows followed by `gather_attend`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from kvloft.kernels import checks
from kvloft.kernels.rowquant import PackedChunks
from kvloft.kernels.split_kernel import _split_kernel
from kvloft.kernels.split_launch import DEFAULT_LAUNCH, DecodeLaunch, _attend_rows

__all__ = ["DEFAULT_LAUNCH", "DecodeLaunch", "SlotTables", "decode_attend", "gather_attend", "gather_attend_chunks",
           "gather_attend_table"]


def _validate_qkv(op: str, q: Tensor, k: Tensor, v: Tensor, kname: str, vname: str) -> None:
    checks.require_dim("q", q, 2, "[H_q, D] (one decode token)")
    checks.require_dim(kname, k, 3, "[N, H_kv, D] (token-major)")
    checks.require_float("q", q)
    checks.require_float(kname, k, q.dtype)
    checks.require_float(vname, v, q.dtype)
    if v.shape != k.shape:
        raise ValueError(f"{op}: {vname} has shape {tuple(v.shape)} but {kname} has {tuple(k.shape)}")
    hq, d = q.shape
    hkv = k.shape[1]
    if hkv == 0 or hq % hkv:
        raise ValueError(
            f"{op}: query heads ({hq}) must be a multiple of KV heads ({hkv}); check the head layout"
        )
    if k.shape[2] != d:
        raise ValueError(f"{op}: q has head dim {d} but {kname} has {k.shape[2]}")
    checks.require_runnable(q.device, _split_kernel, op)
    checks.require_last_dim_contiguous(kname, k)
    checks.require_last_dim_contiguous(vname, v)


def decode_attend(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, num_splits: int | None = None,
    launch: DecodeLaunch = DEFAULT_LAUNCH,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """One query token over contiguous keys.

    q: [H_q, D]; k, v: [T, H_kv, D] (strided rows are fine, the head dim must be contiguous).
    Returns (out [H_q, D] in q.dtype, lse [H_q] fp32). num_splits overrides the split count.
    """
    _validate_qkv("decode_attend", q, k, v, "k", "v")
    checks.require_same_device("decode_attend", q, k=k, v=v)
    q = q.contiguous()
    return _attend_rows(q, k, v, None, k.shape[0], scale, num_splits, launch)


def _validate_ids(ids: Tensor, n_kv: int) -> None:
    checks.require_index("ids", ids)
    if ids.dim() == 1 or (ids.dim() == 2 and ids.shape[0] == n_kv):
        return
    raise ValueError(
        f"gather_attend: ids must be [H_kv={n_kv}, n] (per KV head) or [n] (shared), "
        f"got shape {tuple(ids.shape)}"
    )


def _validate_rotation(
    rot_delta: Tensor | None, inv_freq: Tensor | None, ids: Tensor, q: Tensor, n_kv: int
) -> tuple[Tensor, Tensor] | None:
    """Checks rot_delta/inv_freq; returns (delta, inv_freq fp32), both contiguous, or None."""
    if rot_delta is None and inv_freq is None:
        return None
    if rot_delta is None or inv_freq is None:
        raise ValueError("gather_attend: pass rot_delta and inv_freq together (or neither)")
    checks.require_index("rot_delta", rot_delta)
    n, d = ids.shape[-1], q.shape[1]
    if rot_delta.shape not in ((n,), (n_kv, n)):
        raise ValueError(
            f"gather_attend: rot_delta must be [H_kv={n_kv}, n={n}] or [n={n}] (one delta per id), "
            f"got shape {tuple(rot_delta.shape)}"
        )
    if d % 2 or inv_freq.shape != (d // 2,) or not inv_freq.is_floating_point():
        raise ValueError(
            f"gather_attend: inv_freq must be a float [D/2={d // 2}] (the model's RoPE inv_freq, even "
            f"head dim), got {inv_freq.dtype} {tuple(inv_freq.shape)} for head dim {d}"
        )
    checks.require_same_device("gather_attend", q, rot_delta=rot_delta, inv_freq=inv_freq)
    if inv_freq.dtype != torch.float32:  # the model keeps it fp32: no copy per call
        inv_freq = inv_freq.float()
    return rot_delta.contiguous(), inv_freq.contiguous()


def gather_attend(
    q: Tensor, k_rows: Tensor, v_rows: Tensor, ids: Tensor, *, scale: float,
    check_ids: bool | None = None, num_splits: int | None = None,
    launch: DecodeLaunch = DEFAULT_LAUNCH,
    rot_delta: Tensor | None = None, inv_freq: Tensor | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """One query over rows picked by index lists; the gather is fused into the kernel.

    q: [H_q, D]; k_rows, v_rows: [N, H_kv, D] on q's device, or pinned host tensors
    (zero-copy) with q on CUDA; ids: [H_kv, n] or [n], int32/int64, -1 = padding.
    check_ids: verify -1 <= ids < N (one min/max; None = only for ids on the CPU, since on
    CUDA it waits for the device). Unchecked out-of-range ids read out of bounds.
    rot_delta: optional [H_kv, n] or [n] int32/int64 positions, aligned with ids, on q's
    device: the key of each id is rotated by its delta before the dot (RoPE position
    remapping); needs inv_freq [D/2] (the model's RoPE inverse frequencies) on q's device.
    Returns (out [H_q, D] in q.dtype, lse [H_q] fp32); n = 0 gives out = 0, lse = -inf.
    """
    _validate_qkv("gather_attend", q, k_rows, v_rows, "k_rows", "v_rows")
    _validate_ids(ids, k_rows.shape[1])
    checks.require_same_device("gather_attend", q, ids=ids)
    checks.require_rows_device("gather_attend", q, k_rows=k_rows, v_rows=v_rows)
    if checks.want_id_check(check_ids, ids):
        checks.check_ids_range("gather_attend", ids, k_rows.shape[0], allow_padding=True)
    rot = _validate_rotation(rot_delta, inv_freq, ids, q, k_rows.shape[1])
    q = q.contiguous()
    ids = ids.contiguous()
    return _attend_rows(q, k_rows, v_rows, ids, ids.shape[-1], scale, num_splits, launch, rot)


def gather_attend_chunks(
    q: Tensor, k_chunks: Sequence[Tensor], v_chunks: Sequence[Tensor], ids: Tensor, *, scale: float,
    tables: tuple[Tensor, Tensor] | None = None, num_splits: int | None = None,
    launch: DecodeLaunch = DEFAULT_LAUNCH,
    rot_delta: Tensor | None = None, inv_freq: Tensor | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """gather_attend over rows kept in equal chunks (a host tier of several chunks): row r is
    row r % R of chunk r // R, R = the chunks' row count. The kernel finds each row's chunk
    through tables of the chunks' base addresses, so rows are read in place (zero-copy for
    pinned host chunks) with no gather and no concatenation.

    k_chunks, v_chunks: equal lists of tensors [R, H_kv, D] with the same shape, dtype and
    strides (the last chunk may be only partly filled; ids must not point past the filled
    rows). tables: (k_table, v_table), int64 base addresses on q's device
    (checks.address_table, ChunkedRows.pointer_table), made here when None. Other arguments and the result as gather_attend (ids are not
    range-checked).

    8-bit rows (CacheConfig.host_dtype): k_chunks, v_chunks may be kernels/rowquant.py
    PackedChunks (a PackedRows store's `chunks`); the kernel then reads their codes and scales
    in place and dequantizes in registers, and `tables` are the codes' chunk addresses
    (PackedRows.pointer_table).
    """
    if isinstance(k_chunks, PackedChunks) or isinstance(v_chunks, PackedChunks):
        return _gather_packed_chunks(q, k_chunks, v_chunks, ids, scale=scale, tables=tables, num_splits=num_splits,
                                     launch=launch, rot_delta=rot_delta, inv_freq=inv_freq)
    if not k_chunks or len(k_chunks) != len(v_chunks):
        raise ValueError(f"gather_attend_chunks: needs as many value chunks as key chunks (>= 1), "
                         f"got {len(k_chunks)} and {len(v_chunks)}")
    k0, v0 = k_chunks[0], v_chunks[0]
    _validate_qkv("gather_attend_chunks", q, k0, v0, "k_chunks[0]", "v_chunks[0]")
    for name, chunks, first in (("k_chunks", k_chunks, k0), ("v_chunks", v_chunks, v0)):
        if any(c.shape != first.shape or c.dtype != first.dtype or c.stride() != first.stride() for c in chunks):
            raise ValueError(f"gather_attend_chunks: every tensor of {name} must match the first in shape, "
                             "dtype and strides")
        checks.require_rows_device("gather_attend_chunks", q, **{f"{name}[{i}]": c for i, c in enumerate(chunks)})
    _validate_ids(ids, k0.shape[1])
    checks.require_same_device("gather_attend_chunks", q, ids=ids)
    rot = _validate_rotation(rot_delta, inv_freq, ids, q, k0.shape[1])
    if tables is None:
        tables = checks.address_table(k_chunks, q.device), checks.address_table(v_chunks, q.device)
    q = q.contiguous()
    ids = ids.contiguous()
    return _attend_rows(q, k0, v0, ids, ids.shape[-1], scale, num_splits, launch, rot,
                        tables=(tables[0], tables[1], k0.shape[0]))


def _gather_packed_chunks(
    q: Tensor, k_chunks: PackedChunks, v_chunks: PackedChunks, ids: Tensor, *, scale: float,
    tables: tuple[Tensor, Tensor] | None, num_splits: int | None, launch: DecodeLaunch,
    rot_delta: Tensor | None, inv_freq: Tensor | None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """gather_attend_chunks over 8-bit chunks: codes [R, H_kv, D] and scales [R, H_kv] fp32."""
    if not (isinstance(k_chunks, PackedChunks) and isinstance(v_chunks, PackedChunks)) or not len(k_chunks) \
            or len(k_chunks) != len(v_chunks) or k_chunks.kind != v_chunks.kind:
        raise ValueError("gather_attend_chunks: 8-bit keys need 8-bit values of the same format and chunk count "
                         "(two PackedRows stores' chunks)")
    c0 = k_chunks.codes[0]
    checks.require_dim("q", q, 2, "[H_q, D] (one decode token)")
    checks.require_float("q", q)
    hq, d = q.shape
    r, hkv = c0.shape[0], c0.shape[1]
    for name, chunks in (("k_chunks", k_chunks), ("v_chunks", v_chunks)):
        for c, s in zip(chunks.codes, chunks.scales):
            if c.shape != (r, hkv, d) or not c.is_contiguous() or s.shape != (r, hkv) or not s.is_contiguous() \
                    or s.dtype != torch.float32:
                raise ValueError(f"gather_attend_chunks: {name} codes must be contiguous [R={r}, H_kv={hkv}, D={d}] "
                                 f"and scales contiguous fp32 [R, H_kv], got {tuple(c.shape)} and "
                                 f"{s.dtype} {tuple(s.shape)}")
        named = {f"{name}.codes[{i}]": c for i, c in enumerate(chunks.codes)}
        checks.require_rows_device("gather_attend_chunks", q, **named)
    if hq % hkv:
        raise ValueError(f"gather_attend_chunks: query heads ({hq}) must be a multiple of KV heads ({hkv})")
    checks.require_runnable(q.device, _split_kernel, "gather_attend_chunks")
    _validate_ids(ids, hkv)
    checks.require_same_device("gather_attend_chunks", q, ids=ids)
    rot = _validate_rotation(rot_delta, inv_freq, ids, q, hkv)
    if tables is None:
        tables = checks.address_table(k_chunks.codes, q.device), checks.address_table(v_chunks.codes, q.device)
    like = q.new_empty((1, hkv, d))  # the rows' layout in the model dtype (codes share its element strides)
    codes = (k_chunks.scale_table(q.device), v_chunks.scale_table(q.device), len(k_chunks), k_chunks.kind)
    ids = ids.contiguous()
    return _attend_rows(q.contiguous(), like, like, ids, ids.shape[-1], scale, num_splits, launch, rot,
                        tables=(tables[0], tables[1], r), codes=codes)


class SlotTables(NamedTuple):
    """gather_attend_table's address tables: k, v [n_slots] int64 slot base addresses; with an
    8-bit host tier, slots 0 .. n_packed-1 hold codes (`kind` "fp8" / "int8") whose scales
    ([slot_rows, H_kv] fp32) start at k_scales / v_scales [n_packed] int64; later slots hold
    rows in the model dtype. A plain (k, v) pair means n_packed = 0."""

    k: Tensor
    v: Tensor
    k_scales: Tensor | None = None
    v_scales: Tensor | None = None
    n_packed: int = 0
    kind: str | None = None


def gather_attend_table(
    q: Tensor, like_k: Tensor, like_v: Tensor, ids: Tensor, tables: tuple[Tensor, Tensor] | SlotTables,
    slot_rows: int, *, scale: float, num_splits: int | None = None, launch: DecodeLaunch = DEFAULT_LAUNCH,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """gather_attend over rows addressed through tables of slot base addresses: row r is row
    r % slot_rows of the slot whose base address is tables[0][r // slot_rows] (keys) and
    tables[1][r // slot_rows] (values). A slot may point into a host chunk, a device
    buffer or anywhere inside a larger tensor, so rows of several regions (host tier,
    static tier, a cached selection) are read in one launch with no copy. With SlotTables
    holding 8-bit slots (an 8-bit host tier), those slots' codes are read and dequantized in
    the kernel (code * scale, rounded to like_k's dtype) and the other slots as they are.

    like_k, like_v: a tensor of the regions' row layout [rows, H_kv, D] (dtype, strides;
    every region must share them). ids: [H_kv, n] or [n], -1 = padding; not range-checked
    (the caller builds them from the table it made). The decode hot path: the checks are
    the cheap ones. Returns (out [H_q, D] in q.dtype, lse [H_q] fp32).
    """
    if ids.dim() not in (1, 2) or (ids.dim() == 2 and ids.shape[0] != like_k.shape[1]):
        raise ValueError(f"gather_attend_table: ids must be [H_kv={like_k.shape[1]}, n] or [n], "
                         f"got shape {tuple(ids.shape)}")
    if like_k.stride() != like_v.stride() or like_k.dtype != like_v.dtype:
        raise ValueError("gather_attend_table: keys and values must share dtype and row layout")
    codes = None
    if isinstance(tables, SlotTables) and tables.kind is not None and tables.n_packed:
        if not (like_k.is_contiguous() and like_v.is_contiguous()):  # the codes' chunks are contiguous
            raise ValueError("gather_attend_table: 8-bit slots need contiguous model-dtype rows [rows, H_kv, D] "
                             f"as like_k / like_v, got strides {like_k.stride()}")
        codes = (tables.k_scales, tables.v_scales, tables.n_packed, tables.kind)
    return _attend_rows(q.contiguous(), like_k, like_v, ids.contiguous(), ids.shape[-1], scale, num_splits,
                        launch, None, tables=(tables[0], tables[1], slot_rows), codes=codes)

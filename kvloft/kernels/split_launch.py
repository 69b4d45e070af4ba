"""Launcher of the split-K decode kernel (kernels/split_kernel.py): launch parameters, the
split count, placeholders for the inputs a launch does not use, and the merge of the S partials
(kernels/merge.py). The entry points that validate their inputs are in kernels/sparse_decode.py
and kernels/batched_decode.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from kvloft.kernels import checks
from kvloft.kernels.addresses import table_align
from kvloft.kernels.merge import merge_stacked
from kvloft.kernels.rowquant import CODES_FLAG
from kvloft.kernels.split_kernel import _split_kernel

__all__ = ["DEFAULT_LAUNCH", "INTERPRETER_SPLITS", "DecodeLaunch"]

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class DecodeLaunch:
    """Launch parameters of the split kernel.

    block_n: keys per inner step; num_warps / num_stages: Triton's; programs_per_sm: how
    many (KV head, split) programs to aim for per multiprocessor; min_split: fewest keys a
    split gets, so the partials stay small next to the rows. Defaults: the best of an
    81-config sweep on the H200 (bench/gpu_kernels.py --sweep; docs/kernels.md).
    """

    block_n: int = 128
    num_warps: int = 4
    num_stages: int = 2
    programs_per_sm: int = 2
    min_split: int = 64


DEFAULT_LAUNCH = DecodeLaunch()
# The interpreter runs every program in Python: few splits keep CPU tests fast, >1 tests merging.
INTERPRETER_SPLITS = 3


def _num_splits(n: int, n_kv: int, device: torch.device, launch: DecodeLaunch) -> int:
    max_splits = triton.cdiv(n, launch.min_split)
    if device.type != "cuda":
        return min(max_splits, INTERPRETER_SPLITS)
    target = checks.sm_count(device.index or 0) * launch.programs_per_sm
    return max(1, min(max_splits, triton.cdiv(target, n_kv)))


def _attend_rows(
    q: Tensor,  # [H_q, D], or [B, H_q, D] with row_meta
    k: Tensor,  # [N, H_kv, D]
    v: Tensor,  # [N, H_kv, D]
    ids: Tensor | None,  # [H_kv, n] / [n] (with row_meta [B, H_kv, n] / [B, n]) or None (all N rows in order)
    n: int,
    scale: float,
    num_splits: int | None,
    launch: DecodeLaunch,
    rot: tuple[Tensor, Tensor] | None = None,  # (delta [H_kv, n] / [n], inv_freq [D/2] fp32)
    tables: tuple[Tensor, Tensor, int] | None = None,  # (k_table, v_table, chunk_rows): k, v are chunk 0
    codes: tuple[Tensor, Tensor, int, str] | None = None,  # with tables: (ks_table, vs_table, n_packed, kind)
    row_meta: Tensor | None = None,  # [B, 5] int64 per batch row (with tables; see _split_kernel)
    even_splits: bool = False,  # with row_meta: split each row's own key count over `num_splits` splits
) -> tuple[Tensor, Tensor]:
    hq, d = q.shape[-2:]
    hkv = k.shape[1]
    nb = q.shape[0] if row_meta is not None else 1
    if n == 0 or d == 0 or nb == 0:
        return q.new_zeros(q.shape), torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
    group = hq // hkv
    splits = num_splits or _num_splits(n, hkv * nb, q.device, launch)
    split_len = triton.cdiv(triton.cdiv(n, splits), launch.block_n) * launch.block_n
    if not even_splits:  # even splits keep the grid the caller fixed (each row sizes its own splits)
        splits = triton.cdiv(n, split_len)  # no empty trailing split
    out_part = torch.empty((splits, nb * hq, d), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((splits, nb * hq), dtype=torch.float32, device=q.device)
    batched = row_meta is not None
    ids_arg = ids if ids is not None else q  # placeholder pointer, never read
    stride_ih = ids.stride(-2) if ids is not None and ids.dim() == 2 + batched else 0
    stride_ib = ids.stride(0) if batched and ids is not None else 0
    delta, inv_freq = rot if rot is not None else (q, q)  # placeholders, never read
    stride_dh = 0 if rot is None or delta.dim() == 1 else delta.stride(0)
    k_table, v_table, chunk_rows = tables if tables is not None else (q, q, 1)  # placeholders unless chunked
    assert codes is None or tables is not None
    assert not batched or (tables is not None and rot is None)
    ks_table, vs_table, n_packed, kind = codes if codes is not None else (q, q, 0, None)
    _split_kernel[(hkv, splits, nb)](
        q, k, v, ids_arg, k_table, v_table, chunk_rows, ks_table, vs_table, n_packed, delta, inv_freq,
        row_meta if batched else q, out_part, lse_part,
        n, split_len, group, scale * LOG2E,
        q.stride(0) if batched else 0, stride_ib,
        q.stride(-2), k.stride(0), k.stride(1), v.stride(0), v.stride(1), stride_ih, stride_dh,
        HAS_IDS=ids is not None,
        ROTATE=rot is not None,
        CHUNKED=tables is not None,
        CODES=CODES_FLAG[kind],
        ROW_META=batched,
        EVEN_SPLITS=even_splits,
        HEAD_DIM=d,
        BLOCK_G=max(16, checks.next_pow2(group)),
        BLOCK_N=launch.block_n,
        BLOCK_D=max(16, checks.next_pow2(d)),
        BLOCK_H=max(16, checks.next_pow2(d // 2)),
        ALIGN=table_align(k, v) if tables is not None else 1,
        num_warps=launch.num_warps,
        num_stages=launch.num_stages,
    )  # fmt: skip
    out, lse = merge_stacked(out_part, lse_part, q.dtype)
    return out.view(q.shape), lse.view(q.shape[:-1])

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

Grid (H_kv, S): program (h, s) takes KV head h and the s-th slice of the key list, and
all G = H_q / H_kv query heads of that group, so every K/V row is read once per group.
It runs an online softmax over blocks of BLOCK_N keys (two tensor-core dots per block,
the G query rows padded to BLOCK_G >= 16) and writes a partial (out, lse); merge.py's
kernel combines the S partials.

Memory traffic (gather, n ids, D, itemsize b): read n*H_kv*(idx_bytes + 2*D*b) (ids +
K + V rows; shared ids are read once per KV head) + H_q*D*b (q); partials write and
read back S*H_q*(D + 1)*4 bytes, small next to the rows for S <= n / 64.

Accumulation is fp32; P is rounded to the value dtype before the P.V dot, as in
FlashAttention. lse is the natural log of the softmax denominator of the scaled logits.

Position remapping (gather_attend with rot_delta, DESIGN.md Positions): each gathered key
is rotated by its own delta of positions before the q.K dot, so keys stored after RoPE at
their true positions are read as if stored at new ones. The tile is loaded as its two
D/2 halves (rotate-half layout), the angle delta * theta is reduced modulo one turn in
fp64 (exact at 1M positions; an fp32 product would be off by up to 0.03 rad there), the
rotation runs in fp32, and the rotated halves are rounded back to the key dtype before two
q.K dots (q's halves against K's), as if the key had been stored at its new position.
Extra traffic: 8 bytes of delta per (KV head, key), next to 2*D*b of K and V.
8-bit rows (CacheConfig.host_dtype; kernels/rowquant.py): with CODES, chunks below n_packed
hold one-byte codes and an fp32 scale per row and KV head; each is loaded as a byte, scaled
in fp32 and rounded to the model dtype before the dots (the reference dequantizes first, the
same arithmetic). Traffic per packed row and head: D + 4 bytes for K and again for V, about
half of 2 * D * b for bf16.
Reference: kernels/reference.py `decode_attend`, `gather_attend`, `rotate_keys`; for 8-bit
rows, rowquant.dequantize_rows followed by `gather_attend`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from kvloft.kernels import checks
from kvloft.kernels.merge import merge_stacked
from kvloft.kernels.rowquant import CODES_FLAG, PackedChunks

__all__ = ["DecodeLaunch", "SlotTables", "decode_attend", "gather_attend", "gather_attend_chunks",
           "gather_attend_table"]

LOG2E = 1.4426950408889634
TWO_PI = tl.constexpr(6.283185307179586)  # multiplies an fp32 fraction of a turn only


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


# Sizes vary per call: specializing on them would recompile for every new length.
@triton.jit(do_not_specialize=["n_keys", "split_len", "group", "stride_ib", "stride_ih", "stride_dh", "chunk_rows",
                               "n_packed"])
def _split_kernel(
    q,  # [H_q, D] (or [B, H_q, D] with ROW_META), last dim contiguous
    k,  # [N, H_kv, D] rows (token-major), last dim contiguous
    v,  # [N, H_kv, D]
    ids,  # [H_kv, n] or [n] (ROW_META: [B, H_kv, n] or [B, n]) int32/int64, contiguous along n
    k_table,  # [n_chunks] int64 base addresses of equal key chunks (CHUNKED; k is the first)
    v_table,  # [n_chunks] int64 base addresses of the value chunks (CHUNKED; v is the first)
    chunk_rows,  # rows per chunk (CHUNKED): row r lives in chunk r // chunk_rows
    ks_table,  # [n_packed] int64 base addresses of the key scales [chunk_rows, H_kv] fp32 (CODES)
    vs_table,  # [n_packed] int64 base addresses of the value scales (CODES)
    n_packed,  # CODES: chunks 0 .. n_packed-1 hold 8-bit codes, the rest model-dtype rows
    rot_delta,  # [H_kv, n] or [n] int32/int64, aligned with ids (unused when not ROTATE)
    inv_freq,  # [D/2] fp32 RoPE inverse frequencies (unused when not ROTATE)
    row_meta,  # [B, 5] int64 (ROW_META): per batch row its slot base, slot rows, n_packed, scale base, n_keys
    out_part,  # [S, B, H_q, D] fp32 (B = 1 without ROW_META)
    lse_part,  # [S, B, H_q] fp32
    n_keys,
    split_len,
    group,
    qk_scale,  # softmax scale * log2(e): the kernel works in base 2
    stride_qb,  # ROW_META: batch strides of q and ids
    stride_ib,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_ih,  # 0 for shared ids
    stride_dh,  # 0 for shared deltas
    HAS_IDS: tl.constexpr,
    ROTATE: tl.constexpr,
    CHUNKED: tl.constexpr,  # rows spread over chunks found through k_table / v_table
    CODES: tl.constexpr,  # CHUNKED: 0 = every chunk in the model dtype; 1 int8 / 2 fp8 e4m3 codes in the packed ones
    ROW_META: tl.constexpr,  # CHUNKED, grid (H_kv, S, B): batch row b reads its own q, ids and row_meta[b]
    EVEN_SPLITS: tl.constexpr,  # ROW_META: each row spreads its own key count over the grid's S splits
    HEAD_DIM: tl.constexpr,  # a constant, so the d-mask keeps 16-byte vector loads
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,  # next_pow2(HEAD_DIM / 2), >= 16 (the rotate-half halves)
):
    tl.static_assert(BLOCK_G >= 16)  # tl.dot needs every dimension >= 16
    tl.static_assert(BLOCK_N >= 16)
    tl.static_assert(BLOCK_D >= 16)
    tl.static_assert(not ROW_META or (CHUNKED and not ROTATE))
    tl.static_assert(ROW_META or not EVEN_SPLITS)
    kv_head = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2)
    n_q = tl.num_programs(0) * group
    slot_base = 0  # the batch row's first slot in k_table / v_table and first scale in ks_table / vs_table
    scale_base = 0
    if ROW_META:  # every batch row has its own slots, slot size, packed slots and key count
        meta = row_meta + b.to(tl.int64) * 5
        slot_base = tl.load(meta)
        chunk_rows = tl.load(meta + 1)
        n_packed = tl.load(meta + 2)
        scale_base = tl.load(meta + 3)
        n_keys = tl.load(meta + 4)
        q += b.to(tl.int64) * stride_qb
        ids += b.to(tl.int64) * stride_ib
        if EVEN_SPLITS:  # the grid is fixed (a captured step), the key counts are not
            split_len = tl.cdiv(tl.cdiv(n_keys, tl.num_programs(1)), BLOCK_N) * BLOCK_N
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    gmask = g < group
    dmask = d < HEAD_DIM
    q_heads = kv_head * group + g
    if ROTATE:
        HALF: tl.constexpr = HEAD_DIM // 2
        hh = tl.arange(0, BLOCK_H)
        hmask = hh < HALF
        q_half = q + q_heads[:, None] * stride_qh + hh[None, :]
        q1 = tl.load(q_half, mask=gmask[:, None] & hmask[None, :], other=0.0)
        q2 = tl.load(q_half + HALF, mask=gmask[:, None] & hmask[None, :], other=0.0)
        # turns per position, fp64 (tl.full keeps the fp64 constant exact; a literal would be fp32)
        inv_two_pi = tl.full([BLOCK_H], 0.15915494309189535, tl.float64)
        turns_per_pos = tl.load(inv_freq + hh, mask=hmask, other=0.0).to(tl.float64) * inv_two_pi
    else:
        qb = tl.load(
            q + q_heads[:, None] * stride_qh + d[None, :], mask=gmask[:, None] & dmask[None, :], other=0.0
        )
    k_head = k + kv_head.to(tl.int64) * stride_kh
    v_head = v + kv_head.to(tl.int64) * stride_vh
    start = split * split_len
    end = tl.minimum(start + split_len, n_keys)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for s0 in range(start, end, BLOCK_N):
        pos = s0 + offs_n
        valid = pos < end
        if HAS_IDS:
            rows = tl.load(ids + kv_head * stride_ih + pos, mask=valid, other=-1).to(tl.int64)
            valid = valid & (rows >= 0)
        else:
            rows = pos.to(tl.int64)
        plain = valid  # rows read in the model dtype; `coded` rows are read as 8-bit codes
        coded = pos < 0  # none
        k_scale = tl.zeros([BLOCK_N], tl.float32)
        v_scale = tl.zeros([BLOCK_N], tl.float32)
        if CHUNKED:  # each row's chunk base from the tables (padding reads chunk 0, masked)
            safe = tl.where(valid, rows, 0)
            ci = safe // chunk_rows
            ri = safe % chunk_rows
            k_addr = tl.load(k_table + slot_base + ci)
            v_addr = tl.load(v_table + slot_base + ci)
            k_off = ri * stride_kn + kv_head.to(tl.int64) * stride_kh  # [BLOCK_N] row offsets (elements)
            v_off = ri * stride_vn + kv_head.to(tl.int64) * stride_vh
            k_row = k_addr.to(tl.pointer_type(k.dtype.element_ty)) + k_off  # [BLOCK_N] row pointers
            v_row = v_addr.to(tl.pointer_type(v.dtype.element_ty)) + v_off
            if CODES != 0:  # a row's codes sit at the same element offset as a model-dtype row's
                coded = valid & (ci < n_packed)
                plain = valid & (ci >= n_packed)
                if CODES == 1:  # int8 codes
                    kc_row = k_addr.to(tl.pointer_type(tl.int8)) + k_off
                    vc_row = v_addr.to(tl.pointer_type(tl.int8)) + v_off
                else:  # fp8 e4m3 bits, kept as uint8
                    kc_row = k_addr.to(tl.pointer_type(tl.uint8)) + k_off
                    vc_row = v_addr.to(tl.pointer_type(tl.uint8)) + v_off
                s_off = ri * tl.num_programs(0) + kv_head  # scales are [R, H_kv], contiguous
                k_scale = tl.load(tl.load(ks_table + scale_base + ci, mask=coded, other=0)
                                  .to(tl.pointer_type(tl.float32)) + s_off, mask=coded, other=0.0)
                v_scale = tl.load(tl.load(vs_table + scale_base + ci, mask=coded, other=0)
                                  .to(tl.pointer_type(tl.float32)) + s_off, mask=coded, other=0.0)
            else:
                kc_row, vc_row = k_row, v_row  # never read
        else:
            k_row = k_head + rows * stride_kn
            v_row = v_head + rows * stride_vn
            kc_row, vc_row = k_row, v_row  # never read
        vb = _load_rows(v_row, vc_row, v_scale, d, plain, coded, dmask, CODES)
        if ROTATE:
            delta = tl.load(rot_delta + kv_head * stride_dh + pos, mask=valid, other=0)
            k1 = _load_rows(k_row, kc_row, k_scale, hh, plain, coded, hmask, CODES)
            k2 = _load_rows(k_row + HALF, kc_row + HALF, k_scale, hh, plain, coded, hmask, CODES)
            s = _rotated_logits(q1, q2, k1, k2, delta, turns_per_pos)
        else:
            kb = _load_rows(k_row, kc_row, k_scale, d, plain, coded, dmask, CODES)
            s = tl.dot(qb, tl.trans(kb), input_precision="ieee")  # [BLOCK_G, BLOCK_N]
        s = s * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid key yet: keep weights 0
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision="ieee")
        m_i = m_new

    nonempty = l_i > 0
    l_safe = tl.where(nonempty, l_i, 1.0)
    out_v = acc / l_safe[:, None]
    lse_v = tl.where(nonempty, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    row = (split.to(tl.int64) * tl.num_programs(2) + b) * n_q + q_heads
    tl.store(out_part + row[:, None] * HEAD_DIM + d[None, :], out_v, mask=gmask[:, None] & dmask[None, :])
    tl.store(lse_part + row, lse_v, mask=gmask)


@triton.jit
def _load_rows(rows, code_rows, scale, cols, plain, coded, cmask, CODES: tl.constexpr):
    """Tile [BLOCK_N, len(cols)] of rows in the model dtype: rows [BLOCK_N] pointers read where
    `plain`; with CODES, code_rows [BLOCK_N] pointers to 8-bit codes read where `coded` and
    dequantized (code * scale[n] in fp32, rounded to the model dtype, as rowquant's reference).
    Masked-off loads move no bytes: a packed row costs D bytes + one scale, not D * itemsize."""
    x = tl.load(rows[:, None] + cols[None, :], mask=plain[:, None] & cmask[None, :], other=0.0)
    if CODES != 0:
        c = tl.load(code_rows[:, None] + cols[None, :], mask=coded[:, None] & cmask[None, :], other=0)
        if CODES == 2:
            cf = c.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        else:
            cf = c.to(tl.float32)
        x = tl.where(coded[:, None], (cf * scale[:, None]).to(x.dtype), x)
    return x


@triton.jit
def _rotated_logits(q1, q2, k1, k2, delta, turns_per_pos):
    """q.K^T [BLOCK_G, BLOCK_N] with each K row rotated by delta[n] positions (rotate-half).

    q1, q2: [BLOCK_G, BLOCK_H] q's halves; k1, k2: [BLOCK_N, BLOCK_H] K's halves (masked
    loads); delta [BLOCK_N] int; turns_per_pos [BLOCK_H] fp64.
    """
    turns = delta.to(tl.float64)[:, None] * turns_per_pos[None, :]  # [BLOCK_N, BLOCK_H] fp64
    frac = (turns - turns.to(tl.int64).to(tl.float64)).to(tl.float32)  # in (-1, 1)
    ang = frac * TWO_PI
    c = tl.cos(ang)
    sn = tl.sin(ang)
    k1f = k1.to(tl.float32)
    k2f = k2.to(tl.float32)
    r1 = (k1f * c - k2f * sn).to(k1.dtype)
    r2 = (k2f * c + k1f * sn).to(k1.dtype)
    s = tl.dot(q1, tl.trans(r1), input_precision="ieee")
    return s + tl.dot(q2, tl.trans(r2), input_precision="ieee")


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
        num_warps=launch.num_warps,
        num_stages=launch.num_stages,
    )  # fmt: skip
    out, lse = merge_stacked(out_part, lse_part, q.dtype)
    return out.view(q.shape), lse.view(q.shape[:-1])


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

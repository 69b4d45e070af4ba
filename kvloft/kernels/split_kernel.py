"""The split-K ("flash-decoding") Triton kernel of one query token over K/V rows: the kernel
behind kernels/sparse_decode.py's entry points, launched by kernels/split_launch.py.

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

import triton
import triton.language as tl

from kvloft.kernels.addresses import rebase

__all__: list[str] = []  # the kernel is launched through kernels/split_launch.py

TWO_PI = tl.constexpr(6.283185307179586)  # multiplies an fp32 fraction of a turn only


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
    ALIGN: tl.constexpr = 1,  # CHUNKED: chunk bases lie a multiple of ALIGN elements from k / v (addresses.py)
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
            k_row = rebase(k, k_addr, ALIGN) + k_off  # [BLOCK_N] row pointers (16-byte loads: addresses.py)
            v_row = rebase(v, v_addr, ALIGN) + v_off
            if CODES != 0:  # a row's codes sit at the same element offset as a model-dtype row's
                coded = valid & (ci < n_packed)
                plain = valid & (ci >= n_packed)
                code_align: tl.constexpr = ALIGN * (k.dtype.element_ty.primitive_bitwidth // 8)
                if CODES == 1:  # int8 codes
                    kc_row = rebase(k.to(tl.pointer_type(tl.int8)), k_addr, code_align) + k_off
                    vc_row = rebase(v.to(tl.pointer_type(tl.int8)), v_addr, code_align) + v_off
                else:  # fp8 e4m3 bits, kept as uint8
                    kc_row = rebase(k.to(tl.pointer_type(tl.uint8)), k_addr, code_align) + k_off
                    vc_row = rebase(v.to(tl.pointer_type(tl.uint8)), v_addr, code_align) + v_off
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

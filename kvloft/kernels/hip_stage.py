"""HiP chunk representatives: hierarchical top-1 search inside fixed-size chunks.

One pruning stage of HiP (arXiv 2406.09827, InfiniteHiP arXiv 2502.08910) splits its
candidate tokens into chunks of `chunk` tokens (a power of two) and finds, per chunk,
one representative key by halving the chunk log2(chunk) times: each iteration reads
two probe keys (one per half: its first key, or its middle key), scores each against
the decode query (max over query heads of q_h · k, GQA: head h reads KV head
h // group) and keeps the half whose probe scores higher. The chunk's score is the
score of the key the search ends on. Padding rows (past `n_rows`, or id -1) score -inf.

Cost per chunk: 2 * log2(chunk) key rows read (1 when chunk == 1), each [H_kv, D].

`hierarchical_top1` is the torch implementation over arbitrary candidate lists. One
Triton kernel, `hip_search_kernel` (kernels/hip_kernel.py), serves two launchers here, each
with its torch twin, and the batched one of kernels/hip_batched.py:

- `hip_stage1` (`hip_stage1_reference`): the first stage, whose candidates are all the
  rows of one contiguous token-major buffer (one chunk of the key store);
- `hip_stage` (`hip_stage_reference`): a later stage, whose candidates are row ids
  [C, L] into a chunked store (tiers/chunked.py); the kernel reads each probe row
  through a table of the chunks' base addresses, so nothing is gathered or copied and
  the whole stage is one launch (a torch gather over chunks costs a sync per chunk).

8-bit host rows (CacheConfig.host_dtype; kernels/rowquant.py): `hip_stage` also takes a
PackedRows store's chunks (rowquant.PackedChunks: codes [R, H_kv, D] one byte each, scales
[R, H_kv] fp32, each found through its own address table, the layout split_kernel.py reads
with CODES). A probe then loads the row's codes and its per-head scales and dequantizes in
registers as split_kernel.py's `_load_rows` does (code * scale in fp32, rounded to the model
dtype), so its score is the reference's over `dequantize_rows`. A probe row costs
H_kv * (D + 4) bytes instead of H_kv * D * 2 for bf16.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from kvloft.kernels import checks
from kvloft.kernels.addresses import table_align
from kvloft.kernels.hip_kernel import hip_search_kernel
from kvloft.kernels.rowquant import CODES_FLAG, PackedChunks, dequantize_rows

__all__ = [
    "PROBES",
    "hierarchical_top1",
    "hip_stage",
    "hip_stage1",
    "hip_stage1_reference",
    "hip_stage_reference",
    "probe_scores",
    "probes_per_chunk",
]

PROBES = ("first", "middle")


def probe_scores(keys: Tensor, q: Tensor, bias: Tensor | None = None) -> Tensor:
    """Max over query heads of q_h · k - bias_h: keys [P, H_kv, D], q [H_q, D], bias None or
    [H_q] fp32 (HipParams rank="z": q and bias z-score each head's logits) -> [P] fp32."""
    hkv, d = keys.shape[1], keys.shape[2]
    qg = q.float().view(hkv, q.shape[0] // hkv, d)  # [H_kv, G, D]
    logits = torch.bmm(keys.float().transpose(0, 1), qg.transpose(1, 2))  # [H_kv, P, G]
    if bias is not None:
        logits = logits - bias.float().view(hkv, 1, q.shape[0] // hkv)
    return logits.amax(dim=(0, 2))


def probes_per_chunk(chunk: int) -> int:
    """Probe rows the search reads per chunk: 2 per halving (1 for a chunk of one row)."""
    return 1 if chunk == 1 else 2 * (chunk.bit_length() - 1)


def hierarchical_top1(
    cand: Tensor, fetch: Callable[[Tensor], Tensor], q: Tensor, probe: str = "first", bias: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Representative of each chunk of candidates.

    cand: [C, L] int64 row ids, -1 = padding (L a power of two; a chunk's first id is valid).
    fetch: ids [P] (all valid) -> keys [P, H_kv, D].
    q: [H_q, D]; bias: None or [H_q] fp32, subtracted from head h's logits (probe_scores).
    Returns (rep [C] int64 row ids, score [C] fp32). Reads C * probes_per_chunk(L) probe
    slots (padding slots are skipped here; the kernel re-reads a real row for them).
    """
    n_chunks, length = cand.shape
    if length == 1:
        return cand[:, 0], _scores_or_ninf(cand[:, 0], fetch, q, bias)
    lo = torch.zeros(n_chunks, dtype=torch.long, device=cand.device)  # start of the live range
    best = torch.full((n_chunks,), float("-inf"), device=cand.device)
    while length > 1:
        half = length // 2
        off = 0 if probe == "first" else half // 2
        pos = torch.stack([lo + off, lo + half + off])  # [2, C]
        ids = cand.gather(1, pos.t()).t()  # [2, C]
        s = _scores_or_ninf(ids.reshape(-1), fetch, q, bias).view(2, n_chunks)
        right = s[1] > s[0]
        lo = torch.where(right, lo + half, lo)
        best = torch.where(right, s[1], s[0])
        length = half
    return cand.gather(1, lo[:, None])[:, 0], best


def _scores_or_ninf(ids: Tensor, fetch: Callable[[Tensor], Tensor], q: Tensor, bias: Tensor | None) -> Tensor:
    valid = ids >= 0
    out = torch.full(ids.shape, float("-inf"), dtype=torch.float32, device=ids.device)
    if bool(valid.all()):
        return probe_scores(fetch(ids), q, bias)
    out[valid] = probe_scores(fetch(ids[valid]), q, bias)
    return out


def hip_stage1_reference(keys: Tensor, q: Tensor, chunk: int, probe: str = "first",
                         bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """keys [R, H_kv, D] contiguous rows, q [H_q, D], bias None or [H_q] fp32 -> (rep [C] row
    index, score [C] fp32), C = ceil(R/chunk)."""
    n_rows = keys.shape[0]
    n_chunks = -(-n_rows // chunk)
    cand = torch.arange(n_chunks * chunk, device=keys.device).view(n_chunks, chunk)
    cand = cand.masked_fill(cand >= n_rows, -1)
    return hierarchical_top1(cand, lambda ids: keys[ids], q, probe, bias)


def hip_stage_reference(chunks: Sequence[Tensor] | PackedChunks, cand: Tensor, q: Tensor, probe: str = "first",
                        bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """chunks: equal store chunks [R, H_kv, D], or a PackedRows store's PackedChunks (each probe
    row dequantized: rowquant.dequantize_rows); cand [C, L] row ids (-1 pad); bias None or [H_q]
    fp32 -> (rep [C] ids, score [C] fp32)."""
    return hierarchical_top1(cand, _chunk_rows(chunks), q, probe, bias)


def _chunk_rows(chunks: Sequence[Tensor] | PackedChunks) -> Callable[[Tensor], Tensor]:
    """fetch(ids [P]) -> rows [P, H_kv, D] of a chunk list (8-bit chunks: dequantized rows)."""
    if isinstance(chunks, PackedChunks):
        rows = chunks.codes[0].shape[0]

        def packed(ids: Tensor) -> Tensor:
            at = [(int(i) // rows, int(i) % rows) for i in ids]
            codes = torch.stack([chunks.codes[c][r] for c, r in at])
            scales = torch.stack([chunks.scales[c][r] for c, r in at])
            return dequantize_rows(codes, scales, chunks.kind, chunks.dtype)

        return packed
    rows = chunks[0].shape[0]
    return lambda ids: torch.stack([chunks[int(i) // rows][int(i) % rows] for i in ids])


def _check_common(op: str, keys: Tensor, q: Tensor, chunk: int, probe: str, kernel, codes: bool = False) -> None:
    checks.require_dim("keys", keys, 3, "[R, H_kv, D]")
    checks.require_dim("q", q, 2, "[H_q, D]")
    if not codes:
        checks.require_float("keys", keys)
    checks.require_float("q", q)
    checks.require_rows_device(op, q, keys=keys)  # on q's device, or pinned host memory (zero-copy)
    checks.require_runnable(q.device, kernel, op)
    checks.require_last_dim_contiguous("keys", keys)
    hkv, d = keys.shape[1], keys.shape[2]
    if q.shape[1] != d or q.shape[0] % hkv:
        raise ValueError(f"{op}: q must be [H_q, {d}] with H_q a multiple of {hkv}, got {tuple(q.shape)}")
    check_search(op, chunk, probe)


def check_search(op: str, chunk: int, probe: str) -> None:
    """The search's own arguments: chunk a power of two, probe one of PROBES."""
    if chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f"{op}: chunk must be a power of two >= 1, got {chunk}")
    if probe not in PROBES:
        raise ValueError(f"{op}: probe must be one of {PROBES}, got {probe!r}")


def kernel_meta(hq: int, hkv: int, d: int, chunk: int, probe: str) -> dict:
    """The constexpr arguments of a search kernel for H_q query heads over [*, H_kv, D] keys."""
    return {"H_Q": hq, "GROUP": hq // hkv, "D": d, "BLOCK_H": checks.next_pow2(hq), "BLOCK_D": checks.next_pow2(d),
            "CHUNK": chunk, "LOG2_CHUNK": chunk.bit_length() - 1, "MIDDLE": probe == "middle"}


def _bias_args(op: str, bias: Tensor | None, q: Tensor) -> dict:
    """The kernel's bias arguments: none (HAS_BIAS off, the launch as without a bias), or bias
    [H_q] fp32 on q's device (one row: the kernel reads it as [1, H_q])."""
    if bias is None:
        return {}
    if bias.shape != (q.shape[0],) or bias.dtype != torch.float32 or bias.device != q.device:
        raise ValueError(f"{op}: bias must be [H_q={q.shape[0]}] float32 on {q.device}, got "
                         f"{tuple(bias.shape)} {bias.dtype} on {bias.device}")
    return {"bias_ptr": bias.contiguous(), "HAS_BIAS": True}


def hip_stage(chunks: Sequence[Tensor] | PackedChunks, cand: Tensor, q: Tensor, probe: str = "first",
              table: Tensor | None = None, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Triton twin of `hip_stage_reference`: one launch for a whole later stage.

    chunks: the store's chunks, each [chunk_rows, H_kv, D], same dtype and strides, on q's
    device or (q on CUDA) in pinned host memory (tiers/chunked.py ChunkedRows.chunks); or an
    8-bit store's PackedChunks (tiers/packed.py PackedRows.chunks: codes read in place with
    their scales, dequantized in registers); cand: [C, L] int64 row ids (-1 = padding,
    a chunk's first id valid; ids are trusted: the caller built them from the store).
    table: the chunks' base addresses on q's device (ChunkedRows.pointer_table; for 8-bit
    chunks the codes' addresses, PackedRows.pointer_table), made here when None. bias: None or
    [H_q] fp32 on q's device, subtracted from head h's logits (probe_scores). Reads 2 * log2(L)
    probe rows per chunk plus the C * L ids.
    """
    op = "hip_stage"
    if not len(chunks):
        raise ValueError(f"{op}: the store has no chunks; select on an empty layer returns early")
    packed = isinstance(chunks, PackedChunks)
    k0 = chunks.codes[0] if packed else chunks[0]  # (indexing PackedChunks would dequantize a copy)
    _check_common(op, k0, q, cand.shape[-1] if cand.dim() == 2 else 0, probe, hip_search_kernel, codes=packed)
    if cand.dim() != 2 or cand.dtype != torch.int64 or cand.device != q.device:
        raise ValueError(f"{op}: cand must be [C, L] int64 on {q.device}, got {tuple(cand.shape)} {cand.dtype}")
    tensors = chunks.codes if packed else chunks
    if any(c.shape != k0.shape or c.dtype != k0.dtype or c.stride() != k0.stride() for c in tensors):
        raise ValueError(f"{op}: every chunk must match the first in shape, dtype and strides")
    codes = codes_args(op, chunks, q) if packed else {}
    n_chunks, chunk = cand.shape
    rep = torch.empty(n_chunks, dtype=torch.long, device=q.device)
    score = torch.empty(n_chunks, dtype=torch.float32, device=q.device)
    if n_chunks == 0:
        return rep, score
    if table is None:
        table = checks.address_table(tensors, q.device)
    hip_search_kernel[(n_chunks, 1)](
        table, k0, cand.contiguous(), q.contiguous(), rep, rep, score, n_chunks, 1, 0, k0.shape[0], 0, chunk,
        k0.stride(0), k0.stride(1), IMPLICIT=False, TABLE=table_align(k0), PER_ROW=False,
        **kernel_meta(q.shape[0], k0.shape[1], k0.shape[2], chunk, probe), **_bias_args(op, bias, q), **codes,
    )
    return rep, score


ROUND_FLAG = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # hip_search_kernel's ROUND per model dtype


def codes_args(op: str, chunks: PackedChunks, q: Tensor, scale_table: Tensor | None = None) -> dict:
    """The kernel's 8-bit arguments for a PackedRows store's chunks: codes [R, H_kv, D] and
    scales [R, H_kv] fp32, both contiguous, on q's device or pinned (the layout split_kernel.py
    reads); the scales' address table (scale_table, [T] int64 on q's device, in the order of the
    codes' table; None: the store's own); the format and the model dtype rows round to."""
    c0 = chunks.codes[0]
    r, hkv, d = c0.shape
    for i, (c, s) in enumerate(zip(chunks.codes, chunks.scales, strict=True)):
        if not c.is_contiguous() or s.shape != (r, hkv) or not s.is_contiguous() or s.dtype != torch.float32:
            raise ValueError(f"{op}: 8-bit chunk {i} must hold contiguous codes [R={r}, H_kv={hkv}, D={d}] and "
                             f"contiguous fp32 scales [R, H_kv], got {tuple(c.shape)} and {s.dtype} {tuple(s.shape)}")
    # (the first chunks stand for all, as k0 does: a store pins every chunk or none)
    checks.require_rows_device(op, q, codes=c0, scales=chunks.scales[0])
    if chunks.dtype not in ROUND_FLAG:
        raise ValueError(f"{op}: 8-bit rows dequantize to float32, float16 or bfloat16, got {chunks.dtype}")
    if scale_table is None:
        scale_table = chunks.scale_table(q.device)
    elif scale_table.dim() != 1 or scale_table.dtype != torch.int64 or scale_table.device != q.device:
        raise ValueError(f"{op}: scale_table must be [T] int64 on {q.device} (the scales' chunk addresses), "
                         f"got {tuple(scale_table.shape)} {scale_table.dtype} on {scale_table.device}")
    return {"scale_ptr": scale_table, "CODES": CODES_FLAG[chunks.kind], "ROUND": ROUND_FLAG[chunks.dtype]}


def hip_stage1(keys: Tensor, q: Tensor, chunk: int, probe: str = "first",
               bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Triton twin of `hip_stage1_reference` (same arguments and results).

    keys [R, H_kv, D] (rows of one chunk of the key store), q [H_q, D] on the same device.
    One program per chunk; reads 2 * log2(chunk) rows of [H_kv, D] per chunk (the probe
    rows, each fetched as H_q head slices; the group's repeats hit L1).
    """
    op = "hip_stage1"
    _check_common(op, keys, q, chunk, probe, hip_search_kernel)
    n_rows = keys.shape[0]
    n_chunks = -(-n_rows // chunk)
    rep = torch.empty(n_chunks, dtype=torch.long, device=q.device)
    score = torch.empty(n_chunks, dtype=torch.float32, device=q.device)
    if n_chunks == 0:
        return rep, score
    hip_search_kernel[(n_chunks, 1)](
        keys, keys, rep, q.contiguous(), rep, rep, score, n_chunks, 1, n_rows, 1, 0, 0,
        keys.stride(0), keys.stride(1), IMPLICIT=True, TABLE=0, PER_ROW=False,
        **kernel_meta(q.shape[0], keys.shape[1], keys.shape[2], chunk, probe), **_bias_args(op, bias, q),
    )
    return rep, score

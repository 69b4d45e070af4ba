"""GGUF tensors into packed weights (kernels/quant/packed.py) for load_model(..., weights=...).

What each GGUF type of a linear weight becomes (`storage`), by the scheme asked for:

  type                 "int4"                          "int8"
  Q4_0, Q4_1           int4, group 32, bit-exact        requantized (int8, per channel)
  Q4_K                 int4, group 32, see below        requantized (int8, per channel)
  Q8_0, Q5_0           int8, group 32, bit-exact        int8, group 32, bit-exact
  Q5_1, Q5_K, Q6_K     int8, group 32, requantized      int8, group 32, requantized
  anything else        requantized by the scheme (int4: group = quant_group; int8: per channel)

"Bit-exact": the packed weight dequantizes to gguf.quants.dequantize's values exactly
(Q4_0/Q4_1/Q8_0: the same bytes; Q5_0: q - 16 stored as int8 beside the block's d).
Q4_K is repacked without a second quantization: each 32-value sub-block j of a 256-value
super-block gets s = d * sc_j and m = -dmin * m_j (the 6-bit scale and min), rounded to
fp16, so |packed - gguf| <= |q * (s16 - s)| + |m16 - m| (+ fp32 rounding of the sum),
about 2^-11 of the weight. Types of more than 4 bits stay 8-bit under "int4" rather than
losing bits; those without an exact int8 form are quantized again from their dequantized
values to int8 with one fp16 scale per 32 inputs: |err| <= s / 2 + 127 eps(s), s =
fp16(absmax / 127), eps(s) its fp16 rounding (0.56 s in all for a normal s: about 0.14
of the step of the group's coarser Q6_K sub-block). A model loaded as "int4" from a Q4_K_M file is then a
mix of int4 and int8 QuantLinears (runtime/quant_linear.py runs each with its kernel).
Non-linear tensors (embeddings, norms, biases) come through as fp32.

`packed_tensors(..., keep_gguf=False)` is the rule before Q4_K and the 8-bit types were
kept: only Q4_0/Q4_1 (int4) and Q8_0 (int8) repack, everything else is requantized by the
scheme (bench/quant_error.py compares the two).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from kvloft.config import ModelConfig
from kvloft.kernels.quant.packed import PackedWeight, quantize_int8
from kvloft.runtime.gguf_quants import QK_K, f16, q5_values, scale_min_k4
from kvloft.runtime.gguf_weights import GGUFFile, hf_name, unpermute_rope
from kvloft.runtime.quant_linear import LINEARS, QuantScheme

DIRECT = {"Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q8_0": 8, "Q5_0": 8}  # GGUF type -> the bits it repacks to
LEGACY_DIRECT = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}  # keep_gguf=False: the types repacked before
WIDE = ("Q5_1", "Q5_K", "Q6_K")  # more than 4 bits, no exact int8 form: int8 group 32, requantized
GGUF_GROUP = 32  # the group of every repacked or kept-8-bit GGUF weight, whatever quant_group says
_BYTES = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q8_0": (32, 34), "Q5_0": (32, 22), "Q4_K": (QK_K, 144)}


def repack_q4(raw: Tensor, shape: tuple[int, int], with_min: bool) -> PackedWeight:
    """Q4_0 (18-byte blocks: d, 16 nibble bytes) or Q4_1 (20: d, m, 16) bytes [n_bytes] uint8
    of a weight [N, K] -> int4 PackedWeight with group 32 (symmetric for Q4_0)."""
    n, k = shape
    head = 4 if with_min else 2
    blocks = raw.reshape(n, k // 32, head + 16)
    scales = blocks[..., 0:2].contiguous().view(torch.float16).reshape(n, k // 32)
    mins = blocks[..., 2:4].contiguous().view(torch.float16).reshape(n, k // 32) if with_min else None
    qweight = blocks[..., head:].reshape(n, k // 2).contiguous()
    return PackedWeight(qweight, scales.contiguous(), mins if mins is None else mins.contiguous(), (n, k), 4, 32)


def repack_q4_k(raw: Tensor, shape: tuple[int, int]) -> PackedWeight:
    """Q4_K bytes [n_bytes] uint8 of a weight [N, K] (K % 256 == 0; 144-byte super-blocks:
    d, dmin fp16, 12 bytes of 6-bit scales and mins, 128 nibble bytes) -> int4 PackedWeight,
    group 32, asymmetric: s = fp16(d * sc_j), m = fp16(-dmin * m_j) per 32-value sub-block.
    Nibbles: Q4_K holds each 64 values as 32 bytes (low nibbles = values 0..31, high =
    32..63); the packed block of 32 holds value j low and j + 16 high in byte j."""
    n, k = shape
    b = raw.reshape(n * k // QK_K, 144)
    sc, mn = scale_min_k4(b[:, 4:16])  # [n_sb, 8] uint8 each
    scales = (f16(b[:, 0:2]) * sc.float()).half().reshape(n, k // 32)  # exact in fp32, rounded once
    mins = (-(f16(b[:, 2:4]) * mn.float())).half().reshape(n, k // 32)
    qs = b[:, 16:].reshape(-1, 4, 1, 32)
    q = torch.cat((qs & 0x0F, qs >> 4), dim=2).reshape(-1, 32)  # [n_sb * 8, 32]: sub-block order
    qweight = (q[:, :16] | (q[:, 16:] << 4)).reshape(n, k // 2)
    return PackedWeight(qweight, scales, mins, (n, k), 4, 32)


def repack_q8_0(raw: Tensor, shape: tuple[int, int]) -> PackedWeight:
    """Q8_0 bytes (34-byte blocks: d, 32 int8) of a weight [N, K] -> int8 PackedWeight, group 32."""
    n, k = shape
    blocks = raw.reshape(n, k // 32, 34)
    scales = blocks[..., 0:2].contiguous().view(torch.float16).reshape(n, k // 32)
    qweight = blocks[..., 2:].contiguous().view(torch.int8).reshape(n, k)
    return PackedWeight(qweight, scales.contiguous(), None, (n, k), 8, 32)


def repack_q5_0(raw: Tensor, shape: tuple[int, int]) -> PackedWeight:
    """Q5_0 bytes (22-byte blocks: d, 4 bytes of high bits, 16 nibble bytes) of a weight
    [N, K] -> int8 PackedWeight, group 32: q - 16 (-16..15) as int8, s = d (bit-exact)."""
    n, k = shape
    blocks = raw.reshape(n * k // 32, 22)
    q = (q5_values(blocks, 2).to(torch.int8) - 16).reshape(n, k)
    scales = blocks[:, 0:2].contiguous().view(torch.float16).reshape(n, k // 32)
    return PackedWeight(q, scales, None, (n, k), 8, 32)


def repack(raw: Tensor, qtype: str, shape: tuple[int, int]) -> PackedWeight:
    """Raw GGUF bytes of a Q4_0/Q4_1/Q4_K/Q8_0/Q5_0 weight [N, K] -> PackedWeight (no
    second quantization; see the module doc)."""
    if qtype not in DIRECT:
        raise ValueError(f"GGUF type {qtype} has no direct repack; choose one of {sorted(DIRECT)}")
    block, size = _BYTES[qtype]
    if len(shape) != 2 or shape[1] % block:
        raise ValueError(f"a {qtype} weight must be [N, K] with K a multiple of {block}, got {list(shape)}")
    n, k = shape
    if raw.dtype != torch.uint8 or raw.numel() != n * k // block * size:
        raise ValueError(f"a {qtype} weight [{n}, {k}] takes {n * k // block * size} uint8 bytes, "
                         f"got {raw.dtype} [{raw.numel()}]")
    if qtype == "Q4_K":
        return repack_q4_k(raw, shape)
    if qtype == "Q5_0":
        return repack_q5_0(raw, shape)
    return repack_q8_0(raw, shape) if qtype == "Q8_0" else repack_q4(raw, shape, qtype == "Q4_1")


def storage(qtype: str, sch: QuantScheme, keep_gguf: bool = True) -> tuple[str, int, int | None, bool]:
    """How a linear weight of GGUF type `qtype` is held under `sch` -> (how, bits, group, mins):
    how "repacked" (no second quantization), "requantized_int8" (a type of more than 4 bits
    kept at 8) or "requantized" (the scheme's quantizer; group None = per output channel);
    mins: whether it holds int4 mins (Q4_0 and a symmetric scheme do not)."""
    direct = DIRECT if keep_gguf else LEGACY_DIRECT
    if direct.get(qtype) == sch.bits or (keep_gguf and sch.bits == 4 and direct.get(qtype) == 8):
        return "repacked", direct[qtype], GGUF_GROUP, qtype in ("Q4_1", "Q4_K")
    if keep_gguf and qtype in WIDE:
        return "requantized_int8", 8, GGUF_GROUP, False
    if sch.bits == 8:
        return "requantized", 8, sch.group, False
    return "requantized", 4, sch.group or 128, not sch.symmetric


def _is_linear(name: str, sch: QuantScheme, cfg: ModelConfig) -> bool:
    if name == "lm_head.weight":
        return sch.lm_head and not cfg.tie_word_embeddings
    return name.endswith(".weight") and name.removesuffix(".weight").split(".", 2)[-1] in LINEARS


def linear_storage(gg: GGUFFile, cfg: ModelConfig, sch: QuantScheme,
                   keep_gguf: bool = True) -> dict[str, tuple[int, int | None, bool]]:
    """{HF module name of each quantized linear: (bits, group, mins)} from the header alone:
    what packed_tensors makes of the file, for scheduler/budget.py weight_bytes(storage=)."""
    out = {}
    for t in gg.infos:
        name = hf_name(t.name)
        if _is_linear(name, sch, cfg):
            out[name.removesuffix(".weight")] = storage(t.qtype, sch, keep_gguf)[1:]
    return out


def packed_tensors(gg: GGUFFile, cfg: ModelConfig, sch: QuantScheme, stats: dict[str, int] | None = None,
                   keep_gguf: bool = True) -> Iterator[tuple[str, Tensor | PackedWeight]]:
    """Yield (HF name, fp32 tensor or PackedWeight) one at a time, in file order, in HF layout.
    stats (optional) counts tensors by how they came: "repacked", "requantized_int8",
    "requantized", "dense". keep_gguf=False: the older rule (module doc)."""
    stats = {} if stats is None else stats
    for t, raw in gg.raw_tensors():
        name = hf_name(t.name)
        if not _is_linear(name, sch, cfg):
            stats["dense"] = stats.get("dense", 0) + 1
            yield gg.dequantized(t, raw, cfg)
            continue
        how, _, group, _ = storage(t.qtype, sch, keep_gguf)
        pw = repack(raw, t.qtype, t.shape) if how == "repacked" else None
        if pw is not None and not _finite(pw):  # Q4_K's d * sc over fp16's range: no real file has it
            how = "requantized"
        stats[how] = stats.get(how, 0) + 1
        if how == "repacked":
            yield name, _hf_rows(gg, name, pw, cfg)
            continue
        _, w = gg.dequantized(t, raw, cfg)
        yield name, quantize_int8(w, group) if how == "requantized_int8" else sch.quantize(w)


def _finite(pw: PackedWeight) -> bool:
    return bool(torch.isfinite(pw.scales).all()) and (pw.mins is None or bool(torch.isfinite(pw.mins).all()))


def _hf_rows(gg: GGUFFile, name: str, pw: PackedWeight, cfg: ModelConfig) -> PackedWeight:
    """llama.cpp permutes the rows of q/k; undo it on the packed rows (GGUFFile._hf_layout)."""
    if gg.architecture != "llama" or not name.endswith(("q_proj.weight", "k_proj.weight")):
        return pw
    heads = cfg.n_heads if name.endswith("q_proj.weight") else cfg.n_kv_heads
    return pw.rows(unpermute_rope(torch.arange(pw.shape[0]), heads))

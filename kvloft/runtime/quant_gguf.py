"""GGUF tensors into packed weights (kernels/quant/packed.py) for load_model(..., weights=...).

Q4_0, Q4_1 (int4) and Q8_0 (int8) blocks are repacked without dequantizing: their
nibble layout is the packed layout, the fp16 scales (and Q4_1 mins) are copied as they
are, so the packed weight dequantizes bit-exactly to gguf's own dequantization. Every
other quantizable tensor (Q4_K, Q5_*, Q6_K, F16, ... and a Q8_0 tensor under "int4", a
Q4_* tensor under "int8") is dequantized to fp32 and quantized to the scheme, one tensor
at a time. Non-linear tensors (embeddings, norms, biases) come through as fp32.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from kvloft.config import ModelConfig
from kvloft.kernels.quant.packed import PackedWeight
from kvloft.runtime.gguf_weights import GGUFFile, hf_name, unpermute_rope
from kvloft.runtime.quant_linear import LINEARS, QuantScheme

DIRECT = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}  # GGUF type -> the bits it repacks to exactly


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


def repack_q8_0(raw: Tensor, shape: tuple[int, int]) -> PackedWeight:
    """Q8_0 bytes (34-byte blocks: d, 32 int8) of a weight [N, K] -> int8 PackedWeight, group 32."""
    n, k = shape
    blocks = raw.reshape(n, k // 32, 34)
    scales = blocks[..., 0:2].contiguous().view(torch.float16).reshape(n, k // 32)
    qweight = blocks[..., 2:].contiguous().view(torch.int8).reshape(n, k)
    return PackedWeight(qweight, scales.contiguous(), None, (n, k), 8, 32)


def repack(raw: Tensor, qtype: str, shape: tuple[int, int]) -> PackedWeight:
    """Raw GGUF bytes of a Q4_0/Q4_1/Q8_0 weight [N, K] -> PackedWeight (no dequantization)."""
    if qtype not in DIRECT:
        raise ValueError(f"GGUF type {qtype} has no direct repack; choose one of {sorted(DIRECT)}")
    if len(shape) != 2 or shape[1] % 32:
        raise ValueError(f"a {qtype} weight must be [N, K] with K a multiple of 32, got {list(shape)}")
    return repack_q8_0(raw, shape) if qtype == "Q8_0" else repack_q4(raw, shape, qtype == "Q4_1")


def _is_linear(name: str, sch: QuantScheme, cfg: ModelConfig) -> bool:
    if name == "lm_head.weight":
        return sch.lm_head and not cfg.tie_word_embeddings
    return name.endswith(".weight") and name.removesuffix(".weight").split(".", 2)[-1] in LINEARS


def packed_tensors(gg: GGUFFile, cfg: ModelConfig, sch: QuantScheme,
                   stats: dict[str, int] | None = None) -> Iterator[tuple[str, Tensor | PackedWeight]]:
    """Yield (HF name, fp32 tensor or PackedWeight) one at a time, in file order, in HF layout.
    stats (optional) counts tensors by how they came: "repacked", "requantized", "dense"."""
    stats = {} if stats is None else stats
    for t, raw in gg.raw_tensors():
        name = hf_name(t.name)
        if not _is_linear(name, sch, cfg):
            stats["dense"] = stats.get("dense", 0) + 1
            yield gg.dequantized(t, raw, cfg)
            continue
        if DIRECT.get(t.qtype) == sch.bits:
            pw = repack(raw, t.qtype, t.shape)
            stats["repacked"] = stats.get("repacked", 0) + 1
        else:
            _, w = gg.dequantized(t, raw, cfg)
            stats["requantized"] = stats.get("requantized", 0) + 1
            yield name, sch.quantize(w)
            continue
        yield name, _hf_rows(gg, name, pw, cfg)


def _hf_rows(gg: GGUFFile, name: str, pw: PackedWeight, cfg: ModelConfig) -> PackedWeight:
    """llama.cpp permutes the rows of q/k; undo it on the packed rows (GGUFFile._hf_layout)."""
    if gg.architecture != "llama" or not name.endswith(("q_proj.weight", "k_proj.weight")):
        return pw
    heads = cfg.n_heads if name.endswith("q_proj.weight") else cfg.n_kv_heads
    return pw.rows(unpermute_rope(torch.arange(pw.shape[0]), heads))

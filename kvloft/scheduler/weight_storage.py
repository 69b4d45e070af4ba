"""Bytes of a decoder's weights as they are stored: unquantized, packed int4/int8 by
RuntimeConfig.weights (kernels/quant/packed.py), a GGUF's own blocks, and tinygemm's int4pack
layout beside ours on a CUDA bf16 model. The memory plan (scheduler/budget.py) prices its
`weights` part here.
"""

from __future__ import annotations

from collections.abc import Mapping

from kvloft.config import ModelConfig

__all__ = ["packed_bytes", "weight_bytes"]


def weight_bytes(cfg: ModelConfig, itemsize: int, weights: str = "bf16", quant_group: int = 128,
                 tinygemm: bool = False, storage: Mapping[str, tuple[int, int | None, bool]] | None = None) -> int:
    """Parameters of the decoder (runtime/model.py), tied embeddings counted once. weights
    "int4"/"int8" (RuntimeConfig.weights): the linears (and an untied head) at their packed
    size (kernels/quant/packed.py), as runtime/quant_linear.py quantizes them; "auto" and
    "bf16": unquantized. storage: {linear name ("layers.3.mlp.down_proj", "lm_head"): (bits,
    group, mins)} for linears held otherwise than that rule, as a GGUF's own blocks are
    (runtime/quant_gguf.py linear_storage: int4 group 32 from Q4_*, int8 group 32 from the
    types of more than 4 bits): int4 is K_pad / 2 bytes a row plus 2 (fp16 scale) and 2 more
    with mins per group and row; int8 K_pad bytes a row plus 2 per group and row (group
    None: one per row). tinygemm: int4 linears of a CUDA bf16 model hold PyTorch's int4pack
    layout and its bf16 scales and zeros beside the fp16 scales and mins
    (kernels/quant/tinygemm.py): 4 more bytes per group and output row; int8 ones do not."""
    h, d, hq, hkv, inter = cfg.hidden_size, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.intermediate_size
    leaves = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    shapes = [(hq * d, h), (hkv * d, h), (hkv * d, h), (h, hq * d), (inter, h), (inter, h), (h, inter)]
    storage = storage or {}
    rule = _rule(weights, quant_group)

    def linear(name: str, n: int, k: int) -> int:
        held = storage.get(name, rule)
        return n * k * itemsize if held is None else packed_bytes(n, k, *held, tinygemm=tinygemm)

    total = sum(linear(f"layers.{i}.{leaf}", n, k) for i in range(cfg.n_layers) for leaf, (n, k) in zip(leaves, shapes))
    per_layer = 2 * h * itemsize
    if cfg.attention_bias:
        per_layer += (hq + 2 * hkv) * d * itemsize
    embed = cfg.vocab_size * h * itemsize
    head = 0 if cfg.tie_word_embeddings else linear("lm_head", cfg.vocab_size, h)
    return total + cfg.n_layers * per_layer + embed + head + h * itemsize


def _rule(weights: str, group: int) -> tuple[int, int | None, bool] | None:
    """(bits, group, mins) of a linear quantized by the scheme `weights`; None: unquantized."""
    return {"int4": (4, group, True), "int8": (8, None, False)}.get(weights)


def packed_bytes(n: int, k: int, bits: int, group: int | None, mins: bool, tinygemm: bool = False) -> int:
    """Bytes of one packed linear weight [n, k] (K padded to its group; tinygemm: N padded to 8
    and bf16 scales and zeros as well)."""
    group = group or -(-k // 32) * 32  # per output channel: one group of K rounded up to 32
    kp = -(-k // group) * group
    if bits == 8:
        return n * kp + 2 * n * (kp // group)  # int8 values + an fp16 scale per group
    ours = 2 * (2 if mins else 1) * n * (kp // group)  # fp16 scale (and min) per group
    if tinygemm:  # int4pack nibbles [N_pad, K_pad / 2] + bf16 (scale, zero) + ours
        n_pad = -(-n // 8) * 8
        return n_pad * kp // 2 + 2 * 2 * n_pad * (kp // group) + ours
    return n * kp // 2 + ours

"""The layer split of a pipeline: contiguous layer ranges, one per stage, sized by memory.

Every layer costs the same: its weights plus the KV of `max_tokens` tokens (keys and values,
all KV heads, the model dtype). Without memory budgets the layers are split evenly. With
budgets, stage i gets a share of the layers proportional to its budget, never more than it
can hold; a model + context the whole pipeline cannot hold is refused up front, with the
numbers and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvloft.config import ModelConfig

GIB = 2**30


@dataclass(frozen=True)
class LayerCost:
    """Host bytes of one layer: its weights and its KV per token."""

    weight_bytes: int
    kv_bytes_per_token: int

    def at(self, tokens: int) -> int:
        return self.weight_bytes + self.kv_bytes_per_token * tokens


def layer_cost(cfg: ModelConfig, dtype: torch.dtype) -> LayerCost:
    """One decoder layer's weight bytes and KV bytes per token in `dtype`."""
    item = torch.empty(0, dtype=dtype).element_size()
    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    attn = h * cfg.n_heads * d * 2 + h * cfg.n_kv_heads * d * 2
    if cfg.attention_bias:
        attn += (cfg.n_heads + 2 * cfg.n_kv_heads) * d
    params = attn + 3 * h * i + 2 * h
    return LayerCost(params * item, 2 * cfg.n_kv_heads * d * item)


def split_even(n_layers: int, n_stages: int) -> list[tuple[int, int]]:
    """n_layers into n_stages contiguous ranges [start, stop), sizes differing by at most one."""
    if n_stages > n_layers:
        raise ValueError(f"a pipeline of {n_stages} stages needs at least as many layers; the model has "
                         f"{n_layers}: lower n_stages")
    return _ranges([n_layers // n_stages + (s < n_layers % n_stages) for s in range(n_stages)])


def split_by_memory(n_layers: int, cost: LayerCost, max_tokens: int, memory: tuple[int, ...]) -> list[tuple[int, int]]:
    """Contiguous ranges, stage i's share proportional to memory[i] and within it; a ValueError
    with the numbers when the stages together cannot hold every layer at max_tokens."""
    per_layer = cost.at(max_tokens)
    fits = [m // per_layer for m in memory]
    if sum(fits) < n_layers or len(memory) > n_layers:
        raise ValueError(
            f"{n_layers} layers x {per_layer / GIB:.3f} GiB (weights {cost.weight_bytes / GIB:.3f} + KV of "
            f"{max_tokens} tokens {cost.kv_bytes_per_token * max_tokens / GIB:.3f}) = "
            f"{n_layers * per_layer / GIB:.2f} GiB do not fit {len(memory)} stage(s) of "
            f"{', '.join(f'{m / GIB:.2f}' for m in memory)} GiB (they hold {sum(fits)} layer(s), each stage "
            "needs at least one); add stages or nodes, raise stage_memory, or lower max_tokens"
        )
    total = sum(memory)
    counts = [max(1, min(f, n_layers * m // total)) for f, m in zip(fits, memory)]
    while sum(counts) > n_layers:  # trim the largest share
        counts[max(range(len(counts)), key=lambda s: counts[s])] -= 1
    while sum(counts) < n_layers:  # give a layer to the stage with the most room left, relative to its memory
        s = min((s for s in range(len(counts)) if counts[s] < fits[s]), key=lambda s: counts[s] / memory[s])
        counts[s] += 1
    return _ranges(counts)


def _ranges(counts: list[int]) -> list[tuple[int, int]]:
    out, start = [], 0
    for c in counts:
        out.append((start, start + c))
        start += c
    return out

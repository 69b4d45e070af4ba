"""The engine an EngineLoop (server/batcher.py) runs its decode steps on: `kvloft.Engine(model,
max_batch)` when kvloft provides it, else SequentialFallbackEngine (Session.step per sequence:
the same answers, no batched forward)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["SequentialFallbackEngine", "engine_name", "make_engine"]


class SequentialFallbackEngine:
    """Stand-in for kvloft.Engine where it is missing: Session.step for each pair, stacked.

    Same interface and answers as the batched engine, without its one forward pass for the
    batch (so no batching speed-up). make_engine() picks the real Engine when present."""

    batched = False

    def __init__(self, max_batch: int = 32) -> None:
        self.max_batch = max_batch

    def step(self, pairs: list[tuple[Any, int]]) -> Tensor:
        """pairs [(session, token)] -> logits [B, V] fp32, each token appended to its session."""
        if not 0 < len(pairs) <= self.max_batch:
            raise ValueError(f"a step takes 1..{self.max_batch} (session, token) pairs, got {len(pairs)}")
        if len({id(s) for s, _ in pairs}) != len(pairs):
            raise ValueError("a session appears twice in one step; give each session one token per step")
        return torch.stack([s.step(t).float() for s, t in pairs])


def make_engine(model, max_batch: int, graphs: str = "auto"):
    """kvloft.Engine(model, max_batch=..., graphs=...) if kvloft has it, else
    SequentialFallbackEngine. graphs: the Engine's CUDA graph mode ("auto": segmented graphs;
    "whole": one graph a step where every row's route allows it; "off"; docs/performance.md
    has what each costs)."""
    import kvloft

    engine_cls = getattr(kvloft, "Engine", None)
    if engine_cls is None:
        return SequentialFallbackEngine(max_batch)
    return engine_cls(model, max_batch=max_batch, graphs=graphs)


def engine_name(engine) -> str:
    return "fallback" if isinstance(engine, SequentialFallbackEngine) else type(engine).__name__

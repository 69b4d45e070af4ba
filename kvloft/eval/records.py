"""One run of `kvloft eval` (RunRecord: one sample under one method) and the per-cell summary
of many (score, n, 95% Wilson interval, costs), shared by the runner and the merged report."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

__all__ = ["RunRecord", "summarize", "wilson_interval"]


def wilson_interval(mean: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion `mean` observed over n trials ((0, 1) for n = 0).

    Fractional scores (string_match_all over several references) are treated as that many
    successes; the interval is then an approximation.
    """
    if n == 0:
        return 0.0, 1.0
    denom = 1 + z * z / n
    centre = (mean + z * z / (2 * n)) / denom
    half = z * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class RunRecord:
    """One sample under one method."""

    task: str
    length: int
    index: int
    seed: int
    depth: float | None
    method: str
    prompt_tokens: int
    output: str
    references: list[str]
    score: float
    prefill_s: float
    decode_tokens: int
    decode_ms_per_tok: float | None
    keys_per_step: float | None  # keys attended per decode step, per layer and KV head
    scanned_per_step: float | None  # keys the search scored per decode step and layer (all KV heads)
    budget: int | None = None  # host tokens retrieved per step; None: dense (runs files before it: unknown)
    # "shared": the prompt's one dense prefill (that session, or a fork of it: kvloft.eval.contexts);
    # "own": this method's own prefill (runs files before the field: all "own")
    prefill: str = "own"
    fork_s: float | None = None  # seconds the fork took (tiers and index built from the dense K/V)
    prefill_note: str | None = None  # prefill "own" in a shared-prefill run: why the fork was refused


def _mean(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def summarize(records: list[RunRecord]) -> list[dict[str, Any]]:
    """One cell per (task, length, method), in first-seen order."""
    groups: dict[tuple[str, int, str], list[RunRecord]] = {}
    for r in records:
        groups.setdefault((r.task, r.length, r.method), []).append(r)
    cells = []
    for (task, length, method), rs in groups.items():
        mean = statistics.fmean(r.score for r in rs)
        lo, hi = wilson_interval(mean, len(rs))
        cells.append({
            "task": task, "length": length, "method": method, "n": len(rs), "score": mean,
            "ci95": [lo, hi], "prompt_tokens": statistics.fmean(r.prompt_tokens for r in rs),
            "prefill_s": _mean([r.prefill_s for r in rs]),
            "fork_s": _mean([r.fork_s for r in rs]),
            "decode_ms_per_tok": _mean([r.decode_ms_per_tok for r in rs]),
            "keys_per_step": _mean([r.keys_per_step for r in rs]),
            "scanned_per_step": _mean([r.scanned_per_step for r in rs]),
        })
    return cells

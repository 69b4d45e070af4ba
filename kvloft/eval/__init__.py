"""Offline RULER-style synthetic tasks (passkey, needles, variable tracking, word
extraction) fitted to a token length, and RULER's scorers."""

from kvloft.eval.scoring import METRICS, TASK_METRIC, score, score_all, score_part
from kvloft.eval.tasks import (
    LENGTH_TOLERANCE,
    TASKS,
    Sample,
    TokenizerLike,
    build_prompt,
    generate,
    run_task_samples,
)

__all__ = [
    "LENGTH_TOLERANCE",
    "METRICS",
    "TASKS",
    "TASK_METRIC",
    "Sample",
    "TokenizerLike",
    "build_prompt",
    "generate",
    "run_task_samples",
    "score",
    "score_all",
    "score_part",
]

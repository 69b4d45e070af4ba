"""Scoring of the synthetic tasks as RULER does it: case-insensitive substring matches.

  string_match_all   fraction of the references found in the output (every reference
                     must be produced: needles, variable chains, word lists),
  string_match_part  1 if any reference is found (question answering with aliases).

Outputs are post-processed first as RULER does: stripped, control characters turned
into newlines. Scores are in [0, 1]; RULER reports them x100.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

__all__ = ["METRICS", "TASK_METRIC", "postprocess", "score", "score_all", "score_part"]

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(output: str) -> str:
    return _CONTROL.sub("\n", output.strip()).strip()


def _check(output: str, references: Sequence[str]) -> list[bool]:
    if isinstance(references, str) or not references:
        raise ValueError("references must be a non-empty list of strings, e.g. ['71432']")
    text = postprocess(output).lower()
    return [ref.lower() in text for ref in references]


def score_all(output: str, references: Sequence[str]) -> float:
    """Fraction of `references` found in `output` (RULER's string_match_all)."""
    found = _check(output, references)
    return sum(found) / len(found)


def score_part(output: str, references: Sequence[str]) -> float:
    """1.0 if any of `references` is found in `output`, else 0.0 (RULER's string_match_part)."""
    return float(any(_check(output, references)))


METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "string_match_all": score_all,
    "string_match_part": score_part,
}

# Every task here asks for all of its references; string_match_part is for QA-style
# tasks whose references are alternative answers.
TASK_METRIC: dict[str, str] = {
    "passkey": "string_match_all",
    "niah_single_number": "string_match_all",
    "niah_single_word": "string_match_all",
    "niah_single_uuid": "string_match_all",
    "niah_multikey": "string_match_all",
    "niah_multivalue": "string_match_all",
    "niah_multiquery": "string_match_all",
    "vt": "string_match_all",
    "cwe": "string_match_all",
    "fwe": "string_match_all",
}


def score(task: str, output: str, references: Sequence[str]) -> float:
    """Score one model output for `task` with the task's metric from TASK_METRIC."""
    if task not in TASK_METRIC:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASK_METRIC)}")
    return METRICS[TASK_METRIC[task]](output, references)

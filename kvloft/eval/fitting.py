"""Fitting a task to a token length: the largest number of haystack units whose whole prompt
(as build_prompt joins it, chat template included) fits in `length` tokens of the tokenizer,
found by a secant estimate, galloping and bisection; the result must land within
LENGTH_TOLERANCE of `length`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from kvloft.eval.prompt import TokenizerLike, join_prompt

__all__ = ["LENGTH_TOLERANCE", "Draft", "fit", "fit_units"]

# The fitted prompt is at most the requested length and at most this many tokens short of it.
LENGTH_TOLERANCE = 32


@dataclass
class Draft:
    """A task instance before fitting: everything but the number of haystack units."""

    render: Callable[[int], str]  # units -> context
    question: str
    answer_prefix: str
    references: list[str]
    depth: float | None = None
    needles: list[str] = field(default_factory=list)
    min_units: int = 0  # below this the task is ill-posed
    max_units: int | None = None  # the unit supply; None: unbounded


def fit_units(count: Callable[[int], int], length: int, max_units: int) -> tuple[int, int]:
    """Largest n in [0, max_units] with count(n) <= length, count nondecreasing in n.

    A secant estimate from two probes, then galloping to a bracket and bisection: about
    log2(error of the estimate) + 4 tokenizer calls instead of log2(length).
    """
    cache: dict[int, int] = {}

    def c(n: int) -> int:
        if n not in cache:
            cache[n] = count(n)
        return cache[n]

    base = c(0)
    if base > length:
        raise ValueError(
            f"length {length} is too short: the prompt without haystack takes {base} tokens; "
            f"ask for at least {base + LENGTH_TOLERANCE}"
        )
    probe = min(16, max_units)
    per_unit = max((c(probe) - base) / max(probe, 1), 1e-3)
    n = min(max_units, int((length - base) / per_unit))
    if n > 0 and c(n) > base:  # one secant step from the full-size probe
        n = min(max_units, int((length - base) * n / (c(n) - base)))
    lo, hi = _bracket(c, n, length, max_units)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if c(mid) <= length else (lo, mid)
    return lo, c(lo)


def _bracket(c: Callable[[int], int], n: int, length: int, max_units: int) -> tuple[int, int]:
    """(lo, hi) with c(lo) <= length < c(hi), hi - lo >= 1; hi = max_units + 1 if all fit."""
    if c(n) <= length:
        lo, step = n, 1
        while lo + step <= max_units and c(lo + step) <= length:
            lo, step = lo + step, step * 2
        return lo, min(lo + step, max_units + 1)
    hi, step = n, 1
    while hi - step > 0 and c(hi - step) > length:
        hi, step = hi - step, step * 2
    return max(hi - step, 0), hi


def fit(draft: Draft, tokenizer: TokenizerLike, length: int, chat: tuple[str, str] | None) -> tuple[str, int]:
    def count(n: int) -> int:
        return len(tokenizer.encode(join_prompt(draft.render(n), draft.question, draft.answer_prefix, chat)))

    max_units = draft.max_units if draft.max_units is not None else 4 * length + 64
    n, actual = fit_units(count, length, max_units)
    if n < draft.min_units:
        raise ValueError(
            f"length {length} holds only {n} haystack units, the task needs {draft.min_units}; ask for more tokens"
        )
    if length - actual > LENGTH_TOLERANCE:
        raise RuntimeError(
            f"could not fit {length} tokens within {LENGTH_TOLERANCE}: best was {actual} at {n} units "
            f"(one unit more gives {count(n + 1) if n < max_units else 'no more units'})"
        )
    return draft.render(n), actual

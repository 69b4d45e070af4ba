"""Validation of what a user hands a session: prompts and generation arguments.

Each check raises TypeError for a value of the wrong kind and ValueError for a value out of
range, naming what was expected, what came, and the fix. Nothing here touches a session, so
a rejected call leaves it as it was.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["check_on_progress", "check_token_ids", "generation_stops"]


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_token_ids(prompt: Sequence[int] | Tensor) -> list[int]:
    """Token ids from a 1-D integer tensor or a sequence of Python ints (not bytes, not bools)."""
    if isinstance(prompt, (bytes, bytearray, memoryview)):
        raise TypeError(f"feed got {type(prompt).__name__}, which would be read as token ids; "
                        "decode it to str first (data.decode('utf-8')) or pass a list of int token ids")
    if isinstance(prompt, Tensor):
        if prompt.is_floating_point() or prompt.is_complex() or prompt.dtype == torch.bool:
            raise TypeError(f"token ids must be an integer tensor, got {prompt.dtype}; pass ids, not embeddings")
        if prompt.dim() != 1:
            raise ValueError(f"token ids must be a 1-D tensor [T], got shape {tuple(prompt.shape)}")
        return prompt.tolist()
    if isinstance(prompt, Sequence) and not isinstance(prompt, str):
        bad = next((t for t in prompt if not _is_int(t)), None)
        if bad is None:
            return list(prompt)
        raise TypeError(f"token ids must be Python ints, got {type(bad).__name__} {bad!r}; "
                        "pass a str, a list of int token ids or a 1-D integer tensor")
    raise TypeError(f"feed takes a str, a list of int token ids or a 1-D integer tensor, "
                    f"got {type(prompt).__name__}")


def check_on_progress(on_progress: Any) -> None:
    if on_progress is not None and not callable(on_progress):
        raise TypeError(f"on_progress must be a function (done, total) -> None or None, "
                        f"got {type(on_progress).__name__}")


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _stops(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    elif not isinstance(stop, Sequence) or isinstance(stop, (bytes, bytearray)):
        raise TypeError(f"stop must be a str, a list of str or None, got {type(stop).__name__} {stop!r}")
    stops = list(stop)
    for s in stops:
        if not isinstance(s, str):
            raise TypeError(f"stop strings must be str, got {type(s).__name__} {s!r} in stop={stop!r}")
        if not s:
            raise ValueError("an empty stop string would end generation before the first token; remove it")
    return stops


def generation_stops(max_new_tokens: Any, temperature: Any, top_p: Any, stop: Any, seed: Any) -> list[str]:
    """Check generate()/stream()'s arguments; returns the stop strings as a list."""
    if not _is_int(max_new_tokens):
        raise TypeError(f"max_new_tokens must be an int, got {type(max_new_tokens).__name__} {max_new_tokens!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if _number("temperature", temperature) < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if not 0 < _number("top_p", top_p) <= 1:
        raise ValueError(f"top_p must lie in (0, 1] (1 = no nucleus cut), got {top_p!r}")
    if seed is not None and not _is_int(seed):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__} {seed!r}")
    return _stops(stop)

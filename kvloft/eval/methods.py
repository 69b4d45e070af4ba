"""Method specs of `kvloft eval`: "name[:key=value...][+x]" -> a RetrievalConfig, and whether
a method can run here (its retriever module imports)."""

from __future__ import annotations

import importlib
from typing import Any

from kvloft.config import METHODS, RetrievalConfig
from kvloft.index.base import METHOD_MODULES

__all__ = ["EXTRAPOLATE_SUFFIX", "budget_list", "method_columns", "method_unavailable", "parse_method",
           "retrieval_config"]

EXTRAPOLATE_SUFFIX = "+x"  # "exact+x": the method with position_mode="extrapolate"


def parse_method(spec: str) -> tuple[str, dict[str, Any], str]:
    """"name[:key=value...][+x]" -> (name, RetrievalConfig options, position mode), e.g.
    "exact:rank=prob" or "hip:keys_on=host+x"; values that read as numbers become numbers."""
    mode = "exact"
    if spec.endswith(EXTRAPOLATE_SUFFIX):
        spec, mode = spec[: -len(EXTRAPOLATE_SUFFIX)], "extrapolate"
    name, *pairs = spec.split(":")
    options: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise ValueError(f"method option {pair!r} in {spec!r} must read key=value (e.g. exact:rank=prob)")
        options[key] = _number(value)
    return name, options, mode


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def method_unavailable(method: str) -> str | None:
    """None if `method` can run here, else why not (its module is missing or fails to import)."""
    method = parse_method(method)[0]
    if method not in METHODS:
        return f"unknown method {method!r}; known: {', '.join(METHODS)}"
    if method == "dense":
        return None
    module = f"kvloft.index.{METHOD_MODULES[method]}"
    try:
        importlib.import_module(module)
    except ImportError as e:
        return f"method {method!r} skipped: {module} cannot be imported ({e})"
    return None


def retrieval_config(method: str, budget: int, n_sink: int, n_window: int, max_similar: int | None = None) -> RetrievalConfig:
    """A method name with options (parse_method), and "+x" for the same method with remapped
    positions (extrapolation)."""
    name, options, mode = parse_method(method)
    return RetrievalConfig(method=name, budget=budget, n_sink=n_sink, n_window=n_window, position_mode=mode,
                           max_similar=max_similar, options=options)


def budget_list(budget: int | list[int] | tuple[int, ...]) -> list[int]:
    """The budgets of a run: one int, or several (each method but dense runs at every one)."""
    return list(budget) if isinstance(budget, (list, tuple)) else [budget]


def method_columns(methods: list[str], budget: int | list[int], variant: str = "") -> list[str]:
    """The labels a run gives its methods: the method (and variant) at a single budget, as
    before; with several budgets every method but dense once per budget, "hip@1024", "hip@2048"."""
    budgets = budget_list(budget)
    if len(budgets) == 1:
        return [m + variant for m in methods]
    return [c for m in methods for c in ([m + variant] if m == "dense" else [f"{m}{variant}@{b}" for b in budgets])]

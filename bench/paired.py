"""Two methods on the prompts both ran: agreement, identical outputs, each side's accuracy.

    python bench/paired.py bench/results/h100/s21/qwen/*.runs.jsonl \\
        --pair 'dense[int4,fp8]' dense --pair 'hip[int4,fp8]@2048' hip@2048 [--task T] [--length N] [--json]

Methods are named as `python -m kvloft.eval.report` names its columns ("dense", "hip@2048",
"exact[int4,fp8]@2048"). A prompt is (task, length, seed, index, depth, prompt tokens): the
seed a runs record holds is the sample's own, drawn from the eval seed, length and index, but
the needle's depth is (index + 0.5) / samples, so processes that drew 8 and 10 samples of one
seed share haystacks and not prompts; the token count tells apart templates (chat or plain). Per
(task, length) and over every paired prompt: n, prompts scored the same, identical outputs,
prompts one side answers and the other misses, each side's summed score and accuracy with a
95% Wilson interval (kvloft.eval.records.wilson_interval). When a method ran one prompt more
than once (merged rounds), its first record in file order is kept and the rest counted as
`dropped`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvloft.eval.records import RunRecord, wilson_interval
from kvloft.eval.report import load_runs

PromptKey = tuple[str, int, int, int, float | None, int]  # (task, length, seed, index, depth, prompt tokens)


def by_prompt(records: Sequence[RunRecord], method: str) -> tuple[dict[PromptKey, RunRecord], int]:
    """`method`'s records keyed by prompt (first one kept) and how many repeats were dropped."""
    out: dict[PromptKey, RunRecord] = {}
    dropped = 0
    for r in records:
        if r.method != method:
            continue
        key = (r.task, r.length, r.seed, r.index, r.depth, r.prompt_tokens)
        if key in out:
            dropped += 1
        else:
            out[key] = r
    return out, dropped


def _side(scores: list[float]) -> dict[str, Any]:
    n = len(scores)
    mean = math.fsum(scores) / n if n else 0.0
    lo, hi = wilson_interval(mean, n)
    return {"correct": math.fsum(scores), "accuracy": mean, "ci95": [lo, hi]}


def compare(pairs: list[tuple[RunRecord, RunRecord]]) -> dict[str, Any]:
    """Figures of (a, b) records of the same prompts; scores are equal when |a - b| < 1e-9."""
    same = [abs(a.score - b.score) < 1e-9 for a, b in pairs]
    return {
        "n": len(pairs),
        "same_score": sum(same),
        "same_output": sum(a.output == b.output for a, b in pairs),
        "a_only": sum(a.score > b.score + 1e-9 for a, b in pairs),
        "b_only": sum(b.score > a.score + 1e-9 for a, b in pairs),
        "a": _side([a.score for a, _ in pairs]),
        "b": _side([b.score for _, b in pairs]),
    }


def paired(records: Sequence[RunRecord], a: str, b: str, task: str | None = None,
           length: int | None = None) -> dict[str, Any]:
    """Method `a` against `b` on the prompts both ran (optionally one task / one length):
    {"a", "b", "dropped": {a: k, b: k}, "cells": [per (task, length)], "all": over every pair}."""
    if a == b:
        raise ValueError(f"pair two different methods, got {a!r} twice")
    ra, da = by_prompt(records, a)
    rb, db = by_prompt(records, b)
    for name, side in ((a, ra), (b, rb)):
        if not side:
            known = sorted({r.method for r in records})
            raise ValueError(f"no runs of method {name!r}; the files hold {known}")
    keys = [k for k in ra if k in rb and (task is None or k[0] == task) and (length is None or k[1] == length)]
    cells: dict[tuple[str, int], list[tuple[RunRecord, RunRecord]]] = {}
    for k in keys:
        cells.setdefault(k[:2], []).append((ra[k], rb[k]))
    return {"a": a, "b": b, "dropped": {a: da, b: db},
            "cells": [{"task": t, "length": n, **compare(ps)} for (t, n), ps in sorted(cells.items())],
            "all": compare([(ra[k], rb[k]) for k in keys])}


def _acc(side: dict[str, Any]) -> str:
    lo, hi = side["ci95"]
    return f"{side['correct']:g} = {100 * side['accuracy']:.0f} [{100 * lo:.0f}, {100 * hi:.0f}]"


def markdown(results: list[dict[str, Any]]) -> str:
    """One table: a row per (pair, task, length) and one per pair over all its prompts (n = 0
    when the two methods share no prompt)."""
    head = ("| a | b | task | length | n | same score | same output | a only | b only | a correct, % [95% CI] "
            "| b correct, % [95% CI] |")
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for res in results:
        rows = res["cells"] + ([{"task": "all", "length": "", **res["all"]}] if len(res["cells"]) != 1 else [])
        for c in rows:
            lines.append(f"| {res['a']} | {res['b']} | {c['task']} | {c['length']} | {c['n']} | {c['same_score']} | "
                         f"{c['same_output']} | {c['a_only']} | {c['b_only']} | {_acc(c['a'])} | {_acc(c['b'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/paired.py", description=__doc__.split("\n\n")[0])
    p.add_argument("files", type=Path, nargs="+", help=".runs.jsonl or quality_*.json files of `kvloft eval`")
    p.add_argument("--pair", nargs=2, action="append", required=True, metavar=("A", "B"),
                   help="two method labels as the merged report names them; repeat for more pairs")
    p.add_argument("--task", default=None, help="only this task")
    p.add_argument("--length", type=int, default=None, help="only this prompt length (tokens, e.g. 32768)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the markdown table")
    args = p.parse_args(argv)
    try:
        _, records, _ = load_runs(args.files)
        results = [paired(records, a, b, args.task, args.length) for a, b in args.pair]
    except (ValueError, TypeError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    sys.stdout.write(json.dumps(results, indent=1) + "\n" if args.json else markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

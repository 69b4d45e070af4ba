"""One table (and a plot) from the results of several `kvloft eval` processes.

    python -m kvloft.eval.report OUT/quality_*.runs.jsonl --out OUT --name qwen-h200

Each input is a `.runs.jsonl` that `kvloft eval` streams as it goes (a process stopped by
its time limit keeps what it finished) or a `quality_<name>.json` it saved. Runs are merged
by (task, length, method label), where the label names the budget of retrieval methods
("hip@2048", "dense"), so processes that ran the same method at other budgets stay apart.
Per cell: accuracy (RULER string match), n, a 95% Wilson interval, keys attended per decode
step (per layer and KV head) and keys the search scored per step (per layer, all KV heads).

Writes quality_<name>.json (the merged cells and runs), quality_<name>.md (the tables) and
quality_<name>.png (accuracy vs length per method, averaged over tasks) if matplotlib is
installed; without it the plot is skipped and the reason printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kvloft.eval.records import RunRecord, summarize, wilson_interval

__all__ = ["label", "load_runs", "main", "markdown", "merge", "plot", "write"]


def label(method: str, budget: int | None) -> str:
    """The column name of a method: "dense", or the method and its budget ("hip@2048")."""
    if budget is None or method == "dense" or method.endswith(f"@{budget}"):  # a run of several budgets names them
        return method
    return f"{method}@{budget}"


def _records(path: Path) -> tuple[dict[str, Any], dict[str, str], list[dict[str, Any]]]:
    """(meta, skipped, run dicts) of a .runs.jsonl or a saved quality JSON."""
    text = path.read_text()
    if path.suffix == ".json":
        data = json.loads(text)
        if not {"meta", "runs"} <= set(data):
            raise ValueError(f"{path} is not a results file of `kvloft eval` (it needs 'meta' and 'runs')")
        return data["meta"], data.get("skipped", {}), data["runs"]
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not lines or "meta" not in lines[0]:
        raise ValueError(f"{path} is not a runs file of `kvloft eval` (its first line must hold the meta)")
    return lines[0]["meta"], lines[0].get("skipped", {}), lines[1:]


def load_runs(paths: Sequence[Path]) -> tuple[list[dict[str, Any]], list[RunRecord], dict[str, str]]:
    """(metas, records relabelled method@budget, skipped methods) of every file."""
    if not paths:
        raise ValueError("give at least one .runs.jsonl or quality_*.json file")
    metas, records, skipped = [], [], {}
    for path in map(Path, paths):
        meta, skip, runs = _records(path)
        metas.append({**meta, "source": str(path)})
        for m, why in skip.items():  # a skipped method is skipped at every budget of its run
            for b in ([meta.get("budget")] if not isinstance(meta.get("budget"), list) else meta["budget"]):
                skipped[label(m, b)] = why
        for r in runs:
            budget = r.get("budget", None if r["method"] == "dense" else meta.get("budget"))
            records.append(RunRecord(**{**r, "budget": budget, "method": label(r["method"], budget)}))
    return metas, records, skipped


def _order(values: list[Any], key=None) -> list[Any]:
    return sorted(dict.fromkeys(values), key=key)


def _method_key(name: str) -> tuple[int, str, int]:
    """dense first, then by method name, then by budget."""
    method, _, budget = name.partition("@")
    return (method != "dense", method, int(budget or 0))


def merge(paths: Sequence[Path]) -> dict[str, Any]:
    """The merged result: {"meta", "skipped", "cells", "summary", "runs"}; "summary" holds one
    cell per (length, method) pooled over tasks."""
    metas, records, skipped = load_runs(paths)
    cells = summarize(records)
    meta = {
        "sources": [m["source"] for m in metas],
        "models": _order([Path(m["model"]).name for m in metas]),
        "machines": _order([m["machine"] for m in metas]),
        "dtypes": _order([m["dtype"] for m in metas]),
        "chat": _order([bool(m.get("chat")) for m in metas]),
        "n_sink": _order([m["n_sink"] for m in metas]),
        "n_window": _order([m["n_window"] for m in metas]),
        "seeds": _order([m["seed"] for m in metas], key=str),
        "tasks": list(dict.fromkeys(c["task"] for c in cells)),
        "lengths": _order([c["length"] for c in cells]),
        "methods": _order([c["method"] for c in cells], key=_method_key),
    }
    return {"meta": meta, "skipped": {k: v for k, v in skipped.items() if k not in meta["methods"]},
            "cells": cells, "summary": _pooled(records), "runs": [asdict(r) for r in records]}


def _pooled(records: list[RunRecord]) -> list[dict[str, Any]]:
    groups: dict[tuple[int, str], list[RunRecord]] = {}
    for r in records:
        groups.setdefault((r.length, r.method), []).append(r)
    out = []
    for (length, method), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], _method_key(kv[0][1]))):
        mean = statistics.fmean(r.score for r in rs)
        lo, hi = wilson_interval(mean, len(rs))
        scanned = [r.scanned_per_step for r in rs if r.scanned_per_step is not None]
        keys = [r.keys_per_step for r in rs if r.keys_per_step is not None]
        out.append({"length": length, "method": method, "n": len(rs), "score": mean, "ci95": [lo, hi],
                    "keys_per_step": statistics.fmean(keys) if keys else None,
                    "scanned_per_step": statistics.fmean(scanned) if scanned else None})
    return out


# ----------------------------------------------------------------------------- tables


def _score(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "-"
    lo, hi = cell["ci95"]
    return f"{100 * cell['score']:.0f} [{100 * lo:.0f}, {100 * hi:.0f}] ({cell['n']})"


def _cost(cell: dict[str, Any] | None) -> str:
    if cell is None or cell["keys_per_step"] is None:
        return "-"
    scanned = "-" if cell["scanned_per_step"] is None else f"{cell['scanned_per_step']:.0f}"
    return f"{cell['keys_per_step']:.0f} / {scanned}"


def _grid(rows: list[tuple[str, int]], methods: list[str], lookup, fmt) -> list[str]:
    lines = ["| task | length | " + " | ".join(methods) + " |", "|---|---:|" + "---|" * len(methods)]
    for task, length in rows:
        lines.append(f"| {task} | {length} | " + " | ".join(fmt(lookup(task, length, m)) for m in methods) + " |")
    return lines


def markdown(result: dict[str, Any], name: str) -> str:
    m = result["meta"]
    cells = {(c["task"], c["length"], c["method"]): c for c in result["cells"]}
    pooled = {(c["length"], c["method"]): c for c in result["summary"]}
    methods = m["methods"]
    rows = [(t, n) for t in m["tasks"] for n in m["lengths"]]
    lines = [
        f"## {name}", "",
        f"- model: {', '.join(m['models'])} ({', '.join(m['dtypes'])}); machine: {'; '.join(m['machines'])}",
        (f"- prompts: {'chat template' if m['chat'] == [True] else 'plain' if m['chat'] == [False] else 'mixed'}; "
         f"sink {m['n_sink']}, window {m['n_window']}; seeds {m['seeds']}; {len(m['sources'])} results files"),
        *[f"- skipped: {why}" for why in result["skipped"].values()],
        "", "Accuracy (RULER string match, %) [95% Wilson interval] (n), all tasks pooled:", "",
        *_grid([("all", n) for n in m["lengths"]], methods, lambda t, n, x: pooled.get((n, x)), _score),
        "", "Accuracy per task:", "",
        *_grid(rows, methods, lambda t, n, x: cells.get((t, n, x)), _score),
        "", ("Keys attended per decode step (per layer and KV head: sink + window + retrieved; dense: the "
             "context) / keys the search scored per step (per layer, all KV heads):"), "",
        *_grid([("all", n) for n in m["lengths"]], methods, lambda t, n, x: pooled.get((n, x)), _cost),
    ]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> str | None:
    """Accuracy vs length per method (pooled over tasks) to `path`; returns why not if it can't."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install matplotlib); the tables hold every number"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in result["meta"]["methods"]:
        pts = [c for c in result["summary"] if c["method"] == method]
        xs = [c["length"] for c in pts]
        ys = [100 * c["score"] for c in pts]
        err = [[100 * (c["score"] - c["ci95"][0]) for c in pts], [100 * (c["ci95"][1] - c["score"]) for c in pts]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=method)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("accuracy, all tasks (%)")
    ax.set_ylim(-2, 102)
    ax.legend(fontsize="small", ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def write(result: dict[str, Any], out: Path, name: str) -> dict[str, str | None]:
    """quality_<name>.json, .md and .png under `out`; returns their paths (png: None) and why no plot."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"quality_{name}"
    stem.with_suffix(".json").write_text(json.dumps({"name": name, **result}, indent=1))
    stem.with_suffix(".md").write_text(markdown(result, name))
    why = plot(result, stem.with_suffix(".png"))
    return {"json": str(stem.with_suffix(".json")), "md": str(stem.with_suffix(".md")),
            "png": None if why else str(stem.with_suffix(".png")), "plot_skipped": why}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvloft.eval.report", description=__doc__.split("\n\n")[0])
    p.add_argument("files", type=Path, nargs="+", help=".runs.jsonl or quality_*.json files of `kvloft eval`")
    p.add_argument("--out", type=Path, default=Path("."), help="directory to write into (default: here)")
    p.add_argument("--name", default="merged", help="file names: quality_<name>.json/.md/.png")
    args = p.parse_args(argv)
    try:
        result = merge(args.files)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    written = write(result, args.out, args.name)
    if written["plot_skipped"]:
        print(written["plot_skipped"], file=sys.stderr)
    print(markdown(result, args.name))
    print(json.dumps(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A result of `evaluate` (kvloft/eval/runner.py) on disk: its JSON, its markdown section of a
quality page (settings, a score table and a cost table), and a result rebuilt from the
.runs.jsonl files `kvloft eval` writes as it goes."""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kvloft.config import RetrievalConfig
from kvloft.eval.methods import EXTRAPOLATE_SUFFIX, method_columns
from kvloft.eval.records import RunRecord, summarize

__all__ = ["DOC_TITLE", "from_runs", "markdown", "own_prefills", "save", "write_doc"]


def _cell_text(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "-"
    lo, hi = cell["ci95"]
    return f"{100 * cell['score']:.0f}% ({cell['n']}) [{100 * lo:.0f}, {100 * hi:.0f}]"


def _cost_text(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "-"
    parts = [f"{cell['prefill_s']:.1f} s"]
    parts.append("-" if cell["decode_ms_per_tok"] is None else f"{cell['decode_ms_per_tok']:.0f} ms")
    parts.append("-" if cell["keys_per_step"] is None else f"{cell['keys_per_step']:.0f}")
    return " / ".join(parts)


def _table(result: dict[str, Any], fmt) -> list[str]:
    meta = result["meta"]
    variant = meta.get("variant", "")
    methods = method_columns([m for m in meta["methods"] if m not in result["skipped"]], meta["budget"], variant)
    cells = {(c["task"], c["length"], c["method"]): c for c in result["cells"]}
    lines = ["| task | length | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for task in meta["tasks"]:
        for length in meta["lengths"]:
            row = [fmt(cells.get((task, length, m))) for m in methods]
            lines.append(f"| {task} | {length} | " + " | ".join(row) + " |")
    return lines


def markdown(result: dict[str, Any], name: str, note: str = "") -> str:
    """One section of docs/quality.md: settings, the score table and the cost table."""
    m = result["meta"]
    lines = [
        f"## {name}",
        "",
        f"- model: `{Path(m['model']).name}` ({m['dtype']}, {m['device']}, kernels {m['kernels']})",
        f"- machine: {m['machine']}",
        f"- date: {m['date']}",
        (f"- settings: budget {m['budget']} host tokens per step, sink {m['n_sink']}, window {m['n_window']}, "
        f"{m['samples']} samples per task and length (seed {m['seed']}, needle depths (i + 0.5) / n), greedy, "
        f"max new tokens {m['max_new_tokens']}, prefill chunk {m['prefill_chunk']}"),
        "- prompt: " + ("the model's chat template (one user message), then the answer prefix; answers end at EOS"
                        if m.get("chat") else "plain text ending with the answer prefix (no chat template); "
                        "answers end at a newline"),
    ]
    if m.get("max_similar"):
        lines.append(f"- at most {m['max_similar']} near-identical keys per selection (max_similar)")
    elif m.get("max_similar", 0) is None and any(x.endswith(EXTRAPOLATE_SUFFIX) for x in m["methods"]):
        x = RetrievalConfig(position_mode="extrapolate")
        lines.append(f"- +x methods: at most {x.max_similar} near-identical keys per selection "
                     f"({x.similar_bits}-bit SimHash buckets; the extrapolate defaults)")
    lines += [f"- {why}" for why in result["skipped"].values()]
    lines += _prefill_lines(m.get("prefill", "own"), own_prefills(result["runs"]))
    if note:
        lines.append(f"- note: {note}")
    lines += ["", "Score (RULER string match, %), (n) and 95% Wilson interval:", "", *_table(result, _cell_text)]
    lines += ["", ("Cost per run: prefill s / decode ms per token / keys attended per decode step "
              "(per layer and KV head):"), "", *_table(result, _cost_text)]
    return "\n".join(lines) + "\n"


def own_prefills(runs: list[dict[str, Any]]) -> dict[str, str]:
    """{method: why} of the methods that prefilled on their own in a shared-prefill run."""
    return {r["method"]: r["prefill_note"] for r in runs if r.get("prefill_note")}


def _prefill_lines(mode: str, own: dict[str, str]) -> list[str]:
    if mode != "shared":
        return ["- prefill: each method its own, per prompt"]
    shared = ("- prefill: shared: each prompt prefilled once with dense attention and forked into each method "
              "(Session.fork); a forked run's prefill s is that shared prefill's")
    return [shared] + [f"- {method}: own prefill ({why})" for method, why in own.items()]


DOC_TITLE = "# Task quality: RULER-style tasks through real sessions\n"


def write_doc(path: Path, section: str, name: str) -> None:
    """Put this run's section into the page between its markers (replaced if the run name exists)."""
    begin, end = f"<!-- quality:{name}:begin -->", f"<!-- quality:{name}:end -->"
    block = f"{begin}\n{section}{end}"
    text = path.read_text() if path.exists() else DOC_TITLE
    i, j = text.find(begin), text.find(end)
    if 0 <= i < j:
        text = text[:i] + block + text[j + len(end):]
    else:
        text = text.rstrip("\n") + f"\n\n{block}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def save(result: dict[str, Any], out: Path | None, doc: Path | None, name: str | None = None,
         note: str = "") -> str:
    """Write the JSON (out) and the markdown section (doc); returns the run name used."""
    name = name or _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"name": name, "note": note, **result}, indent=1))
    if doc is not None:
        write_doc(Path(doc), markdown(result, name, note), name)
    return name


def from_runs(paths: Sequence[Path]) -> dict[str, Any]:
    """Rebuild a result from .runs.jsonl files that `kvloft eval` wrote as it went (an
    evaluation that was stopped, or several partial ones of the same settings: their meta
    must agree on everything but the tasks, lengths, methods and seeds, which are merged; runs
    of several seeds list them all under meta["seed"])."""
    meta: dict[str, Any] | None = None
    skipped: dict[str, str] = {}
    records: list[RunRecord] = []
    for path in paths:
        lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        if not lines or "meta" not in lines[0]:
            raise ValueError(f"{path} is not a runs file of `kvloft eval` (its first line must hold the meta)")
        head = lines[0]
        if meta is None:
            meta = dict(head["meta"])
        else:
            for key in ("tasks", "lengths", "methods"):
                meta[key] = list(dict.fromkeys([*meta[key], *head["meta"][key]]))
            seeds = meta["seed"] if isinstance(meta["seed"], list) else [meta["seed"]]
            if head["meta"]["seed"] not in seeds:
                meta["seed"] = sorted([*seeds, head["meta"]["seed"]])
        skipped.update(head["skipped"])
        records += [RunRecord(**r) for r in lines[1:]]
    if meta is None:
        raise ValueError("from_runs needs at least one runs file")
    cells = summarize(records)
    meta["samples"] = max((c["n"] for c in cells), default=0)  # cells may hold fewer: see each n
    return {"meta": meta, "skipped": skipped, "cells": cells, "runs": [asdict(r) for r in records]}

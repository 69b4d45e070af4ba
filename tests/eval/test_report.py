"""Merging the results of several `kvloft eval` processes into one table (and a plot)."""

from __future__ import annotations

import json
import sys

import pytest

from kvloft.eval import report
from kvloft.eval.records import wilson_interval


def _meta(budget: int, methods: list[str], seed: int = 0) -> dict:
    return {"model": "/m/qwen.gguf", "machine": "test box", "dtype": "bfloat16", "chat": True, "n_sink": 64,
            "n_window": 512, "seed": seed, "budget": budget, "methods": methods, "tasks": ["passkey", "vt"],
            "lengths": [4096, 8192]}


def _run(task: str, length: int, method: str, index: int, score: float, budget: int | None, keys: float | None,
         scanned: float | None) -> dict:
    return {"task": task, "length": length, "index": index, "seed": index, "depth": 0.5, "method": method,
            "prompt_tokens": length - 3, "output": "x", "references": ["x"], "score": score, "prefill_s": 0.1,
            "decode_tokens": 4, "decode_ms_per_tok": 2.0, "keys_per_step": keys, "scanned_per_step": scanned,
            "budget": budget}


def _runs_file(path, meta, runs, skipped=None):
    path.write_text("".join(json.dumps(x) + "\n" for x in [{"meta": meta, "skipped": skipped or {}}, *runs]))
    return path


@pytest.fixture
def two_processes(tmp_path):
    """Process a: dense + hip at budget 1024; process b: hip at 2048 (a runs file without budgets,
    as older `kvloft eval` wrote them: the meta's budget applies), faiss skipped."""
    a, b = [], []
    for length in (4096, 8192):
        for i in range(4):
            a.append(_run("passkey", length, "dense", i, 1.0, None, length + 2.0, None))
            a.append(_run("passkey", length, "hip", i, float(i < 2), 1024, 1600.0, 300.0))
            a.append(_run("vt", length, "hip", i, 0.5, 1024, 1600.0, 300.0))
            rb = _run("passkey", length, "hip", i, float(i < 3), None, 2624.0, 500.0)
            del rb["budget"]
            b.append(rb)
    fa = _runs_file(tmp_path / "quality_a.runs.jsonl", _meta(1024, ["dense", "hip"]), a)
    fb = _runs_file(tmp_path / "quality_b.runs.jsonl", _meta(2048, ["hip", "faiss"], seed=1), b,
                    {"faiss": "method 'faiss' skipped: no faiss"})
    return fa, fb


def test_merge_labels_by_budget_and_pools_tasks(two_processes):
    res = report.merge(list(two_processes))
    m = res["meta"]
    assert m["methods"] == ["dense", "hip@1024", "hip@2048"]
    assert m["lengths"] == [4096, 8192] and m["tasks"] == ["passkey", "vt"] and m["seeds"] == [0, 1]
    assert res["skipped"] == {"faiss@2048": "method 'faiss' skipped: no faiss"}
    cells = {(c["task"], c["length"], c["method"]): c for c in res["cells"]}
    assert cells[("passkey", 4096, "hip@1024")]["score"] == 0.5 and cells[("passkey", 4096, "hip@1024")]["n"] == 4
    assert cells[("passkey", 8192, "hip@2048")]["score"] == 0.75
    assert ("vt", 4096, "hip@2048") not in cells
    pooled = {(c["length"], c["method"]): c for c in res["summary"]}
    hip = pooled[(4096, "hip@1024")]  # passkey 2/4 and vt 4 x 0.5 pooled over 8 runs
    assert hip["n"] == 8 and hip["score"] == 0.5 and hip["ci95"] == list(wilson_interval(0.5, 8))
    assert hip["keys_per_step"] == 1600 and hip["scanned_per_step"] == 300
    assert pooled[(8192, "dense")]["scanned_per_step"] is None
    assert [c["method"] for c in res["summary"][:3]] == ["dense", "hip@1024", "hip@2048"]


def test_markdown_plot_and_cli(two_processes, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as on a machine without it
    out = tmp_path / "merged"
    assert report.main([*map(str, two_processes), "--out", str(out), "--name", "q"]) == 0
    err = capsys.readouterr().err
    assert "plot skipped: matplotlib is not installed" in err
    assert sorted(p.name for p in out.iterdir()) == ["quality_q.json", "quality_q.md"]
    text = (out / "quality_q.md").read_text()
    assert "| task | length | dense | hip@1024 | hip@2048 |" in text
    lo, hi = wilson_interval(0.5, 8)
    assert f"| all | 4096 | 100 [{100 * wilson_interval(1.0, 4)[0]:.0f}, 100] (4) | 50 [{100 * lo:.0f}, {100 * hi:.0f}] (8) |" in text
    assert "| all | 8192 | 8194 / - | 1600 / 300 | 2624 / 500 |" in text
    assert "| vt | 8192 | - | 50 " in text
    saved = json.loads((out / "quality_q.json").read_text())
    assert saved["name"] == "q" and len(saved["runs"]) == 32


def test_plot_when_matplotlib_is_installed(two_processes, tmp_path):
    pytest.importorskip("matplotlib")
    written = report.write(report.merge(list(two_processes)), tmp_path, "q")
    assert written["plot_skipped"] is None and (tmp_path / "quality_q.png").stat().st_size > 1000


def test_bad_inputs_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        report.merge([])
    bad = tmp_path / "x.json"
    bad.write_text('{"cells": []}')
    with pytest.raises(ValueError, match="needs 'meta' and 'runs'"):
        report.merge([bad])
    assert report.main([str(bad)]) == 2

"""bench/paired.py: two methods on the prompts both ran, on hand-made runs files, against hand-computed values."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from paired import main, paired

from kvloft.eval.report import load_runs

# 95% Wilson intervals by hand (z = 1.96, z^2 = 3.8416, n = 3): denominator 1 + z^2/3 = 2.28053,
# half-width 1.96 * sqrt(p(1-p)/3 + z^2/36) / 2.28053 = 1.96 * sqrt(0.180785) / 2.28053 = 0.36543
# for p = 1/3 and 2/3; centres (p + z^2/6) / 2.28053 = 0.42692 and 0.57308.
WILSON_1_OF_3 = (0.06149, 0.79235)
WILSON_2_OF_3 = (0.20765, 0.93851)


def _run(method, index, score, output, *, length=4096, depth=None, tokens=None, task="passkey"):
    n = 4 if length == 4096 else 1
    return {"task": task, "length": length, "index": index, "seed": 1000 + index,
            "depth": (index + 0.5) / n if depth is None else depth, "method": method,
            "prompt_tokens": tokens or length - 5, "output": output, "references": ["7"], "score": score,
            "prefill_s": 0.1, "decode_tokens": 3, "decode_ms_per_tok": 1.0, "keys_per_step": 10.0,
            "scanned_per_step": None}


def _write(path, budget, runs):
    meta = {"model": "/m/q.gguf", "machine": "box", "dtype": "bfloat16", "chat": True, "n_sink": 64,
            "n_window": 512, "seed": 0, "budget": budget}
    path.write_text("".join(json.dumps(x) + "\n" for x in [{"meta": meta, "skipped": {}}, *runs]))
    return path


@pytest.fixture
def files(tmp_path):
    """dense: prompts 0-3 at 4K (1, 1, 0, 1) plus a repeat of prompt 0 (scored 0, dropped) and
    one vt prompt at 8K (0.5). hip at 2048: prompts 0-2 (1, 0, 0), prompt 3's seed and index at
    another depth (another prompt), prompt 3 with another token count (another template), an
    index dense never ran, and the vt prompt (0.5, the same output)."""
    dense = [_run("dense", 0, 1.0, "7"), _run("dense", 1, 1.0, "7"), _run("dense", 2, 0.0, "1"),
             _run("dense", 3, 1.0, "7"), _run("dense", 0, 0.0, "x"),
             _run("dense", 0, 0.5, "a b", length=8192, task="vt")]
    hip = [_run("hip", 0, 1.0, "7"), _run("hip", 1, 0.0, "2"), _run("hip", 2, 0.0, "1"),
           _run("hip", 3, 1.0, "7", depth=0.4375), _run("hip", 3, 1.0, "7", tokens=4000),
           _run("hip", 9, 1.0, "7"), _run("hip", 0, 0.5, "a b", length=8192, task="vt")]
    return [_write(tmp_path / "a.runs.jsonl", 1024, dense), _write(tmp_path / "b.runs.jsonl", 2048, hip)]


def test_paired_counts_and_wilson_by_hand(files):
    _, records, _ = load_runs(files)
    res = paired(records, "hip@2048", "dense")
    assert res["dropped"] == {"hip@2048": 0, "dense": 1}
    passkey, vt = res["cells"]
    assert (passkey["task"], passkey["length"], vt["task"], vt["length"]) == ("passkey", 4096, "vt", 8192)
    # prompts 0, 1, 2: hip 1, 0, 0 against dense 1, 1, 0 (dense's repeat of prompt 0 is not used)
    assert {k: passkey[k] for k in ("n", "same_score", "same_output", "a_only", "b_only")} == {
        "n": 3, "same_score": 2, "same_output": 2, "a_only": 0, "b_only": 1}
    assert passkey["a"]["correct"] == 1 and passkey["b"]["correct"] == 2
    assert passkey["a"]["accuracy"] == pytest.approx(1 / 3)
    assert passkey["a"]["ci95"] == pytest.approx(WILSON_1_OF_3, abs=1e-4)
    assert passkey["b"]["ci95"] == pytest.approx(WILSON_2_OF_3, abs=1e-4)
    assert {k: vt[k] for k in ("n", "same_score", "same_output")} == {"n": 1, "same_score": 1, "same_output": 1}
    assert vt["a"]["correct"] == 0.5
    whole = res["all"]
    assert (whole["n"], whole["same_score"], whole["same_output"], whole["b_only"]) == (4, 3, 3, 1)
    assert whole["a"]["correct"] == 1.5 and whole["b"]["correct"] == 2.5


def test_filters_and_errors(files):
    _, records, _ = load_runs(files)
    assert [c["task"] for c in paired(records, "hip@2048", "dense", length=8192)["cells"]] == ["vt"]
    assert paired(records, "hip@2048", "dense", task="passkey")["all"]["n"] == 3
    with pytest.raises(ValueError, match=r"no runs of method 'hip@1024'.*'dense', 'hip@2048'"):
        paired(records, "hip@1024", "dense")
    with pytest.raises(ValueError, match="two different methods"):
        paired(records, "dense", "dense")


def test_cli_table(files, capsys):
    assert main([*map(str, files), "--pair", "hip@2048", "dense", "--task", "passkey"]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| hip@2048")]
    assert rows == ["| hip@2048 | dense | passkey | 4096 | 3 | 2 | 2 | 0 | 1 | 1 = 33 [6, 79] | 2 = 67 [21, 94] |"]
    assert main([*map(str, files), "--pair", "nope", "dense"]) == 2
    assert "no runs of method 'nope'" in capsys.readouterr().err

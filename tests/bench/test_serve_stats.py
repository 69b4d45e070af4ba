"""bench/serve_stats.py: the serving benchmark's figures on synthetic timings, against hand-computed values."""

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from serve_stats import (
    equality,
    estimate_level_s,
    level_summary,
    piece_gaps,
    quantile,
    server_figures,
)

from kvloft.server.metrics import ServerMetrics


def _records() -> list[dict]:
    ok = {"status": 200, "t_send": 0.0, "cut": False}
    return [
        {**ok, "i": 0, "t_first": 1.0, "piece_times": [1.0, 1.1, 1.3, 1.6], "t_end": 1.7,
         "usage": {"prompt_tokens": 100, "completion_tokens": 4}, "text": "abcd"},
        {**ok, "i": 1, "t_first": 2.0, "piece_times": [2.0, 2.2, 2.3], "t_end": 2.5,
         "usage": {"prompt_tokens": 50, "completion_tokens": 3}, "text": "abc"},
        {**ok, "i": 2, "cut": True, "t_first": 3.0, "piece_times": [3.0, 3.5], "t_end": 4.0, "usage": None},
        {**ok, "i": 3, "t_first": None, "piece_times": [], "t_end": 0.5, "usage": None, "error": "boom"},
    ]


def test_quantile_interpolates_linearly():
    assert quantile([4.0, 1.0, 3.0, 2.0], 0.5) == pytest.approx(2.5)  # mean of the middle two
    assert quantile([1.0, 2.0, 3.0], 0.99) == pytest.approx(2.98)  # 2 + 0.98 * (3 - 2)
    assert quantile([], 0.5) is None
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        quantile([1.0], 50)


def test_level_summary_against_hand_computed():
    s = level_summary(_records(), wall=4.0)
    assert (s["requests"], s["finished"], s["cut"]) == (4, 2, 1)
    assert (s["prompt_tokens"], s["answer_tokens"], s["pieces"]) == (150, 7, 7)
    assert s["total_tok_per_s"] == pytest.approx(157 / 4)
    assert s["answer_tok_per_s"] == pytest.approx(7 / 4)
    # TTFT of every request that streamed (the cut one too): 1, 2, 3 s
    assert (s["ttft_p50_s"], s["ttft_p99_s"], s["ttft_max_s"]) == pytest.approx((2.0, 2.98, 3.0))
    # gaps 0.1 0.2 0.3 | 0.2 0.1 | 0.5 -> sorted .1 .1 .2 .2 .3 .5: p50 0.2, p99 at 4.95: .3 + .95 * .2
    assert s["itl_samples"] == 6
    assert (s["itl_p50_ms"], s["itl_p99_ms"]) == pytest.approx((200.0, 490.0))
    assert s["statuses"] == {"200": 4} and s["errors"] == ["boom"]
    assert piece_gaps([1.0]) == []
    with pytest.raises(ValueError, match="wall"):
        level_summary(_records(), wall=0.0)


def test_estimate_and_equality():
    first = {"ttft_p50_s": 2.0, "itl_p50_ms": 200.0}
    assert estimate_level_s(first, 8, 64) == pytest.approx(8 * 2.0 + 64 * 0.2 * 4)  # 67.2
    assert estimate_level_s(first, 1, 64) == pytest.approx(2.0 + 64 * 0.2)  # a decode step at least one
    assert math.isinf(estimate_level_s({"ttft_p50_s": None, "itl_p50_ms": None}, 8, 64))
    e = equality({0: "a", 1: "b", 2: "c"}, {1: "b", 2: "x", 5: "z"})
    assert (e["equal"], e["compared"]) == (1, 2)
    assert e["first_mismatch"] == {"i": 2, "batch1": "c", "here": "x"}


def test_server_figures_from_the_servers_own_metrics():
    m = ServerMetrics(SimpleNamespace(tier_bytes=dict, evictions=0, restores=0), engine="Engine")
    m.decoded(1, 0.1)
    m.decoded(1, 0.1)
    m.itl.observe(1.0)
    before = m.exposition().decode()
    for b in (2, 3, 8):
        m.decoded(b, 0.1)
    m.itl.observe(0.05)
    m.itl.observe(0.15)
    m.prefilled(512, 0.2)
    f = server_figures(before, m.exposition().decode())
    # batch sizes 2, 3, 8 in buckets le=2, le=4, le=8; 13 decode tokens; ITL mean (0.05 + 0.15) / 2
    assert f["batch_size"]["buckets"] == {"2": 1, "4": 1, "8": 1}
    assert (f["batch_size"]["count"], f["batch_size"]["sum"]) == (3, 13.0)
    assert f["batch_size"]["mean"] == pytest.approx(13 / 3, abs=1e-3)
    assert (f["decode_tokens"], f["prefill_tokens"]) == (13, 512)
    assert f["itl_mean_ms"] == pytest.approx(100.0)
    assert f["ttft_mean_s"] is None

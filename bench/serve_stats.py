"""Figures of a serving run from client-side timings and the server's /metrics (bench/serve_gpu.py).

One request's record (what serve_gpu.stream_timed returns), times in time.monotonic() seconds:
    {"i": prompt index, "status": 200, "text": "...", "usage": {"prompt_tokens", "completion_tokens"},
     "t_send": .., "t_first": .. | None, "t_end": .., "piece_times": [one per streamed piece with text],
     "cut": bool (hung up at the time limit), "error": "..." (only when one came)}

Percentiles interpolate linearly between order statistics (numpy's default), so p50 of an even
count is the mean of the two middle values. Inter-token latency is measured per request between
consecutive streamed pieces (a piece may carry more than one token when the server holds text
back for a stop string or an unfinished UTF-8 character; `pieces` against `answer_tokens` shows
how often), and pooled over the requests of a level.
"""

from __future__ import annotations

from collections import Counter
from itertools import pairwise

import numpy as np
from prometheus_client.parser import text_string_to_metric_families


def quantile(xs: list[float], q: float) -> float | None:
    """The q-quantile (0 <= q <= 1) of xs, linear interpolation; None for no data."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile q must be in [0, 1], got {q}")
    return float(np.percentile(np.asarray(xs, dtype=np.float64), 100.0 * q)) if len(xs) else None


def piece_gaps(times: list[float]) -> list[float]:
    """Seconds between consecutive streamed pieces of one answer (len(times) - 1 of them)."""
    return [b - a for a, b in pairwise(times)]


def finished(results: list[dict]) -> list[dict]:
    """Requests that ran to their end: status 200, no error, not hung up at the time limit."""
    return [r for r in results if r.get("status") == 200 and not r.get("cut") and "error" not in r]


def _round(x: float | None, scale: float = 1.0, nd: int = 4) -> float | None:
    return None if x is None else round(x * scale, nd)


def level_summary(results: list[dict], wall: float) -> dict:
    """Throughput and latency of one concurrency level from its requests' records.

    wall: seconds from the first request sent to the last one ended (or to the time limit).
    Tokens count finished requests only (usage as the server reported it); TTFT and gaps come
    from every request that streamed, those hung up at the time limit included."""
    if wall <= 0:
        raise ValueError(f"wall must be > 0 seconds, got {wall}")
    done = finished(results)
    use = [r.get("usage") or {} for r in done]
    prompt = sum(u.get("prompt_tokens", 0) for u in use)
    answer = sum(u.get("completion_tokens", 0) for u in use)
    timed = [r for r in results if r.get("status") == 200 and "error" not in r]  # cut ones too: the pieces came
    ttft = [r["t_first"] - r["t_send"] for r in timed if r.get("t_first") is not None]
    gaps = [g for r in timed for g in piece_gaps(r.get("piece_times") or [])]
    return {
        "requests": len(results), "finished": len(done), "cut": sum(bool(r.get("cut")) for r in results),
        "wall_s": round(wall, 3), "prompt_tokens": prompt, "answer_tokens": answer,
        "pieces": sum(len(r.get("piece_times") or []) for r in done),
        "total_tok_per_s": round((prompt + answer) / wall, 2), "answer_tok_per_s": round(answer / wall, 3),
        "ttft_p50_s": _round(quantile(ttft, 0.5)), "ttft_p99_s": _round(quantile(ttft, 0.99)),
        "ttft_max_s": _round(max(ttft) if ttft else None),
        "itl_p50_ms": _round(quantile(gaps, 0.5), 1e3, 2), "itl_p99_ms": _round(quantile(gaps, 0.99), 1e3, 2),
        "itl_samples": len(gaps),
        "statuses": dict(Counter(str(r.get("status")) for r in results)),
        "errors": sorted({str(r["error"])[:200] for r in results if "error" in r})[:5],
    }


def estimate_level_s(first: dict, sessions: int, max_tokens: int) -> float:
    """Rough seconds for `sessions` concurrent requests, from a batch-1 level's summary.

    Prefill is not batched across sessions (the engine loop feeds one chunk at a time), so n
    prompts cost n first-token times; a decode step of n rows is taken as n/2 batch-1 steps
    (at least one): pessimistic for a small model on a GPU, where the weight GEMMs are shared.
    Infinite when the first level finished nothing to time."""
    if sessions < 1 or max_tokens < 1:
        raise ValueError(f"sessions and max_tokens must be >= 1, got {sessions} and {max_tokens}")
    ttft, itl_ms = first.get("ttft_p50_s"), first.get("itl_p50_ms")
    if ttft is None or itl_ms is None:
        return float("inf")
    return sessions * ttft + max_tokens * (itl_ms / 1e3) * max(1.0, sessions / 2)


def equality(reference: dict[int, str], answers: dict[int, str]) -> dict:
    """Answers equal to the batch-1 answer of the same prompt, over the prompts both finished."""
    both = sorted(set(reference) & set(answers))
    diff = [i for i in both if reference[i] != answers[i]]
    return {"equal": len(both) - len(diff), "compared": len(both),
            "first_mismatch": None if not diff else
            {"i": diff[0], "batch1": reference[diff[0]][:160], "here": answers[diff[0]][:160]}}


# ---- the server's /metrics ---------------------------------------------------------------------


def metric_samples(text: str) -> dict[tuple, float]:
    """Prometheus text -> {(sample name, sorted label pairs): value}."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def counter_delta(before: dict, after: dict, name: str) -> float:
    """Increase of an unlabelled sample (e.g. kvloft_decode_tokens_total) between two scrapes."""
    return after.get((name, ()), 0.0) - before.get((name, ()), 0.0)


def histogram_delta(before: dict, after: dict, name: str) -> dict:
    """Observations of histogram `name` between two scrapes: count, sum, mean, and per bucket
    the observations that fell in it (not cumulative), keyed by its upper bound ('+Inf' last)."""
    def cum(samples: dict) -> dict[float, float]:
        return {float(dict(lab)["le"]): v for (n, lab), v in samples.items() if n == f"{name}_bucket"}

    b, a = cum(before), cum(after)
    bounds = sorted(a)
    counts, prev = {}, 0.0
    for le in bounds:
        c = a[le] - b.get(le, 0.0)
        counts["+Inf" if le == float("inf") else f"{le:g}"] = round(c - prev)
        prev = c
    n = counter_delta(before, after, f"{name}_count")
    s = counter_delta(before, after, f"{name}_sum")
    return {"count": round(n), "sum": round(s, 4), "mean": round(s / n, 3) if n else None,
            "buckets": {k: v for k, v in counts.items() if v}}


def server_figures(before_text: str, after_text: str) -> dict:
    """What the server saw during one level: batch sizes per decode step, tokens, its own latencies."""
    b, a = metric_samples(before_text), metric_samples(after_text)
    itl = histogram_delta(b, a, "kvloft_inter_token_latency_seconds")
    ttft = histogram_delta(b, a, "kvloft_time_to_first_token_seconds")
    return {"batch_size": histogram_delta(b, a, "kvloft_batch_size"),
            "decode_tokens": int(counter_delta(b, a, "kvloft_decode_tokens_total")),
            "prefill_tokens": int(counter_delta(b, a, "kvloft_prefill_tokens_total")),
            "itl_mean_ms": None if itl["mean"] is None else round(1e3 * itl["sum"] / itl["count"], 2),
            "ttft_mean_s": ttft["mean"]}

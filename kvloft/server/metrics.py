"""What the server measures: Prometheus metrics (GET /metrics) and one JSON log line per request.

    metrics = ServerMetrics(manager, engine="fallback")    # a registry of its own, per app
    body = metrics.exposition()                            # the text format Prometheus scrapes

Metrics (all prefixed kvloft_):
    requests_total{endpoint,status,outcome}   finished requests: HTTP status and outcome
                                              (stop, length, cancelled, error, refused)
    running_sequences / waiting_sequences     decoding now / waiting for or in prefill
    batch_size                                histogram: sequences per decode step
    prefill_tokens_total / decode_tokens_total
    prefill_tokens_per_second / decode_tokens_per_second
                                              tokens over the seconds the engine loop spent
                                              on them, in the last WINDOW_S seconds
    time_to_first_token_seconds               histogram: request arrival to first token
    inter_token_latency_seconds               histogram: between two tokens of one answer
    retriever_search_seconds                  histogram: retriever search time of one answer
    tier_bytes{tier="gpu"|"host"|"disk"}      KV bytes of the sessions: compute-device static
                                              tier; host tier in memory; host chunks on disk
                                              plus sessions spilled to disk
    spills_total / restores_total             sessions evicted to disk / loaded back
    engine_info{engine}                       1 for the engine in use ("fallback" or the class)

Log: logger "kvloft.server.requests", INFO, one JSON object per request with id, key_id
(the API key's owner tag, never the key), session, endpoint, tokens_in, tokens_out, ttft_s,
duration_s, status, outcome.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

request_log = logging.getLogger("kvloft.server.requests")
WINDOW_S = 10.0
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class RequestRecord:
    """One request as logged; filled in as it runs."""

    id: str
    endpoint: str
    key_id: str | None = None
    session: str | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    ttft_s: float | None = None
    duration_s: float = 0.0
    status: int = 200
    outcome: str = "error"
    t0: float = field(default_factory=time.monotonic, repr=False)


class _Speed:
    """Tokens per second of work over the last WINDOW_S seconds (thread-safe)."""

    def __init__(self) -> None:
        self.events: deque[tuple[float, int, float]] = deque()
        self.lock = threading.Lock()

    def add(self, tokens: int, seconds: float) -> None:
        with self.lock:
            self.events.append((time.monotonic(), tokens, seconds))

    def value(self) -> float:
        with self.lock:
            cut = time.monotonic() - WINDOW_S
            while self.events and self.events[0][0] < cut:
                self.events.popleft()
            tokens = sum(e[1] for e in self.events)
            seconds = sum(e[2] for e in self.events)
        return tokens / seconds if seconds > 0 else 0.0


class _ManagerCollector:
    """Tier bytes and spill counts, read from the session manager at scrape time."""

    def __init__(self, manager) -> None:
        self.manager = manager

    def collect(self):
        tiers = GaugeMetricFamily("kvloft_tier_bytes", "KV bytes of all sessions by tier", labels=["tier"])
        for tier, n in self.manager.tier_bytes().items():
            tiers.add_metric([tier], n)
        yield tiers
        yield CounterMetricFamily("kvloft_spills", "sessions evicted to disk", value=self.manager.evictions)
        yield CounterMetricFamily("kvloft_restores", "spilled sessions loaded back", value=self.manager.restores)


class ServerMetrics:
    def __init__(self, manager, engine: str) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("kvloft_requests", "finished requests", ["endpoint", "status", "outcome"],
                                registry=r)
        self.running = Gauge("kvloft_running_sequences", "sequences decoding", registry=r)
        self.waiting = Gauge("kvloft_waiting_sequences", "sequences waiting for or in prefill", registry=r)
        self.batch = Histogram("kvloft_batch_size", "sequences per decode step", buckets=BATCH_BUCKETS, registry=r)
        self.prefill_tokens = Counter("kvloft_prefill_tokens", "tokens prefilled", registry=r)
        self.decode_tokens = Counter("kvloft_decode_tokens", "tokens decoded", registry=r)
        self._prefill_speed, self._decode_speed = _Speed(), _Speed()
        Gauge("kvloft_prefill_tokens_per_second", f"prefill tokens per second of prefill work, last {WINDOW_S:g} s",
              registry=r).set_function(self._prefill_speed.value)
        Gauge("kvloft_decode_tokens_per_second", f"decode tokens per second of decode steps, last {WINDOW_S:g} s",
              registry=r).set_function(self._decode_speed.value)
        self.ttft = Histogram("kvloft_time_to_first_token_seconds", "request arrival to its first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("kvloft_inter_token_latency_seconds", "between two tokens of one answer",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.search = Histogram("kvloft_retriever_search_seconds", "retriever search time of one answer",
                                buckets=LATENCY_BUCKETS, registry=r)
        Gauge("kvloft_engine_info", "the engine in use", ["engine"], registry=r).labels(engine).set(1)
        r.register(_ManagerCollector(manager))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    # ---- from the engine loop ------------------------------------------------------------------

    def set_counts(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

    def prefilled(self, tokens: int, seconds: float) -> None:
        self.prefill_tokens.inc(tokens)
        self._prefill_speed.add(tokens, seconds)

    def decoded(self, batch: int, seconds: float) -> None:
        self.batch.observe(batch)
        self.decode_tokens.inc(batch)
        self._decode_speed.add(batch, seconds)

    def token_latency(self, seq, now: float) -> None:
        """Before seq accepts a token generated at `now`: its TTFT or inter-token latency."""
        if seq.t_last is None:
            self.ttft.observe(now - seq.t_arrival)
        else:
            self.itl.observe(now - seq.t_last)

    def sequence_ended(self, seq, search_s: float) -> None:
        if search_s > 0:
            self.search.observe(search_s)

    # ---- from the routes -----------------------------------------------------------------------

    def request_done(self, rec: RequestRecord) -> None:
        """Count the request and write its log line."""
        rec.duration_s = time.monotonic() - rec.t0
        self.requests.labels(rec.endpoint, str(rec.status), rec.outcome).inc()
        line = {k: v for k, v in asdict(rec).items() if k != "t0"}
        for k in ("ttft_s", "duration_s"):
            if line[k] is not None:
                line[k] = round(line[k], 4)
        request_log.info(json.dumps(line))

"""Load on `kvloft serve`: concurrent streaming requests over shared sessions and several keys.

Starts `kvloft serve --model smollm2` on 127.0.0.1 (a free port, 4 API keys), then sends
--requests streaming chat requests at once (threads), over --sessions session ids, each id
owned by one of the keys (request j: session j % sessions, turn j // sessions). --disconnects of
them hang up at a random point: before the answer starts (mid-prefill) or after a few pieces.
A 503 is retried after its Retry-After (for at most --timeout seconds). Then:

  equal       every completed (200) answer against the same request run one at a time: per
              session, the completed requests are replayed in the order the server ran them
              (their reused_tokens, which grow by turn) on a fresh session id, one by one (greedy)
  statuses    every status seen; any 5xx other than a 503 carrying Retry-After is a failure
  cross-key   GET and DELETE of every session id with each of the other keys (all must be 404)
  rss         of the server process: after a warm-up request, after the load, after every
              session is deleted
  spill       the server's spilled bytes (GET /v1/usage), peak during the load and at the end
  latency     p50/p99 seconds from send to [DONE] of the completed requests (last attempt)
  shutdown    seconds from SIGTERM to the server's exit

    python bench/serve_load.py                                   # defaults: 64 requests, 16 sessions
    python bench/serve_load.py --requests 16 --sessions 4 --max-tokens 4
Prints a table and one JSON line last; writes JSON to bench/results/serve_load_cpu.json (--out).

--mode batch: continuous batching against one request at a time, on one server. --sessions
streaming completions, each on its own new session with its own prompt of --prompt-tokens
tokens, greedy, --max-tokens each (asked to copy the records: long answers, though EOS may end one early), are sent
first one at a time, then all at once. Reports tokens/s of both (prompt + answer tokens over
wall-clock seconds, and answer tokens alone), their ratio, time to first token, and whether
every concurrent answer equals its sequential one. Target: ratio >= 3 at 16 sessions of 2K
tokens on SmolLM2; JSON to bench/results/serve_batch_cpu.json.

    python bench/serve_load.py --mode batch                      # 16 sessions x 2048 tokens, 128 answer tokens
    python bench/serve_load.py --mode batch --sessions 4 --prompt-tokens 256 --max-tokens 16
Never run by the tests.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
KEYS = [f"load-key-{i}" for i in range(4)]
QUESTIONS = ["Name a colour.", "Name a fruit.", "Name an animal.", "Name a city.", "Name a number.",
             "Name a planet.", "Name a tree.", "Name a river."]


def sse_objects(r: http.client.HTTPResponse) -> Iterator[dict[str, Any]]:
    """The JSON objects of a streamed response's `data: {...}` lines, up to `data: [DONE]`
    (not to EOF: the server keeps the connection alive)."""
    while line := r.fp.readline():
        line = line.strip()
        if line == b"data: [DONE]":
            return
        if line.startswith(b"data: {"):
            yield json.loads(line[6:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Client:
    def __init__(self, port: int, model: str = "") -> None:
        self.port, self.model = port, model

    def call(self, method: str, path: str, key: str | None, body=None, timeout: float = 120):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
            conn.request(method, path, None if body is None else json.dumps(body), headers)
            r = conn.getresponse()
            raw = r.read()
            return r.status, dict(r.getheaders()), json.loads(raw) if raw.startswith(b"{") else raw.decode()
        finally:
            conn.close()

    def chat_body(self, sid: str, question: str, max_tokens: int) -> dict:
        return {"model": self.model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "session_id": sid}

    def stream(self, key: str, body: dict, hang_up_after: int | None, timeout: float) -> dict:
        """One streamed request: {status, retry_after, text, ext, seconds, hung_up}."""
        t0 = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        out = {"status": None, "retry_after": None, "text": "", "ext": None, "hung_up": False, "finish": None}
        try:
            conn.request("POST", "/v1/chat/completions", json.dumps(body),
                         {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
            if hang_up_after == 0:  # mid-prefill: the answer's headers come after the prompt is fed
                time.sleep(random.uniform(0.0, 0.3))
                out["hung_up"] = True
                return out
            r = conn.getresponse()
            out["status"], out["retry_after"] = r.status, r.getheader("Retry-After")
            if r.status != 200:
                out["error"] = r.read().decode()[:300]
                return out
            pieces = 0
            for obj in sse_objects(r):
                if "error" in obj:
                    out["error"] = obj["error"]["message"]
                    continue
                if obj.get("kvloft") is not None:
                    out["ext"] = obj["kvloft"]
                for ch in obj.get("choices", []):
                    out["text"] += ch["delta"].get("content") or ""
                    out["finish"] = ch.get("finish_reason") or out["finish"]
                    pieces += bool(ch["delta"].get("content"))
                if hang_up_after is not None and pieces >= hang_up_after and out["finish"] is None:
                    out["hung_up"] = True
                    return out
            return out
        finally:
            if out["hung_up"] and conn.sock is not None:
                conn.sock.shutdown(socket.SHUT_RDWR)
            conn.close()
            out["seconds"] = time.monotonic() - t0


def start_server(port: int, args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "kvloft.cli", "serve", "--model", args.model, "--host", "127.0.0.1",
           "--port", str(port), "--max-sessions", str(args.max_sessions), "--log-level", "warning",
           "--method", args.method, "--window", "64", "--sink", "16", "--budget", "64"]
    for k in KEYS:
        cmd += ["--api-key", k]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_up(client: Client, proc: subprocess.Popen, timeout: float = 180) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if client.call("GET", "/health", None, timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit("server did not start")


def run_load(client: Client, args, plan: list[dict]) -> tuple[list[dict], int]:
    """Every planned request at once; 503s retried after Retry-After. Returns results and peak spill."""
    results: list[dict] = [{} for _ in plan]
    peak = [0]
    stop = threading.Event()

    def one(i: int, p: dict) -> None:
        seen = []
        give_up = time.monotonic() + args.timeout
        while True:
            r = client.stream(p["key"], client.chat_body(p["sid"], p["question"], args.max_tokens),
                              p["hang_up_after"], timeout=args.timeout)
            seen.append((r["status"], r["retry_after"]))
            wait = float(r["retry_after"] or 1) * random.uniform(1.0, 2.0)
            if r["status"] != 503 or time.monotonic() + wait > give_up:
                break
            time.sleep(wait)
        results[i] = {**p, **r, "statuses": seen}

    def watch_spill() -> None:
        while not stop.wait(0.5):
            try:
                peak[0] = max(peak[0], client.call("GET", "/v1/usage", KEYS[0], timeout=5)[2]["spilled_bytes"])
            except (OSError, KeyError, TypeError):
                pass

    threads = [threading.Thread(target=one, args=(i, p), daemon=True) for i, p in enumerate(plan)]
    watcher = threading.Thread(target=watch_spill, daemon=True)
    watcher.start()
    deadline = time.monotonic() + args.deadline
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    stop.set()
    if any(t.is_alive() for t in threads):
        print(f"warning: {sum(t.is_alive() for t in threads)} requests still running at the deadline",
              file=sys.stderr)
    return results, peak[0]


def replay(client: Client, args, results: list[dict]) -> list[dict]:
    """Per session, the completed requests in the server's order, one at a time on a fresh id."""
    checks = []
    by_sid: dict[str, list[dict]] = {}
    for r in results:
        if r.get("status") == 200 and not r["hung_up"] and r.get("ext") and "error" not in r:
            by_sid.setdefault(r["sid"], []).append(r)
    for sid, rs in sorted(by_sid.items()):
        rs.sort(key=lambda r: r["ext"]["reused_tokens"])
        for r in rs:
            want = client.stream(r["key"], client.chat_body(f"seq-{sid}", r["question"], args.max_tokens), None,
                                 timeout=args.timeout)
            checks.append({"sid": sid, "turn": r["turn"], "equal": want["text"] == r["text"],
                           "got": r["text"], "sequential": want["text"],
                           "context_equal": want["ext"] and want["ext"]["reused_tokens"] == r["ext"]["reused_tokens"]})
    return checks


def cross_key(client: Client, sids: dict[str, str]) -> dict:
    attempts = readable = 0
    for sid, owner in sids.items():
        for key in KEYS:
            if key == owner:
                continue
            for method in ("GET", "DELETE"):
                attempts += 1
                readable += client.call(method, f"/v1/sessions/{sid}", key)[0] != 404
    return {"attempts": attempts, "not_404": readable}


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


# ---- --mode batch ----------------------------------------------------------------------------------


def batch_prompts(model: str, n: int, tokens: int, seed: int) -> list[str]:
    """n different prompts of about `tokens` tokens each (counted with the model's tokenizer)."""
    sys.path.insert(0, str(ROOT))
    from kvloft import load_tokenizer

    tok = load_tokenizer(model)
    rng = random.Random(seed)
    out = []
    for i in range(n):
        lines = [f"Record {i}.{j}: the archive of {rng.choice(QUESTIONS)[5:-1].lower()} keeps value "
                 f"{rng.randrange(10**6)}." for j in range(tokens // 8)]  # ~16 tokens a line: enough
        ids = tok.encode("\n".join(lines))[: tokens - 16]
        out.append(tok.decode(ids) + "\nCopy every record above, one per line, with its value:\n")  # a long answer
    return out


def completion_stream(client: Client, key: str, sid: str, prompt: str, max_tokens: int, timeout: float) -> dict:
    """One streamed greedy completion: {text, status, ttft, seconds, usage}."""
    t0 = time.monotonic()
    body = {"model": client.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "session_id": sid}
    conn = http.client.HTTPConnection("127.0.0.1", client.port, timeout=timeout)
    out = {"text": "", "status": None, "ttft": None, "usage": None}
    try:
        conn.request("POST", "/v1/completions", json.dumps(body),
                     {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        r = conn.getresponse()
        out["status"] = r.status
        for obj in sse_objects(r):
            if "error" in obj:
                out["error"] = obj["error"]["message"]
            if obj.get("usage"):
                out["usage"] = obj["usage"]
            for ch in obj.get("choices", []):
                if ch.get("text") and out["ttft"] is None:
                    out["ttft"] = time.monotonic() - t0
                out["text"] += ch.get("text") or ""
    finally:
        conn.close()
    out["seconds"] = time.monotonic() - t0
    return out


def run_batch_phase(client: Client, prompts: list[str], args, tag: str, concurrent: bool) -> tuple[list[dict], float]:
    results: list[dict] = [{} for _ in prompts]

    def one(i: int) -> None:
        results[i] = completion_stream(client, KEYS[0], f"{tag}-{i}", prompts[i], args.max_tokens, args.timeout)

    t0 = time.monotonic()
    if concurrent:
        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(args.timeout)
    else:
        for i in range(len(prompts)):
            one(i)
    wall = time.monotonic() - t0
    for i in range(len(prompts)):
        client.call("DELETE", f"/v1/sessions/{tag}-{i}", KEYS[0])
    return results, wall


def phase_summary(results: list[dict], wall: float) -> dict:
    use = [r.get("usage") or {} for r in results]
    prompt, answer = sum(u.get("prompt_tokens", 0) for u in use), sum(u.get("completion_tokens", 0) for u in use)
    ttft = [r["ttft"] for r in results if r.get("ttft") is not None]
    return {"wall_s": round(wall, 2), "prompt_tokens": prompt, "answer_tokens": answer,
            "total_tok_per_s": round((prompt + answer) / wall, 1), "answer_tok_per_s": round(answer / wall, 2),
            "ttft_p50_s": percentile(ttft, 0.5), "ttft_max_s": max(ttft) if ttft else None,
            "statuses": dict(Counter(str(r.get("status")) for r in results)),
            "errors": sorted({r["error"] for r in results if "error" in r})[:5]}


def main_batch(args) -> int:
    prompts = batch_prompts(args.model, args.sessions, args.prompt_tokens, args.seed)
    port = free_port()
    args.max_sessions = max(args.max_sessions, 2 * args.sessions)
    proc = start_server(port, args)
    try:
        client = Client(port)
        wait_up(client, proc)
        client.model = client.call("GET", "/v1/models", KEYS[0])[2]["data"][0]["id"]
        completion_stream(client, KEYS[0], "warm-up", prompts[0][:200], 4, args.timeout)
        client.call("DELETE", "/v1/sessions/warm-up", KEYS[0])
        seq, seq_wall = run_batch_phase(client, prompts, args, "seq", concurrent=False)
        bat, bat_wall = run_batch_phase(client, prompts, args, "bat", concurrent=True)
        metrics_text = client.call("GET", "/metrics", KEYS[0])[2]
        engine = next((ln for ln in str(metrics_text).splitlines() if ln.startswith("kvloft_engine_info{")), "?")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    s, b = phase_summary(seq, seq_wall), phase_summary(bat, bat_wall)
    equal = [a["text"] == c["text"] and "error" not in a and "error" not in c for a, c in zip(seq, bat, strict=True)]
    ratio = b["total_tok_per_s"] / s["total_tok_per_s"] if s["total_tok_per_s"] else None
    report = {"mode": "batch", "device": "CPU (2 cores, shared with other jobs)", "model": args.model,
              "method": args.method, "engine": engine, "sessions": args.sessions, "prompt_tokens": args.prompt_tokens,
              "max_tokens": args.max_tokens, "sequential": s, "concurrent": b,
              "total_tok_per_s_ratio": round(ratio, 2) if ratio else None,
              "answer_tok_per_s_ratio": round(b["answer_tok_per_s"] / s["answer_tok_per_s"], 2)
              if s["answer_tok_per_s"] else None,
              "equal_to_sequential": sum(equal), "compared": len(equal),
              "mismatches": [{"i": i, "sequential": seq[i]["text"][:200], "concurrent": bat[i]["text"][:200]}
                             for i, ok in enumerate(equal) if not ok][:5],
              "targets": {"ratio_ge_3": bool(ratio and ratio >= 3), "every_answer_equal": all(equal)}}
    out = args.out if args.out_given else str(ROOT / "bench/results/serve_batch_cpu.json")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=1) + "\n")
    for name in ("engine", "sequential", "concurrent", "total_tok_per_s_ratio", "answer_tok_per_s_ratio",
                 "equal_to_sequential", "targets"):
        print(f"{name:>24}: {report[name]}")
    print(json.dumps({k: v for k, v in report.items() if k != "mismatches"}))
    return 0 if all(report["targets"].values()) else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", default="load", choices=["load", "batch"],
                    help="load: the mixed load above; batch: concurrent vs one-at-a-time throughput")
    ap.add_argument("--prompt-tokens", type=int, default=2048, help="--mode batch: tokens per prompt")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--method", default="exact")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--sessions", type=int, default=16)
    ap.add_argument("--disconnects", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--max-sessions", type=int, default=8, help="the server's resident sessions")
    ap.add_argument("--timeout", type=float, default=240,
                    help="seconds per request, its retries of a 503 (after Retry-After) included")
    ap.add_argument("--deadline", type=float, default=420, help="seconds for the whole load")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench/results/serve_load_cpu.json"))
    args = ap.parse_args()
    args.out_given = "--out" in sys.argv
    if args.mode == "batch":
        if "--sessions" not in sys.argv:
            args.sessions = 16
        if "--max-tokens" not in sys.argv:
            args.max_tokens = 128
        return main_batch(args)
    rng = random.Random(args.seed)
    random.seed(args.seed)

    sids = {f"s{i:02d}": KEYS[i % len(KEYS)] for i in range(args.sessions)}
    hang = set(rng.sample(range(args.requests), args.disconnects))
    plan = [{"i": j, "sid": f"s{j % args.sessions:02d}", "key": sids[f"s{j % args.sessions:02d}"],
             "turn": j // args.sessions, "question": QUESTIONS[j % len(QUESTIONS)],
             "hang_up_after": (rng.choice([0, 0, 1, 2, 3]) if j in hang else None)} for j in range(args.requests)]

    port = free_port()
    t_start = time.monotonic()
    proc = start_server(port, args)
    try:
        client = Client(port)
        wait_up(client, proc)
        client.model = client.call("GET", "/v1/models", KEYS[0])[2]["data"][0]["id"]
        warm = client.stream(KEYS[0], client.chat_body("warm-up", "Hello.", args.max_tokens), None, args.timeout)
        assert warm["status"] == 200, warm
        client.call("DELETE", "/v1/sessions/warm-up", KEYS[0])
        rss_start = rss_mb(proc.pid)
        t0 = time.monotonic()
        results, spill_peak = run_load(client, args, plan)
        load_s = time.monotonic() - t0
        rss_after_load = rss_mb(proc.pid)
        usage_after_load = client.call("GET", "/v1/usage", KEYS[0])[2]
        leaks = cross_key(client, sids)
        checks = replay(client, args, results)
        for sid, key in sids.items():
            client.call("DELETE", f"/v1/sessions/{sid}", key)
            client.call("DELETE", f"/v1/sessions/seq-{sid}", key)
        time.sleep(1.0)
        rss_end = rss_mb(proc.pid)
        usage_end = client.call("GET", "/v1/usage", KEYS[0])[2]
    finally:
        t_term = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutdown_s = time.monotonic() - t_term
    report = summarize(args, results, checks, leaks, spill_peak, usage_after_load, usage_end,
                       (rss_start, rss_after_load, rss_end), load_s, shutdown_s, time.monotonic() - t_start)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print_table(report)
    print(json.dumps({k: v for k, v in report.items() if k not in ("mismatches", "errors")}))
    return 0 if all(report["targets"].values()) else 1


def summarize(args, results, checks, leaks, spill_peak, usage_load, usage_end, rss, load_s, shutdown_s, total_s):
    every = Counter(str(s) for r in results for s, _ in r.get("statuses", []))
    bad_5xx = [(s, ra) for r in results for s, ra in r.get("statuses", []) if s and s >= 500 and
               not (s == 503 and ra)]
    done = [r for r in results if r.get("status") == 200 and not r["hung_up"] and "error" not in r]
    lat = [r["seconds"] for r in done]
    equal = sum(c["equal"] for c in checks)
    rss_start, rss_load, rss_end = rss
    return {
        "device": "CPU (2 cores, shared with other jobs)", "model": args.model, "method": args.method,
        "requests": args.requests, "sessions": args.sessions, "keys": len(KEYS), "disconnects": args.disconnects,
        "max_tokens": args.max_tokens, "server_max_sessions": args.max_sessions,
        "statuses_seen": dict(every), "final": dict(Counter(str(r.get("status")) for r in results)),
        "hung_up": sum(bool(r.get("hung_up")) for r in results), "completed": len(done),
        "stream_errors": sum("error" in r for r in results if r.get("status") == 200),
        "errors": sorted({r["error"] for r in results if "error" in r})[:10],
        "bad_5xx": len(bad_5xx), "equal_to_sequential": equal, "compared": len(checks),
        "mismatches": [c for c in checks if not c["equal"]][:10],
        "rss_mb": {"start": round(rss_start, 1), "after_load": round(rss_load, 1), "after_delete": round(rss_end, 1)},
        "spilled_bytes": {"peak": spill_peak, "after_load": usage_load.get("spilled_bytes"),
                          "after_delete": usage_end.get("spilled_bytes")},
        "evictions": usage_load.get("evictions"), "restores": usage_load.get("restores"),
        "latency_s": {"p50": percentile(lat, 0.5), "p99": percentile(lat, 0.99)},
        "cross_key": leaks, "load_s": round(load_s, 1), "shutdown_s": round(shutdown_s, 2),
        "total_s": round(total_s, 1),
        "targets": {"no_5xx_but_503_with_retry_after": not bad_5xx,
                    "every_200_equals_sequential": equal == len(checks) and len(checks) == len(done),
                    "rss_within_10pct": rss_end <= 1.10 * rss_start,
                    "no_cross_key_reads": leaks["not_404"] == 0},
    }


def print_table(r: dict) -> None:
    rows = [("statuses seen", r["statuses_seen"]), ("final statuses", r["final"]),
            ("completed / hung up", f"{r['completed']} / {r['hung_up']}"),
            ("equal to sequential", f"{r['equal_to_sequential']} / {r['compared']}"),
            ("5xx without Retry-After", r["bad_5xx"]), ("rss MB", r["rss_mb"]), ("spilled bytes", r["spilled_bytes"]),
            ("latency s", r["latency_s"]), ("cross-key", r["cross_key"]), ("load s", r["load_s"]),
            ("shutdown s", r["shutdown_s"]), ("targets", r["targets"])]
    for name, value in rows:
        print(f"{name:>24}: {value}")


if __name__ == "__main__":
    sys.exit(main())

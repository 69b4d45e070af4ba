"""`kvloft serve` on a model and device at several concurrency levels, within a time limit.

Starts `kvloft serve --model M --device D` on 127.0.0.1 and, for each --sessions level n (a list,
e.g. 1,8,32), sends n streaming greedy completions at once, each on a new session with its own
prompt of --prompt-tokens tokens, --max-tokens answer tokens each (asked to copy the records: a
long answer, though EOS may end one early). Level 1 is the batch-1 baseline: --batch1-requests
prompts sent one at a time. Prompt i is the same at every level, so a level's answer to prompt i
is compared with the batch-1 answer to it (reported, never a failure: bf16 GEMMs over a batch
round differently from one-row ones). Per level (bench/serve_stats.py):

  total_tok_per_s     (prompt + answer tokens of finished requests) / wall-clock seconds
  answer_tok_per_s    answer tokens / wall-clock seconds
  ttft_p50_s          send to first streamed piece (p99, max too)
  itl_p50_ms / p99    between consecutive streamed pieces of one request, client-side
  server              from the server's /metrics over the level: decode batch-size histogram,
                      decode and prefill tokens, its own mean ITL and TTFT
  equal_to_batch1     answers equal to the batch-1 answer of the same prompt

--time-limit bounds the whole run (server start included): no level starts past it, and at it the
requests still streaming are hung up (the server cancels them) and the level reports what
finished (`cut`). --prompt-tokens may list fallbacks (32768,16384): after the first level, when
the estimate of the remaining levels (serve_stats.estimate_level_s) exceeds the time left, the
next length is used instead, from its own first level. A progress line per level; the JSON
(--out) is rewritten after every level, so a run killed from outside leaves what it measured.

    python bench/serve_gpu.py --model /root/stage/q.gguf --device cuda --sessions 1,8,32 \
        --prompt-tokens 32768,16384 --max-tokens 64 --time-limit 200 --out /tmp/sg/serve_gpu.json
    python bench/serve_gpu.py --sessions 1,2 --prompt-tokens 256 --max-tokens 4 --time-limit 120   # CPU
Never run by the tests (bench/serve_stats.py, its arithmetic, is).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from serve_load import KEYS, Client, batch_prompts, free_port, wait_up
from serve_stats import equality, estimate_level_s, level_summary, server_figures

ROOT = Path(__file__).resolve().parents[1]
MAX_LEVEL = 256  # concurrent sessions of one level (threads and server sessions)
MAX_PROMPT_TOKENS = 1 << 20


class Hangups:
    """The open streaming connections, so the time limit can hang them all up at once."""

    def __init__(self) -> None:
        self.conns: set[http.client.HTTPConnection] = set()
        self.lock = threading.Lock()

    def add(self, conn) -> None:
        with self.lock:
            self.conns.add(conn)

    def discard(self, conn) -> None:
        with self.lock:
            self.conns.discard(conn)

    def hang_up_all(self) -> None:
        with self.lock:
            for conn in self.conns:
                if conn.sock is not None:
                    try:
                        conn.sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass


def stream_timed(client: Client, sid: str, prompt: str, max_tokens: int, timeout: float, hangups: Hangups) -> dict:
    """One streamed greedy completion with the arrival time of every piece (serve_stats' record)."""
    body = {"model": client.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "session_id": sid}
    out = {"status": None, "text": "", "usage": None, "t_send": time.monotonic(), "t_first": None,
           "piece_times": [], "cut": False, "finish": None}
    conn = http.client.HTTPConnection("127.0.0.1", client.port, timeout=timeout)
    hangups.add(conn)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body),
                     {"Authorization": f"Bearer {KEYS[0]}", "Content-Type": "application/json"})
        r = conn.getresponse()
        out["status"] = r.status
        while line := r.fp.readline():  # read to [DONE], not to EOF: the server keeps the connection alive
            if line.startswith(b"data: [DONE]"):
                break
            if line.startswith(b"data: {"):
                _take_event(out, json.loads(line[6:]), time.monotonic())
        out["cut"] = out["finish"] is None and "error" not in out  # stream ended without its last event
    except (OSError, http.client.HTTPException) as e:
        out["cut"] = True
        out["cut_reason"] = type(e).__name__
    finally:
        hangups.discard(conn)
        conn.close()
        out["t_end"] = time.monotonic()
    return out


def _take_event(out: dict, obj: dict, now: float) -> None:
    if "error" in obj:
        out["error"] = obj["error"].get("message", str(obj["error"]))
    if obj.get("usage"):
        out["usage"] = obj["usage"]
    for ch in obj.get("choices", []):
        if ch.get("text"):
            out["piece_times"].append(now)
            out["t_first"] = out["t_first"] or now
            out["text"] += ch["text"]
        out["finish"] = ch.get("finish_reason") or out["finish"]


def start_server(port: int, args, log_path: Path) -> subprocess.Popen:
    ctx = max(args.prompt_tokens) + args.max_tokens + 512  # the prompt as the server tokenizes it, with room
    top = max(args.sessions)
    cmd = [sys.executable, "-m", "kvloft.cli", "serve", "--model", args.model, "--device", args.device,
           "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--method", args.method,
           "--budget", str(args.budget), "--sink", str(args.sink), "--window", str(args.window),
           "--max-batch", str(top), "--step-tokens", str(args.step_tokens), "--max-sessions", str(top + 2),
           "--max-stored-sessions", str(2 * top + 8), "--max-context", str(ctx),
           "--max-request-bytes", str(64 * max(args.prompt_tokens) + (1 << 16))]
    if args.kernels:
        cmd += ["--kernels", args.kernels]
    for k in KEYS:
        cmd += ["--api-key", k]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    log = open(log_path, "wb")  # noqa: SIM115 -- the server writes it until it exits
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def run_level(client: Client, prompts: list[str], n: int, args, deadline: float, tag: str) -> tuple[list, float]:
    """n requests at once (n == 1: --batch1-requests one after another). Returns records, wall seconds."""
    hangups = Hangups()
    k = min(args.batch1_requests, len(prompts)) if n == 1 else n
    results: list[dict] = [{} for _ in range(k)]

    def one(i: int) -> None:
        timeout = max(5.0, deadline - time.monotonic() + 60)
        results[i] = {"i": i, **stream_timed(client, f"{tag}-{i}", prompts[i], args.max_tokens, timeout, hangups)}

    t0 = time.monotonic()
    if n == 1:
        for i in range(k):
            if time.monotonic() >= deadline:  # stop sending new work
                results = results[:i]
                break
            timer = threading.Timer(max(0.0, deadline - time.monotonic()), hangups.hang_up_all)
            timer.start()
            one(i)
            timer.cancel()
    else:
        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(k)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in threads):
            hangups.hang_up_all()
            for t in threads:
                t.join(30)
    ends = [r["t_end"] for r in results if "t_end" in r]
    wall = (max(ends) if ends else time.monotonic()) - t0
    for i in range(len(results)):
        client.call("DELETE", f"/v1/sessions/{tag}-{i}", KEYS[0])
    return [r for r in results if r], max(wall, 1e-6)


def one_level(client: Client, prompts: list[str], n: int, pt: int, args, deadline: float, t_start: float,
              batch1: dict[int, str] | None) -> tuple[dict, dict[int, str]]:
    """Run level n, print its progress line; returns its report entry and its finished answers."""
    before = client.call("GET", "/metrics", KEYS[0])[2]
    results, wall = run_level(client, prompts, n, args, deadline, f"p{pt}-n{n}")
    after = client.call("GET", "/metrics", KEYS[0])[2]
    answers = {r["i"]: r["text"] for r in results if r.get("status") == 200 and not r.get("cut") and "error" not in r}
    entry = {"sessions": n, "prompt_len": pt, "batch1": n == 1, **level_summary(results, wall),
             "server": server_figures(before, after),
             "equal_to_batch1": None if batch1 is None else equality(batch1, answers),
             "per_request": [per_request(r) for r in results]}
    eq = entry["equal_to_batch1"]
    print(f"[{time.monotonic() - t_start:6.1f} s] sessions {n:>3} x {pt} tokens: finished {entry['finished']}/"
          f"{entry['requests']} (cut {entry['cut']}) in {entry['wall_s']:.1f} s; {entry['total_tok_per_s']} tok/s, "
          f"answer {entry['answer_tok_per_s']} tok/s; TTFT p50 {entry['ttft_p50_s']} s; ITL p50/p99 "
          f"{entry['itl_p50_ms']}/{entry['itl_p99_ms']} ms; mean decode batch {entry['server']['batch_size']['mean']}"
          + ("" if eq is None else f"; equal to batch 1: {eq['equal']}/{eq['compared']}"), flush=True)
    return entry, answers


def per_request(r: dict) -> dict:
    first = None if r.get("t_first") is None else round(r["t_first"] - r["t_send"], 3)
    return {"i": r["i"], "status": r.get("status"), "cut": r.get("cut"), "ttft_s": first,
            "seconds": round(r["t_end"] - r["t_send"], 3), "pieces": len(r.get("piece_times") or []),
            "answer_tokens": (r.get("usage") or {}).get("completion_tokens")}


def run_lengths(client: Client, args, report: dict, deadline: float, t_start: float) -> None:
    """Each prompt length until one fits the time left: its first level, then (if they fit) the rest."""
    for li, pt in enumerate(args.prompt_tokens):
        prompts = batch_prompts(args.tokenizer or args.model, max(args.sessions), pt, args.seed)
        if time.monotonic() >= deadline:
            report["not_run"] += [{"sessions": n, "prompt_len": pt} for n in args.sessions]
            return
        first, ref = one_level(client, prompts, args.sessions[0], pt, args, deadline, t_start, None)
        report["levels"].append(first)
        write(report, args.out)
        rest = args.sessions[1:]
        est = sum(estimate_level_s(first, n, args.max_tokens) for n in rest)
        left = deadline - time.monotonic()
        if est > left and li + 1 < len(args.prompt_tokens):
            report["fallbacks"].append({"prompt_tokens": pt, "estimate_s": round(est, 1), "left_s": round(left, 1)})
            print(f"  levels {rest} at {pt} tokens: estimated {est:.0f} s, {left:.0f} s left: "
                  f"falling back to {args.prompt_tokens[li + 1]} tokens", flush=True)
            continue
        batch1 = ref if args.sessions[0] == 1 else None
        for n in rest:
            if time.monotonic() >= deadline:
                report["not_run"].append({"sessions": n, "prompt_len": pt})
                continue
            report["levels"].append(one_level(client, prompts, n, pt, args, deadline, t_start, batch1)[0])
            write(report, args.out)
        return


def write(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")


def card() -> str | None:
    """The GPU's name and memory from nvidia-smi (no CUDA query in this process)."""
    if shutil.which("nvidia-smi") is None:
        return None
    r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                       capture_output=True, text=True, timeout=30, check=False)
    return r.stdout.strip() or None


def main() -> int:
    args = parse_args()
    t_start = time.monotonic()
    deadline = t_start + args.time_limit
    log_path = args.out.with_suffix(".server.log")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = start_server(port, args, log_path)
    report = {"bench": "serve_gpu", "model": args.model, "device": args.device, "card": card(),
              "method": args.method, "budget": args.budget, "sink": args.sink, "window": args.window,
              "step_tokens": args.step_tokens, "max_tokens": args.max_tokens, "sessions": args.sessions,
              "prompt_tokens": args.prompt_tokens, "batch1_requests": args.batch1_requests,
              "time_limit_s": args.time_limit, "levels": [], "fallbacks": [], "not_run": []}
    try:
        client = Client(port)
        wait_up(client, proc, timeout=max(1.0, deadline - time.monotonic()))
        client.model = client.call("GET", "/v1/models", KEYS[0])[2]["data"][0]["id"]
        report["engine"] = next((ln for ln in client.call("GET", "/metrics", KEYS[0])[2].splitlines()
                                 if ln.startswith("kvloft_engine_info{")), None)
        report["startup_s"] = round(time.monotonic() - t_start, 1)
        warm_up(client, args, deadline)
        report["warm_up_done_s"] = round(time.monotonic() - t_start, 1)
        print(f"[{report['warm_up_done_s']:6.1f} s] server up ({report['engine']}), warmed up", flush=True)
        run_lengths(client, args, report, deadline, t_start)
    finally:
        report["server_exit"] = stop(proc)
        report["total_s"] = round(time.monotonic() - t_start, 1)
        report["server_log_tail"] = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
        write(report, args.out)
    print(json.dumps({k: v for k, v in report.items() if k not in ("levels", "server_log_tail")}))
    return 0 if report["levels"] else 1


def warm_up(client: Client, args, deadline: float) -> None:
    """max(--sessions) requests at once, before any level is timed, so that what compiles or is
    captured on first use is: one prompt of two prefill chunks past sink + window (chunked prefill,
    host tier), the others just past sink + window, each decoding max(--sessions) + 4 tokens, so
    the batch grows through every padded size the engine captures CUDA graphs for (1, 2, 4, ...).
    Hung up at the deadline."""
    n, tok = max(args.sessions), args.tokenizer or args.model
    short = min(args.sink + args.window + 256, min(args.prompt_tokens))
    long = min(short + 2 * args.step_tokens, min(args.prompt_tokens))
    texts = batch_prompts(tok, 1, long, args.seed + 1) + (batch_prompts(tok, n - 1, short, args.seed + 2) if n > 1 else [])
    hangups = Hangups()
    timeout = max(5.0, deadline - time.monotonic() + 60)
    threads = [threading.Thread(target=stream_timed, args=(client, f"warm-{i}", text, n + 4, timeout, hangups))
               for i, text in enumerate(texts)]
    timer = threading.Timer(max(0.0, deadline - time.monotonic()), hangups.hang_up_all)
    timer.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    timer.cancel()
    for i in range(n):
        client.call("DELETE", f"/v1/sessions/warm-{i}", KEYS[0])


def stop(proc: subprocess.Popen) -> int | None:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def int_list(text: str, name: str, limit: int) -> list[int]:
    try:
        xs = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{name}: expected comma-separated integers like 1,8,32, got {text!r}") from None
    if not xs or any(not 1 <= x <= limit for x in xs):
        raise SystemExit(f"{name}: every value must be in 1..{limit}, got {text!r}")
    return xs


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="as `kvloft serve --model`: a name, a .gguf or a HF dir")
    ap.add_argument("--tokenizer", default=None, help="model whose tokenizer counts prompt tokens (default --model)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--kernels", default=None, choices=["auto", "reference", "triton"])
    ap.add_argument("--sessions", default="1,8,32", help="concurrency levels, in order; 1 = one at a time")
    ap.add_argument("--prompt-tokens", default="32768", help="tokens per prompt; more values = fallbacks")
    ap.add_argument("--max-tokens", type=int, default=64, help="answer tokens per request")
    ap.add_argument("--batch1-requests", type=int, default=2, help="requests of level 1, one after another")
    ap.add_argument("--method", default="exact")
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--step-tokens", type=int, default=4096,
                    help="server's tokens per engine iteration, and its prefill chunk")
    ap.add_argument("--time-limit", type=float, default=200, help="seconds for the whole run, server start included")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/serve_gpu.json")
    args = ap.parse_args()
    args.sessions = int_list(args.sessions, "--sessions", MAX_LEVEL)
    args.prompt_tokens = int_list(args.prompt_tokens, "--prompt-tokens", MAX_PROMPT_TOKENS)
    if min(args.prompt_tokens) < 64 or args.max_tokens < 1 or args.batch1_requests < 1 or args.time_limit <= 0:
        raise SystemExit("--prompt-tokens >= 64, --max-tokens >= 1, --batch1-requests >= 1, --time-limit > 0")
    return args


if __name__ == "__main__":
    sys.exit(main())

"""`kvloft serve`: an OpenAI-compatible HTTP server over kvloft sessions.

    kvloft serve --model smollm2 [--host 0.0.0.0] --port 8000 [--api-key K ...] [--api-keys-file F]

The app itself is `kvloft.server.app.create_app(model, ServerConfig(...))`; this module
only adds the command line and imports FastAPI/uvicorn when the command runs
(install them with `pip install 'kvloft[serve]'`).
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from kvloft.config import GRAPH_MODES, METHODS

__all__ = ["add_serve_parser", "cmd_serve", "create_app", "serve_settings"]

log = logging.getLogger("kvloft.serve")
LOOPBACK = "127.0.0.1"


def __getattr__(name: str):
    if name == "create_app":
        from kvloft.server.app import create_app

        return create_app
    raise AttributeError(name)


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `serve` command to a `kvloft` argparse subparsers object."""
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP API (completions, chat, sessions)")
    p.add_argument("--model", default="smollm2", help="'smollm2', a .gguf file or a HF safetensors directory")
    p.add_argument("--host", default=None,
                   help=f"address to listen on (default {LOOPBACK}; without an API key, give it to listen elsewhere)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", action="append", default=None,
                   help="accept 'Authorization: Bearer KEY' (repeat for several keys; default: $KVLOFT_API_KEY, "
                        "else no auth); each key sees only its own sessions")
    p.add_argument("--api-keys-file", default=None, help="a file of API keys, one a line ('#' comments)")
    p.add_argument("--model-name", default=None,
                   help="model id to serve (default: the --model name when it is a known one, else the file's name)")
    p.add_argument("--method", default="exact", choices=METHODS, help="default retrieval method of sessions")
    p.add_argument("--budget", type=int, default=256, help="host-tier tokens retrieved per step")
    p.add_argument("--sink", type=int, default=64, help="first tokens always attended")
    p.add_argument("--window", type=int, default=512, help="last tokens always attended")
    p.add_argument("--max-sessions", type=int, default=8, help="sessions resident at once (others spill)")
    p.add_argument("--host-budget", default="0", help="host KV memory of all sessions, e.g. 16GiB (0 = no limit)")
    p.add_argument("--device-budget", default="0", help="static-tier memory of all sessions (0 = no limit)")
    p.add_argument("--spill-dir", default=None,
                   help="where idle sessions are saved, kept after exit (default: a temp dir removed at exit)")
    p.add_argument("--max-request-bytes", type=int, default=1 << 20)
    p.add_argument("--rate-limit", type=float, default=0.0, help="requests per minute per client (0 = none)")
    _add_limit_args(p)
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together in one engine step")
    p.add_argument("--decode-graphs", default="auto", choices=list(GRAPH_MODES),
                   help="CUDA graphs of a decode step: auto (segmented), whole (one graph a step where every "
                        "row's route allows it), segments, off; ignored on the CPU")
    p.add_argument("--step-tokens", type=int, default=512,
                   help="tokens per engine iteration: one per decoding sequence, the rest prefill chunks")
    p.add_argument("--device", default="auto")
    p.add_argument("--kernels", default=None, choices=["auto", "reference", "triton"])
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)
    return p


def _add_limit_args(p: argparse.ArgumentParser) -> None:
    """One option per size a request controls (kvloft.server.limits.Limits)."""
    from kvloft.server.limits import Limits

    d = Limits()
    p.add_argument("--max-context", type=int, default=d.max_context,
                   help="tokens a session may hold (its context + prompt + max_tokens)")
    p.add_argument("--max-window", type=int, default=d.max_window, help="largest n_window a request may ask")
    p.add_argument("--max-sink", type=int, default=d.max_sink, help="largest n_sink a request may ask")
    p.add_argument("--max-budget", type=int, default=d.max_budget, help="largest retrieval budget a request may ask")
    p.add_argument("--max-tokens-limit", type=int, default=d.max_tokens, help="largest max_tokens")
    p.add_argument("--max-stored-sessions", type=int, default=d.max_stored_sessions,
                   help="named sessions kept at once, resident or spilled")
    p.add_argument("--spill-limit", default="8GiB", help="bytes of sessions spilled to disk, e.g. 8GiB")
    p.add_argument("--max-n", type=int, default=d.max_n,
                   help="largest n (choices per request; each extra choice prefills its own session)")


def serve_settings(args) -> tuple[Any, str]:
    """(ServerConfig, host) from the command line; logs who can reach the server."""
    from kvloft.config import RetrievalConfig, RuntimeConfig
    from kvloft.server.app import ServerConfig
    from kvloft.server.auth import read_keys_file
    from kvloft.server.limits import Limits

    keys = list(args.api_key or [])
    if args.api_keys_file:
        keys += read_keys_file(args.api_keys_file)
    if not keys and os.environ.get("KVLOFT_API_KEY"):
        keys = [os.environ["KVLOFT_API_KEY"]]
    runtime = {"device": args.device, "progress": False}
    if args.kernels:
        runtime["kernels"] = args.kernels
    limits = Limits(max_context=args.max_context, max_window=args.max_window, max_sink=args.max_sink,
                    max_budget=args.max_budget, max_tokens=args.max_tokens_limit,
                    max_stored_sessions=args.max_stored_sessions, spill_limit=args.spill_limit, max_n=args.max_n)
    cfg = ServerConfig(
        api_keys=tuple(keys), model_name=args.model_name or _catalog_name(args.model), max_request_bytes=args.max_request_bytes,
        rate_limit=args.rate_limit, limits=limits, default_max_tokens=min(256, args.max_tokens_limit),
        max_sessions=args.max_sessions, host_budget=args.host_budget, device_budget=args.device_budget,
        spill_dir=args.spill_dir, max_batch=args.max_batch, step_tokens=args.step_tokens,
        decode_graphs=args.decode_graphs,
        retrieval=RetrievalConfig(method=args.method, budget=args.budget, n_sink=args.sink, n_window=args.window),
        runtime=RuntimeConfig(**runtime),
    )
    host = args.host or LOOPBACK
    if keys:
        log.info("%d API key(s): each key sees only its own sessions", len(keys))
    else:
        log.warning("no API key: every client shares every session (ids are the only secret); listening on %s%s",
                    host, "" if args.host else " only (give --host to listen elsewhere)")
    return cfg, host


def cmd_serve(args) -> int:
    try:
        import uvicorn  # noqa: F401

        from kvloft.server.app import create_app
        from kvloft.server.drain import serve
    except ImportError as e:
        raise ValueError(f"kvloft serve needs FastAPI and uvicorn ({e}); run: pip install 'kvloft[serve]'") from e
    from kvloft.runtime.loader import load_model

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(message)s")
    cfg, host = serve_settings(args)
    log.info("loading %s ...", args.model)
    model = load_model(args.model, device=args.device)
    app = create_app(model, cfg)
    log.info("serving %s on http://%s:%d/v1 (%s)", cfg.model_name or model.config.name, host, args.port,
             "bearer token required" if cfg.keys else "no auth")
    serve(app, host, args.port, args.log_level)
    return 0


def _catalog_name(model: str) -> str | None:
    """A known model name (`--model qwen2.5-0.5b`) is the id clients ask for; a path is not."""
    from kvloft.runtime import catalog

    return model if catalog.is_known(model) else None

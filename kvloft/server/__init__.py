"""`kvloft serve`: an OpenAI-compatible HTTP server over kvloft sessions.

    kvloft serve --model smollm2 --host 127.0.0.1 --port 8000 [--api-key K]

The app itself is `kvloft.server.app.create_app(model, ServerConfig(...))`; this module
only adds the command line and imports FastAPI/uvicorn when the command runs
(install them with `pip install 'kvloft[serve]'`).
"""

from __future__ import annotations

import argparse
import os

from kvloft.config import METHODS

__all__ = ["add_serve_parser", "cmd_serve", "create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from kvloft.server.app import create_app

        return create_app
    raise AttributeError(name)


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `serve` command to a `kvloft` argparse subparsers object."""
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP API (completions, chat, sessions)")
    p.add_argument("--model", default="smollm2", help="'smollm2', a .gguf file or a HF safetensors directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $KVLOFT_API_KEY, else no auth)")
    p.add_argument("--model-name", default=None, help="model id to serve (default: the model's name)")
    p.add_argument("--method", default="exact", choices=METHODS, help="default retrieval method of sessions")
    p.add_argument("--budget", type=int, default=256, help="host-tier tokens retrieved per step")
    p.add_argument("--sink", type=int, default=64, help="first tokens always attended")
    p.add_argument("--window", type=int, default=512, help="last tokens always attended")
    p.add_argument("--max-sessions", type=int, default=8, help="sessions resident at once (others spill)")
    p.add_argument("--host-budget", default="0", help="host KV memory of all sessions, e.g. 16GiB (0 = no limit)")
    p.add_argument("--device-budget", default="0", help="static-tier memory of all sessions (0 = no limit)")
    p.add_argument("--spill-dir", default=None, help="where idle sessions are saved (default: a temp dir)")
    p.add_argument("--max-request-bytes", type=int, default=1 << 20)
    p.add_argument("--rate-limit", type=float, default=0.0, help="requests per minute per client (0 = none)")
    p.add_argument("--max-tokens-limit", type=int, default=4096)
    p.add_argument("--device", default="auto")
    p.add_argument("--kernels", default=None, choices=["auto", "reference", "triton"])
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args) -> int:
    try:
        import uvicorn

        from kvloft.server.app import ServerConfig, create_app
    except ImportError as e:
        raise ValueError(f"kvloft serve needs FastAPI and uvicorn ({e}); run: pip install 'kvloft[serve]'") from e
    from kvloft.config import RetrievalConfig, RuntimeConfig
    from kvloft.runtime.loader import load_model

    runtime = {"device": args.device, "progress": False}
    if args.kernels:
        runtime["kernels"] = args.kernels
    cfg = ServerConfig(
        api_key=args.api_key or os.environ.get("KVLOFT_API_KEY") or None, model_name=args.model_name,
        max_request_bytes=args.max_request_bytes, rate_limit=args.rate_limit,
        max_tokens_limit=args.max_tokens_limit, default_max_tokens=min(256, args.max_tokens_limit),
        max_sessions=args.max_sessions, host_budget=args.host_budget, device_budget=args.device_budget,
        spill_dir=args.spill_dir,
        retrieval=RetrievalConfig(method=args.method, budget=args.budget, n_sink=args.sink, n_window=args.window),
        runtime=RuntimeConfig(**runtime),
    )
    print(f"loading {args.model} ...", flush=True)
    model = load_model(args.model, device=args.device)
    app = create_app(model, cfg)
    auth = "bearer token required" if cfg.api_key else "no auth"
    print(f"serving {app.state.config.model_name or model.config.name} on http://{args.host}:{args.port}/v1 "
          f"({auth})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0

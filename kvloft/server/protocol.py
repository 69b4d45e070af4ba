"""The OpenAI wire format that kvloft serves: request models, errors, response objects.

Requests follow OpenAI's `/v1/completions` and `/v1/chat/completions`, plus two kvloft
extensions in the body (the official client sends them through `extra_body`):

    "session_id": "doc-42"                      reuse the context this session holds
    "kvloft": {"method": "exact", "budget": 256, "n_sink": 64, "n_window": 512}

Fields of OpenAI's API that kvloft does not implement are refused when set (tools,
response_format, echo, best_of > 1, ...) rather than silently ignored; fields without effect
(user, metadata, ...) are accepted and ignored. Implemented beyond the basics: `n` choices,
`stop` strings (matched on the text, across token boundaries), and logprobs: chat's
`logprobs: true, top_logprobs: k` and completions' `logprobs: k` (k <= 20).
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kvloft.server.sampling import MAX_TOP_LOGPROBS, TokenLogprob


class APIError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(message: str, type: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class KvloftOptions(BaseModel):
    """Retrieval settings of one request (kvloft extension)."""

    model_config = ConfigDict(extra="forbid")
    method: str | None = None
    budget: int | None = Field(default=None, ge=0)
    n_sink: int | None = Field(default=None, ge=0)
    n_window: int | None = Field(default=None, ge=1)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1)
    session_id: str | None = None
    kvloft: KvloftOptions | None = None
    prefill_progress: bool = False  # kvloft: stream "kvloft.prefill" events while the prompt is fed

    def refuse_unsupported(self) -> None:
        for name in ("tools", "functions", "response_format", "echo", "best_of", "suffix"):
            value = (self.model_extra or {}).get(name)
            if value not in (None, False, 1, [], {}) and not (name == "response_format" and value == {"type": "text"}):
                raise APIError(400, f"{name!r} is not supported by kvloft; leave it unset", param=name)

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop takes up to 4 non-empty strings", param="stop")
        return stops


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    def top_logprobs(self) -> int | None:
        """Top-k logprobs per token, or None for none."""
        return self.logprobs


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool | None = None
    top_logprobs_: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS, alias="top_logprobs")

    def top_logprobs(self) -> int | None:
        """Top-k logprobs per token, or None for none."""
        if self.top_logprobs_ is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs_ or 0) if self.logprobs else None


# ---- responses ---------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    """A response id: 128 random bits (never guessable, like every id the server makes)."""
    return f"{prefix}-{secrets.token_hex(16)}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_choice(index: int, text: str, finish: str | None, logprobs: dict | None = None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def chat_choice(index: int, text: str, finish: str | None, logprobs: dict | None = None) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish}


def completion(rid: str, model: str, choices: list[dict], use: dict, ext: dict) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": use, "kvloft": ext}


def completion_chunk(rid: str, model: str, text: str, finish: str | None, index: int = 0,
                     logprobs: dict | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [completion_choice(index, text, finish, logprobs)]}


def chat_completion(rid: str, model: str, choices: list[dict], use: dict, ext: dict) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": use, "kvloft": ext}


def chat_chunk(rid: str, model: str, delta: dict[str, Any], finish: str | None, index: int = 0,
               logprobs: dict | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}


def usage_chunk(rid: str, model: str, obj: str, use: dict, ext: dict) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [],
            "usage": use, "kvloft": ext}


# ---- logprobs ----------------------------------------------------------------------------------


def _token(tok, token: int) -> tuple[str, list[int]]:
    """A token's text and its raw bytes (a token may hold part of a UTF-8 character)."""
    raw = tok.token_bytes(token)
    return raw.decode("utf-8", errors="replace"), list(raw)


def chat_logprobs(tok, entries: list[TokenLogprob]) -> dict[str, Any]:
    """Chat's choices[].logprobs: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    content = []
    for e in entries:
        text, raw = _token(tok, e.token)
        top = []
        for t, lp in e.top:
            t_text, t_raw = _token(tok, t)
            top.append({"token": t_text, "logprob": lp, "bytes": t_raw})
        content.append({"token": text, "logprob": e.logprob, "bytes": raw, "top_logprobs": top})
    return {"content": content}


def completion_logprobs(tok, entries: list[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """Completions' choices[].logprobs: tokens, token_logprobs, top_logprobs (one {token: logprob}
    per token) and text_offset (each token's first character in the answer, from `offset`)."""
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        text = _token(tok, e.token)[0]
        out["tokens"].append(text)
        out["token_logprobs"].append(e.logprob)
        out["top_logprobs"].append({_token(tok, t)[0]: lp for t, lp in e.top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out

"""The OpenAI wire format that kvloft serves: request models, errors, response objects.

Requests follow OpenAI's `/v1/completions` and `/v1/chat/completions`, plus two kvloft
extensions in the body (the official client sends them through `extra_body`):

    "session_id": "doc-42"                      reuse the context this session holds
    "kvloft": {"method": "exact", "budget": 256, "n_sink": 64, "n_window": 512}

Fields of OpenAI's API that kvloft does not implement are refused when set (n > 1,
logprobs, tools, ...) rather than silently ignored; fields without effect on one
sequence (user, metadata, ...) are accepted and ignored.
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


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
    n: int = 1
    logprobs: Any = None
    session_id: str | None = None
    kvloft: KvloftOptions | None = None
    prefill_progress: bool = False  # kvloft: stream "kvloft.prefill" events while the prompt is fed

    def refuse_unsupported(self) -> None:
        if self.n != 1:
            raise APIError(400, f"n={self.n}: kvloft generates one choice per request; send n=1", param="n")
        if self.logprobs not in (None, False, 0):
            raise APIError(400, "logprobs are not supported by kvloft; leave logprobs unset", param="logprobs")
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


# ---- responses ---------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    """A response id: 128 random bits (never guessable, like every id the server makes)."""
    return f"{prefix}-{secrets.token_hex(16)}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(rid: str, model: str, text: str, finish: str, use: dict, ext: dict) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            "usage": use, "kvloft": ext}


def completion_chunk(rid: str, model: str, text: str, finish: str | None) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


def chat_completion(rid: str, model: str, text: str, finish: str, use: dict, ext: dict) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish}],
            "usage": use, "kvloft": ext}


def chat_chunk(rid: str, model: str, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def usage_chunk(rid: str, model: str, obj: str, use: dict, ext: dict) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [],
            "usage": use, "kvloft": ext}

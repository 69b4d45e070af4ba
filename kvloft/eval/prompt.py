"""A generated task sample (Sample) and the text the model reads: plain (context, a blank line,
question and answer prefix) or in the model's chat template (context and question as one user
message, then the answer prefix as the start of the assistant's turn)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["ChatTokenizerLike", "Sample", "TokenizerLike", "build_prompt", "chat_frame", "join_prompt",
           "user_message"]


class TokenizerLike(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ChatTokenizerLike(TokenizerLike, Protocol):
    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str: ...


@dataclass
class Sample:
    """One generated task instance; `build_prompt(sample)` is what the model reads."""

    task: str
    context: str  # instruction + haystack with the needles
    question: str
    answer_prefix: str  # the prompt ends with it; the model continues after it
    references: list[str]  # strings the output must contain (see scoring.TASK_METRIC)
    target_tokens: int
    actual_tokens: int  # tokens of build_prompt(sample) under the generating tokenizer
    seed: int
    depth: float | None  # where the asked needle sits, fraction of the haystack; None: no needle
    needles: list[str] = field(default_factory=list)  # planted texts, the asked one first
    options: dict[str, Any] = field(default_factory=dict)  # params given to generate() beyond defaults
    # (before, after) the user message in the model's chat template; None: a plain prompt
    chat: tuple[str, str] | None = None

    @property
    def prompt(self) -> str:
        return build_prompt(self)


def join_prompt(context: str, question: str, answer_prefix: str, chat: tuple[str, str] | None = None) -> str:
    if chat is None:
        return f"{context}\n\n{question} {answer_prefix}"
    before, after = chat
    return f"{before}{user_message(context, question)}{after}{answer_prefix}"


def user_message(context: str, question: str) -> str:
    """The user turn of a chat-rendered sample: the context, a blank line, the question."""
    return f"{context}\n\n{question}"


def build_prompt(sample: Sample) -> str:
    """The text the model reads. Plain: context, a blank line, the question and the answer
    prefix. Chat: the user message (context and question) in the model's chat template,
    then the answer prefix as the start of the assistant's turn."""
    return join_prompt(sample.context, sample.question, sample.answer_prefix, sample.chat)


_MARK = "\x1eKVLOFT-USER-MESSAGE\x1e"  # no template touches it; found once in the rendering


def chat_frame(tokenizer: ChatTokenizerLike) -> tuple[str, str]:
    """(before, after): the model's chat template around one user message, generation prompt on."""
    render = getattr(tokenizer, "apply_chat_template", None)
    if not callable(render):
        raise TypeError("chat=True needs a tokenizer with apply_chat_template(messages, add_generation_prompt)")
    text = render([{"role": "user", "content": _MARK}], add_generation_prompt=True)
    if text.count(_MARK) != 1:
        raise ValueError(
            "the chat template does not render the user message verbatim once; use chat=False (a plain prompt)"
        )
    before, after = text.split(_MARK)
    return before, after

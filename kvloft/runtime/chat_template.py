"""Chat templates: the model's own Jinja template, rendered as transformers renders it.

A chat template is code from the model's publisher (GGUF `tokenizer.chat_template`,
`chat_template` in tokenizer_config.json, or chat_template.jinja), so it runs in Jinja's
ImmutableSandboxedEnvironment with transformers' settings: trim_blocks, lstrip_blocks, the
loop-controls extension, and the globals templates rely on (`raise_exception`, `strftime_now`,
a `tojson` that does not escape HTML, `namespace`). The variables are `messages`,
`add_generation_prompt`, `tools`, `documents`, the special tokens (`bos_token`, `eos_token`, ...)
and any extra keyword.

Models that carry no template get a built-in one (ChatML, or Llama 3 when the vocabulary has its
header tokens), written as a Jinja template too, so both take the same path.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

BUILTIN_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BUILTIN_LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
BUILTINS = {"builtin-chatml": BUILTIN_CHATML, "builtin-llama3": BUILTIN_LLAMA3}

MAX_TEMPLATE_CHARS = 1 << 20  # the longest published templates are ~20 KB


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Each message a mapping with a str `role` and a str `content` (other keys pass through)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TypeError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise ValueError(f"messages[{i}] has no {key!r} (keys: {sorted(m)}); each needs 'role' and 'content'")
            if not isinstance(m[key], str):
                raise TypeError(
                    f"messages[{i}][{key!r}] must be a str, got {type(m[key]).__name__} ({m[key]!r}); "
                    "pass '' for an empty message"
                )
        out.append(dict(m))
    return out


def render(
    template: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    special_tokens: Mapping[str, str | None] | None = None,
    tools: list[dict[str, Any]] | None = None,
    documents: list[dict[str, Any]] | None = None,
    model_name: str = "this model",
    **extra: Any,
) -> str:
    """Render validated messages with a Jinja chat template (see the module docstring).

    A template that refuses the conversation (`raise_exception`, e.g. roles that do not
    alternate) or fails to run raises ValueError naming the model.
    """
    compiled = _compile(template)
    variables = {**(special_tokens or {}), **extra}
    try:
        return compiled.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            documents=documents,
            **variables,
        )
    except (jinja2.TemplateError, TypeError) as e:
        raise ValueError(f"the chat template of {model_name} failed: {e}") from e


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    if len(template) > MAX_TEMPLATE_CHARS:
        raise ValueError(f"chat template is {len(template)} chars, more than the limit {MAX_TEMPLATE_CHARS}")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _SafeNamespace
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the chat template does not parse (line {e.lineno}): {e.message}") from e


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False):
    # Jinja's own tojson escapes <, >, & for HTML, which a prompt must not see
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _SafeNamespace(Namespace):
    """Jinja's namespace, refusing underscore names (no path to Python internals)."""

    # Namespace's own signature (no named self), so that namespace(self=1) still works
    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _SafeNamespace._check(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _SafeNamespace._check(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template cannot set the namespace attribute {name!r}")

"""Tokenizers: a HF tokenizer.json (with its tokenizer_config.json), or one rebuilt from a GGUF.

    Tokenizer.from_path("path/to/tokenizer.json" | "path/to/hf_dir" | "model.gguf")

A HF dir gives tokenizer.json plus tokenizer_config.json: bos/eos tokens, add_bos_token, the
chat template (or chat_template.jinja); a GGUF its `tokenizer.*` metadata, rebuilt with the
pre-tokenizer its `tokenizer.ggml.pre` names (gguf_tokenizer.py). Chat messages are rendered
with the model's own template (chat_template.py); only a model that carries none gets a built-in
ChatML or Llama 3 one, and `chat_template_source` says which.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders

from kvloft.runtime import chat_template as ct
from kvloft.runtime.gguf_tokenizer import build_gguf_tokenizer, bytes_to_unicode, read_gguf_tokenizer_fields

# tokens that end a chat turn although the file may name another eos (e.g. <|endoftext|>)
_TURN_ENDS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<end_of_turn>")


class Tokenizer:
    """encode/decode plus what a session needs: bos, eos ids, the chat template."""

    def __init__(
        self,
        tok: HFTokenizer,
        *,
        bos_id: int | None = None,
        eos_ids: tuple[int, ...] = (),
        add_bos: bool = False,
        chat_template: str | None = None,
        special_tokens: dict[str, str] | None = None,
        name: str = "this model",
    ) -> None:
        self._tok = tok
        self.bos_id = bos_id
        self.eos_ids = tuple(eos_ids)
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.name = name
        self.special_tokens = dict(special_tokens or {})
        if bos_id is not None:
            self.special_tokens.setdefault("bos_token", tok.id_to_token(bos_id))
        if self.eos_ids:
            self.special_tokens.setdefault("eos_token", tok.id_to_token(self.eos_ids[0]))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def chat_template_source(self) -> str:
        """Where apply_chat_template's format comes from: "model" (the model's own template),
        "builtin-llama3" or "builtin-chatml" (the model carries none)."""
        if self.chat_template:
            return "model"
        return "builtin-llama3" if self._tok.token_to_id("<|start_header_id|>") is not None else "builtin-chatml"

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; bos first when `add_bos` (default: the model's add_bos), unless the
        text already starts with it, as a chat template's rendering does (Llama 3, Mistral)."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        ids = self._tok.encode(text, add_special_tokens=False).ids
        want_bos = self.add_bos if add_bos is None else add_bos
        if want_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int], *, skip_special: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def token_id(self, text: str) -> int | None:
        return self._tok.token_to_id(text)

    def token_bytes(self, token: int) -> bytes:
        """The raw bytes one token stands for; a token may hold part of a UTF-8 character, which
        decode() alone cannot show (byte-level BPE: its alphabet mapped back; `<0xNN>` byte tokens)."""
        piece = self._tok.id_to_token(token)
        if piece is None:
            raise ValueError(f"token id {token} is not in this vocabulary of {self.vocab_size} tokens")
        table = _byte_decoder()
        if isinstance(self._tok.decoder, decoders.ByteLevel) and all(c in table for c in piece):
            return bytes(table[c] for c in piece)
        byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
        if byte:
            return bytes([int(byte.group(1), 16)])
        return piece.replace("\u2581", " ").encode()

    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        add_generation_prompt: bool = True,
        *,
        tools: list[dict[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Render chat messages with the model's chat template (a built-in one where it has none).

        messages: [{"role": str, "content": str, ...}]; the text returned is what
        transformers' `apply_chat_template(..., tokenize=False)` gives, bos token included
        where the template writes it (encode it with add_bos=False then).
        """
        messages = ct.validate_messages(messages)
        template = self.chat_template or ct.BUILTINS[self.chat_template_source]
        return ct.render(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens,
            tools=tools,
            model_name=self.name,
            **template_kwargs,
        )

    def apply_chat_template_continuation(self, messages: list[dict[str, str]], *, open_turn: bool) -> str:
        """Text to append to a conversation already fed whose last turn is the assistant's: the
        close of that turn when `open_turn` (the answer stopped before its end token), then
        `messages` and the generation prompt.

        Rendered after a stand-in history and cut after it, so what a template writes once per
        conversation (bos, a default system prompt) is not written again.
        """
        user, answer = "\x00", "\x01"  # stand-ins no real message holds
        history = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        full = self.apply_chat_template(history + ct.validate_messages(messages), True)
        closed = self.apply_chat_template(history, False)
        if answer not in full or answer not in closed:
            raise ValueError(f"the chat template of {self.name} drops assistant turns; feed the whole conversation")
        tail, close = full.split(answer, 1)[1], closed.split(answer, 1)[1]
        if open_turn or not tail.startswith(close):
            return tail
        return tail[len(close) :]

    # ---- constructors ------------------------------------------------------------------------

    @classmethod
    def from_path(cls, path: str | Path) -> Tokenizer:
        """A tokenizer.json file, a HF model dir (tokenizer.json + tokenizer_config.json), or a .gguf file."""
        p = Path(path)
        if p.is_dir():
            return cls.from_hf_dir(p)
        if not p.is_file():
            raise ValueError(f"tokenizer path {str(p)!r} does not exist; pass a tokenizer.json, a HF dir or a .gguf")
        if p.suffix == ".gguf":
            return cls.from_gguf_fields(read_gguf_tokenizer_fields(p), name=p.stem)
        if p.suffix == ".json":
            if p.name == "tokenizer.json":
                return cls.from_hf_dir(p.parent)
            return cls.from_file(p)
        raise ValueError(f"{p.name!r} is not a tokenizer: expected tokenizer.json, a HF dir or a .gguf file")

    @classmethod
    def from_file(cls, path: str | Path, **kw: Any) -> Tokenizer:
        """A bare tokenizer.json (no config beside it: pass bos_id, eos_ids ... yourself)."""
        return cls(HFTokenizer.from_file(str(path)), **kw)

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """tokenizer.json plus tokenizer_config.json (special tokens, add_bos_token, chat_template),
        chat_template.jinja, and the eos ids config.json / generation_config.json declare."""
        d = Path(path)
        if not (d / "tokenizer.json").is_file():
            raise ValueError(f"{d} has no tokenizer.json; pass a HF model dir with one, or a .gguf file")
        tok = HFTokenizer.from_file(str(d / "tokenizer.json"))
        config = _read_json(d / "tokenizer_config.json")
        specials = {k: s for k in _SPECIAL_KEYS if (s := _token_text(config.get(k))) is not None}
        bos = specials.get("bos_token")
        bos_id = tok.token_to_id(bos) if bos else None
        add_bos = config.get("add_bos_token")
        if add_bos is None:
            add_bos = bos_id is not None and _post_processor_adds(tok, bos_id)
        eos_ids = _declared_ids(d, "eos_token_id")
        if specials.get("eos_token") and tok.token_to_id(specials["eos_token"]) is not None:
            eos_ids.add(tok.token_to_id(specials["eos_token"]))
        return cls(
            tok,
            bos_id=bos_id,
            eos_ids=tuple(sorted(eos_ids | _turn_end_ids(tok))),
            add_bos=bool(add_bos),
            chat_template=_hf_chat_template(d, config),
            special_tokens=specials,
            name=d.name,
        )

    @classmethod
    def from_gguf_fields(cls, meta: dict[str, Any], *, name: str = "this model") -> Tokenizer:
        """Rebuild from GGUF metadata (a dict of `tokenizer.*` fields)."""
        tok = build_gguf_tokenizer(meta)
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        ids = {k: meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")}
        specials = {
            f"{k}_token": tokens[i]
            for k, i in zip(("bos", "eos", "unk", "pad"), ids.values())
            if i is not None and 0 <= i < len(tokens)
        }
        eos_ids = {i for i in (ids["eos"], meta.get("tokenizer.ggml.eot_token_id")) if i is not None}
        add_bos = meta.get("tokenizer.ggml.add_bos_token")
        if add_bos is None:  # llama.cpp adds bos to a SentencePiece vocabulary that does not say otherwise
            add_bos = meta.get("tokenizer.ggml.model") == "llama"
        return cls(
            tok,
            bos_id=ids["bos"],
            eos_ids=tuple(sorted(eos_ids | _turn_end_ids(tok))),
            add_bos=bool(add_bos),
            chat_template=meta.get("tokenizer.chat_template"),
            special_tokens=specials,
            name=name,
        )


_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


@functools.cache
def _byte_decoder() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise TypeError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json spells a special token as a str or as {"content": str, ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _hf_chat_template(d: Path, config: dict[str, Any]) -> str | None:
    """chat_template.jinja wins over tokenizer_config.json's chat_template (as in transformers);
    a list of named templates gives its "default" one."""
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    tpl = config.get("chat_template")
    if isinstance(tpl, list):
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default")
    return tpl if isinstance(tpl, str) else None


def _declared_ids(d: Path, key: str) -> set[int]:
    out: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        v = _read_json(d / name).get(key)
        out.update(x for x in (v if isinstance(v, list) else [v]) if isinstance(x, int))
    return out


def _post_processor_adds(tok: HFTokenizer, bos_id: int) -> bool:
    """Whether tokenizer.json's post-processor puts bos first (Llama 3's does; config silent)."""
    with_specials = tok.encode("a", add_special_tokens=True).ids
    return bool(with_specials) and with_specials[0] == bos_id and tok.encode("a", add_special_tokens=False).ids[:1] != [bos_id]


def _turn_end_ids(tok: HFTokenizer) -> set[int]:
    return {i for name in _TURN_ENDS if (i := tok.token_to_id(name)) is not None}

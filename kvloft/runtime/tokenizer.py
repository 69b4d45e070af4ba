"""Tokenizers: a HF `tokenizer.json`, or one rebuilt from a GGUF file's metadata.

GGUF stores a byte-level BPE vocabulary (`tokenizer.ggml.model == "gpt2"`) as its
token list and merges; we rebuild it with the `tokenizers` library. The pre-tokenizer
follows llama.cpp's pre-tokenizer type (`tokenizer.ggml.pre`): "smollm" splits every
digit on its own before the GPT-2 regex, as SmolLM2's tokenizer.json does.
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

# llama.cpp token types (gguf.TokenType)
_CONTROL, _USER_DEFINED = 3, 4


class Tokenizer:
    """encode/decode plus the ids a session needs (bos, eos, chat template)."""

    def __init__(
        self,
        tok: HFTokenizer,
        *,
        bos_id: int | None = None,
        eos_ids: tuple[int, ...] = (),
        add_bos: bool = False,
        chat_template: str | None = None,
    ) -> None:
        self._tok = tok
        self.bos_id = bos_id
        self.eos_ids = tuple(eos_ids)
        self.add_bos = add_bos
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int], *, skip_special: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def token_id(self, text: str) -> int | None:
        return self._tok.token_to_id(text)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render chat messages. ChatML (SmolLM2, Qwen) and Llama 3 formats are built in."""
        for m in messages:
            if set(m) - {"role", "content"} or "role" not in m or "content" not in m:
                raise ValueError(f"each message needs exactly 'role' and 'content', got {sorted(m)}")
        tpl = self.chat_template or ""
        if "<|start_header_id|>" in tpl:
            out = "<|begin_of_text|>" + "".join(
                f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>"
                for m in messages
            )
            return out + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else "")
        out = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return out + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    @classmethod
    def from_file(cls, path: str, **kw: Any) -> Tokenizer:
        """A HF tokenizer.json."""
        return cls(HFTokenizer.from_file(str(path)), **kw)

    @classmethod
    def from_gguf_fields(cls, meta: dict[str, Any]) -> Tokenizer:
        """Rebuild from GGUF metadata (a dict of tokenizer.* fields)."""
        model = meta.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(
                f"GGUF tokenizer model {model!r} is not supported (byte-level BPE 'gpt2' is); "
                "pass a tokenizer.json instead"
            )
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        types: list[int] = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        vocab = {t: i for i, t in enumerate(tokens)}
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if meta.get("tokenizer.ggml.pre") in ("smollm", "starcoder", "refact"):
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), byte_level]
            )
        else:
            tok.pre_tokenizer = byte_level
        tok.decoder = decoders.ByteLevel()
        special = [tokens[i] for i, t in enumerate(types) if t in (_CONTROL, _USER_DEFINED)]
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
        eos = meta.get("tokenizer.ggml.eos_token_id")
        eos_ids = {eos} if eos is not None else set()
        for name in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
            if name in vocab:
                eos_ids.add(vocab[name])
        return cls(
            tok,
            bos_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_ids=tuple(sorted(eos_ids)),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            chat_template=meta.get("tokenizer.chat_template"),
        )

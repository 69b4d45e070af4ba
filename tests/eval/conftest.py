"""Fixtures of the eval tests: the `tiny` random-weight preset with a byte-level tokenizer and a
ChatML template, so the evaluation paths run end to end in a second (its answers are noise)."""

from __future__ import annotations

import dataclasses

import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

import kvloft
from kvloft.runtime.tokenizer import Tokenizer

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def byte_tokenizer() -> Tokenizer:
    """One token per byte (ids 0..255) plus <|im_start|> (256) and <|im_end|> (257, end of turn)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")])
    return Tokenizer(tok, eos_ids=(257,), chat_template=CHATML)


@pytest.fixture(scope="session")
def tiny_text():
    """The tiny preset (vocab 512, 2 layers) with a byte tokenizer attached."""
    model = kvloft.load_model("tiny", device="cpu")
    return dataclasses.replace(model, tokenizer=byte_tokenizer())

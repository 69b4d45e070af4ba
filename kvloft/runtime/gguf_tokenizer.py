"""A `tokenizers` Tokenizer rebuilt from a GGUF file's tokenizer metadata.

A GGUF carries no tokenizer.json: only the vocabulary, merges or scores, token types and the
name of llama.cpp's pre-tokenizer (`tokenizer.ggml.pre`). We rebuild the tokenizer from the
`tokenizers` library's own components, as transformers' GGUF conversion does
(`transformers/integrations/gguf/gguf_tokenizer_mapping.py`):

- `tokenizer.ggml.model == "gpt2"`: byte-level BPE. The text is split the way the vocabulary's
  merges were learned: GPT-2's regex (`default`, `gpt2`), digits one by one before it (`smollm`
  and the StarCoder family), or the family's own split pattern (`llama-bpe`, `qwen2`, `gpt-4o`,
  `tekken` ...) followed by byte-level mapping without a regex.
- `tokenizer.ggml.model == "llama"`: SentencePiece BPE (Llama 2, Mistral): Metaspace, byte
  fallback, merges from the file or derived from the token scores.

A pre-tokenizer type this table does not know is refused, as llama.cpp refuses it: guessing
would split numbers or whitespace unlike the model's training and degrade every answer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

# llama.cpp token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

TOKENIZER_FIX = 'load_model(..., tokenizer="path/to/tokenizer.json or HF dir")'

# The split patterns of the byte-level BPE families (the regexes their tokenizer.json files carry).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# llama.cpp pre-tokenizer name -> how to split. "gpt2": GPT-2's regex; "digits": every digit
# alone, then GPT-2's regex; a pattern: that regex, then byte-level mapping without a regex.
PRE_TOKENIZERS: dict[str, str] = {
    **dict.fromkeys(("default", "gpt2", "gpt-2", "olmo", "jais", "poro-chat", "viking"), "gpt2"),
    **dict.fromkeys(("smollm", "starcoder", "refact", "codeshell", "exaone", "minerva-7b"), "digits"),
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "dbrx", "smaug-bpe", "lfm2"),
        LLAMA3_SPLIT,
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), QWEN2_SPLIT),
    **dict.fromkeys(("gpt-4o", "llama4", "minimax-m2"), GPT4O_SPLIT),
    "tekken": TEKKEN_SPLIT,
}


def read_gguf_tokenizer_fields(path: str | Path) -> dict[str, Any]:
    """The `tokenizer.*` metadata of a GGUF file: only the header is read, not the weights."""
    from kvloft.runtime.gguf_header import read_header

    try:
        fields, _ = read_header(Path(path))
    except ValueError as e:
        raise ValueError(f"{path} is not a readable GGUF file: {e}") from None
    return {k: v for k, v in fields.items() if k.startswith("tokenizer.")}


def build_gguf_tokenizer(meta: dict[str, Any]) -> HFTokenizer:
    """A `tokenizers` Tokenizer from GGUF `tokenizer.*` fields (see the module docstring)."""
    model = meta.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" not in meta:
        raise ValueError(f"GGUF metadata has no tokenizer.ggml.tokens; pass {TOKENIZER_FIX}")
    if model == "gpt2":
        return _byte_level_bpe(meta)
    if model == "llama":
        return _sentencepiece_bpe(meta)
    raise ValueError(
        f"GGUF tokenizer model {model!r} is not supported (byte-level BPE 'gpt2' and SentencePiece "
        f"'llama' are); pass {TOKENIZER_FIX}"
    )


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet byte-level BPE vocabularies use)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    printable = [b for b in range(256) if chr(b) in alphabet and chr(b) != " "]
    out = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _byte_level_bpe(meta: dict[str, Any]) -> HFTokenizer:
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # a token stored as raw text (outside the byte alphabet) is respelled byte by byte
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(tokens)
    }
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()
    # control tokens outside the byte alphabet are llama.cpp mislabels: adding them would grow the vocab
    _add_specials(tok, tokens, types, keep=lambda t: set(t) <= alphabet, vocab=vocab)
    return tok


def _byte_level_pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    split = PRE_TOKENIZERS.get(pre or "default")
    if split is None:
        raise ValueError(
            f"GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not known; known: {sorted(PRE_TOKENIZERS)}. "
            f"Splitting its text another way would change the token ids, so pass {TOKENIZER_FIX}"
        )
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if split == "gpt2":
        return gpt2
    if split == "digits":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _sentencepiece_bpe(meta: dict[str, Any]) -> HFTokenizer:
    """Llama 2 / Mistral style: '▁' for spaces, one prepended at the start, bytes as <0xNN>."""
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    if meta.get("tokenizer.ggml.merges"):
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    else:
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise ValueError(f"SentencePiece GGUF has neither merges nor one score per token; pass {TOKENIZER_FIX}")
        merges = merges_from_scores(tokens, scores)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None else ("<unk>" if "<unk>" in vocab else None)
    tok = HFTokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))
    _add_specials(tok, tokens, types, keep=lambda t: True, vocab=vocab)
    return tok


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two tokens,
    best score first (ties: the longer left part, then the longer right part, first), the order
    SentencePiece applies them in and the one transformers' `generate_merges` produces."""
    vocab = {t: i for i, t in enumerate(tokens)}
    found: list[tuple[float, int, int, str, str]] = []
    for piece, score in zip(tokens, scores):
        pairs = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        found.extend((float(score), len(left), len(right), left, right) for left, right in pairs)
    found.sort(key=lambda m: (m[0], m[1], m[2]), reverse=True)
    return [(left, right) for _, _, _, left, right in found]


def _add_specials(tok: HFTokenizer, tokens: list[str], types: list[int], *, keep, vocab: dict[str, int]) -> None:
    """Control tokens become special tokens (matched whole, skipped on decode); user-defined ones
    (like `<think>`) added tokens (matched whole, kept on decode), as llama.cpp treats them."""
    control = [t for t, ty in zip(tokens, types) if ty == CONTROL and keep(t)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    user = [t for t, ty in zip(tokens, types) if ty == USER_DEFINED and t in vocab]
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

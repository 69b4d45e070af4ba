"""Shared by the tokenizer and chat template tests: a fixed text, Llama 3's chat template, and a
small byte-level BPE tokenizer trained here with a family's split pattern (no download)."""

import json

# numbers, code, whitespace runs (spaces, tabs, newlines, CRLF), accents (precomposed and
# combining), CJK, emoji (with a skin-tone modifier), contractions, special-token text
TEXT = (
    "In 2024 we sold 123456 units at $3.50 each (1,000,000.25 total), ids 7 42 999 1000.\n"
    "def f(x):\n\treturn x**2  #   squared\n\n\n"
    "    indented    spaces\t\ttabs\r\n"
    "Café naïve résumé Ünïcödé — e\u0301 東京都 日本語のテキスト 你好，世界 😀🎉👍🏽\n"
    "it's they'll WE'RE 3.14159 0x1F 1e-9 a_b-c/d\\e {\"k\": [1, 2]}   \n  end"
)

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def _corpus() -> list[str]:
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while", "numbers", "like", "2024", "and", "123456", "pass", "by"]
    lines = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    return lines * 20 + [TEXT, "def f(x):\n    return x\n\tprint(x)\n", "Café résumé 東京 😀 12 345 6789"]


def train_byte_level_bpe(split_pattern: str, vocab_size: int = 600):
    """A byte-level BPE tokenizer trained on a small corpus with `split_pattern` as its pre-tokenizer
    (as Llama 3's and Qwen2's tokenizer.json are built). -> tokenizers.Tokenizer"""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split_pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=LLAMA3_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def gguf_fields_of(tok, pre: str) -> dict:
    """The GGUF `tokenizer.*` fields llama.cpp's converter writes for a byte-level BPE tokenizer."""
    state = json.loads(tok.to_str())
    vocab = state["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {a["content"] for a in state["added_tokens"] if a["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if t in specials else 1 for t in tokens],
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": vocab["<|begin_of_text|>"],
        "tokenizer.ggml.eos_token_id": vocab["<|eot_id|>"],
    }


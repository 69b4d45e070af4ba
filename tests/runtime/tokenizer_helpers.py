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



def write_sentencepiece_gguf(path) -> list[str]:
    """A Llama-2-style GGUF (tokenizer.ggml.model "llama": '▁' for spaces, <0xNN> byte tokens,
    scores and no merges) with a SentencePiece BPE vocabulary trained here, and the few model keys
    a reader expects. -> the token list"""
    import gguf
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok = HFTokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens], show_progress=False
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    vocab = json.loads(tok.to_str())["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    kinds = {"<unk>": 2, "<s>": 3, "</s>": 3, **dict.fromkeys(byte_tokens, 6)}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(len(tokens))])  # SentencePiece: earlier pieces score higher
    w.add_token_types([kinds.get(t, 1) for t in tokens])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template("{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(8)
    w.add_feed_forward_length(8)
    w.add_head_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tokens

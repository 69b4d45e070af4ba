"""Token ids equal the reference tokenizer's, on a text with numbers, code, whitespace runs and
non-ASCII: transformers' tokenizer rebuilt from the same GGUF, or the `tokenizers` Tokenizer of the
same tokenizer.json."""

import json

import gguf
import pytest
from tokenizer_helpers import LLAMA3_SPECIALS, TEXT, gguf_fields_of, train_byte_level_bpe
from tokenizers import Tokenizer as HFTokenizer

from kvloft.runtime.gguf_tokenizer import LLAMA3_SPLIT, QWEN2_SPLIT, read_gguf_tokenizer_fields
from kvloft.runtime.tokenizer import Tokenizer

CHAT_TEXT = "<|im_start|>user\nHi 2024<|im_end|>\n<|im_start|>assistant\n"


def _check_against(ours: Tokenizer, ref, text: str) -> None:
    want = ref.encode(text, add_special_tokens=False)
    assert ours.encode(text, add_bos=False) == want
    assert ours.decode(want, skip_special=False) == ref.decode(want, skip_special_tokens=False)


def test_smollm2_gguf_ids_match_transformers(smollm2_gguf, smollm2_reference):
    ours = Tokenizer.from_path(smollm2_gguf)
    _check_against(ours, smollm2_reference, TEXT)
    _check_against(ours, smollm2_reference, CHAT_TEXT)
    assert ours.decode(ours.encode(TEXT)) == TEXT
    assert ours.eos_ids and smollm2_reference.eos_token_id in ours.eos_ids
    # SmolLM2 was trained on digits one by one
    assert ours.encode("123456") == [ours.token_id(c) for c in "123456"]


@pytest.mark.qwen
def test_qwen_gguf_ids_match_transformers(qwen_gguf, qwen_reference):
    ours = Tokenizer.from_path(qwen_gguf)
    _check_against(ours, qwen_reference, TEXT)
    _check_against(ours, qwen_reference, CHAT_TEXT)
    assert ours.decode(ours.encode(TEXT)) == TEXT
    assert qwen_reference.eos_token_id in ours.eos_ids
    assert not ours.add_bos  # Qwen2 adds no bos
    # qwen2's split pattern: one digit per piece ("2024" is four tokens, not "Ġ2024")
    assert ours.encode(" 2024") == [ours.token_id("Ġ"), *[ours.token_id(c) for c in "2024"]]


@pytest.mark.parametrize(("pre", "pattern"), [("llama-bpe", LLAMA3_SPLIT), ("qwen2", QWEN2_SPLIT)])
def test_gguf_split_pattern_matches_tokenizer_json(pre, pattern):
    """A tokenizer trained with the family's split pattern, written out as GGUF fields: the
    rebuild gives the tokenizer.json's ids; read as GPT-2 (the old rebuild) it would not."""
    ref = train_byte_level_bpe(pattern)
    want = ref.encode(TEXT, add_special_tokens=False).ids
    got = Tokenizer.from_gguf_fields(gguf_fields_of(ref, pre)).encode(TEXT, add_bos=False)
    assert got == want
    as_gpt2 = Tokenizer.from_gguf_fields(gguf_fields_of(ref, "gpt2")).encode(TEXT, add_bos=False)
    assert as_gpt2 != want  # the fixture tells the patterns apart


def test_llama3_split_keeps_numbers_in_threes():
    ref = train_byte_level_bpe(LLAMA3_SPLIT)
    tok = Tokenizer.from_gguf_fields(gguf_fields_of(ref, "llama-bpe"))
    pieces = [tok.decode([i]) for i in tok.encode("sold 123456 units")]
    assert "".join(pieces) == "sold 123456 units"
    # the split never joins a space to a number, and never makes a number piece longer than 3
    numbers = [p for p in pieces if p.strip().isdigit()]
    assert numbers and all(p.isdigit() and len(p) <= 3 for p in numbers)


def test_hf_dir_reads_tokenizer_config(llama3_dir):
    tok = Tokenizer.from_path(llama3_dir)
    ref = HFTokenizer.from_file(str(llama3_dir / "tokenizer.json"))
    assert tok.encode(TEXT, add_bos=False) == ref.encode(TEXT, add_special_tokens=False).ids
    # add_bos_token is absent: the post-processor's <|begin_of_text|> decides, as in transformers
    assert tok.add_bos and tok.encode(TEXT) == ref.encode(TEXT, add_special_tokens=True).ids
    assert tok.bos_id == ref.token_to_id("<|begin_of_text|>")
    assert ref.token_to_id("<|eot_id|>") in tok.eos_ids
    assert tok.chat_template_source == "model"
    assert Tokenizer.from_path(llama3_dir / "tokenizer.json").chat_template == tok.chat_template


def test_hf_dir_add_bos_token_false_wins(llama3_dir, tmp_path):
    for name in ("tokenizer.json",):
        (tmp_path / name).write_bytes((llama3_dir / name).read_bytes())
    config = json.loads((llama3_dir / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    (tmp_path / "chat_template.jinja").write_text("{{ 'from the jinja file' }}")
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert not tok.add_bos and tok.encode("hi")[0] != tok.bos_id
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "from the jinja file"


def test_hf_dir_matches_transformers(llama3_dir):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(llama3_dir))
    tok = Tokenizer.from_hf_dir(llama3_dir)
    assert tok.encode(TEXT) == ref.encode(TEXT)  # bos included both sides
    assert tok.special_tokens["bos_token"] == ref.bos_token and tok.special_tokens["eos_token"] == ref.eos_token


def test_unknown_pre_tokenizer_is_refused_naming_the_fix():
    fields = gguf_fields_of(train_byte_level_bpe(LLAMA3_SPLIT), "made-up-pre")
    with pytest.raises(ValueError, match=r"made-up-pre.*tokenizer=\"path/to/tokenizer.json or HF dir\""):
        Tokenizer.from_gguf_fields(fields)


def test_unknown_tokenizer_model_is_refused():
    with pytest.raises(ValueError, match="'bert'.*tokenizer="):
        Tokenizer.from_gguf_fields({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})


def test_from_path_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Tokenizer.from_path(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match="no tokenizer.json"):
        Tokenizer.from_path(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match="not a tokenizer"):
        Tokenizer.from_path(tmp_path / "weights.bin")


def test_user_defined_tokens_are_matched_whole_and_kept_on_decode():
    ref = train_byte_level_bpe(LLAMA3_SPLIT)
    fields = gguf_fields_of(ref, "llama-bpe")
    fields["tokenizer.ggml.tokens"] = [*fields["tokenizer.ggml.tokens"], "<think>"]
    fields["tokenizer.ggml.token_type"] = [*fields["tokenizer.ggml.token_type"], 4]
    tok = Tokenizer.from_gguf_fields(fields)
    think = len(fields["tokenizer.ggml.tokens"]) - 1
    ids = tok.encode("a<think>b")
    assert think in ids
    assert tok.decode(ids) == "a<think>b"  # user-defined, not special: kept
    assert LLAMA3_SPECIALS[0] not in tok.decode(tok.encode(LLAMA3_SPECIALS[0] + "x"))  # control: skipped


def test_sentencepiece_gguf_ids_match_transformers(sentencepiece_gguf):
    """Llama 2 / Mistral style: merges derived from the scores, '▁' prepended, bytes as <0xNN>."""
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(sentencepiece_gguf.parent), gguf_file=sentencepiece_gguf.name)
    ours = Tokenizer.from_path(sentencepiece_gguf)
    assert ours.add_bos and ours.bos_id == ref.bos_token_id == 1
    for text in (TEXT, " leading space", "two  spaces\n"):
        want = ref.encode(text)  # bos included both sides
        assert ours.encode(text) == want
        assert ours.decode(want) == ref.decode(want, skip_special_tokens=True)
    dragon = [ours.token_id(f"<0x{b:02X}>") for b in "龍".encode()]  # not in the corpus: byte fallback
    assert ours.encode("a龍", add_bos=False)[-3:] == dragon and ours.decode(ours.encode("a龍")) == "a龍"
    assert ours.apply_chat_template([{"role": "user", "content": "hi"}]) == "<s>[INST] hi [/INST]"


def test_header_reader_matches_gguf_library(sentencepiece_gguf, tmp_path):
    reader = gguf.GGUFReader(str(sentencepiece_gguf))
    want = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    assert read_gguf_tokenizer_fields(sentencepiece_gguf) == want
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(sentencepiece_gguf.read_bytes()[:2000])  # the token list runs past the end
    with pytest.raises(ValueError, match="file ends at byte 2000"):
        read_gguf_tokenizer_fields(cut)
    (tmp_path / "not.gguf").write_bytes(b"GGML" + bytes(40))
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        read_gguf_tokenizer_fields(tmp_path / "not.gguf")

"""Synthetic long-context tasks: length fitting, needle placement, determinism, scoring.

Most tests use a word-level stand-in tokenizer; the SmolLM2 tokenizer tests run whenever
kvloft.runtime.loader is present.
"""

from __future__ import annotations

import importlib.util
import itertools
import random
import re
from collections import Counter

import pytest

from kvloft.eval import haystack
from kvloft.eval.fitting import fit_units
from kvloft.eval.scoring import METRICS, TASK_METRIC, postprocess, score, score_all, score_part
from kvloft.eval.tasks import (
    LENGTH_TOLERANCE,
    TASKS,
    build_prompt,
    chat_frame,
    generate,
    run_task_samples,
    sample_seed,
    user_message,
)

NEEDLE_TASKS = [name for name, spec in TASKS.items() if spec.uses_depth]


class WordTokenizer:
    """Words and single punctuation marks are tokens; ids index a growing vocabulary."""

    _pattern = re.compile(r"\w+|[^\w\s]")

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.words: list[str] = []

    def encode(self, text: str) -> list[int]:
        out = []
        for piece in self._pattern.findall(text):
            if piece not in self.ids:
                self.ids[piece] = len(self.words)
                self.words.append(piece)
            out.append(self.ids[piece])
        return out

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.words[i] for i in ids)


class ChatWordTokenizer(WordTokenizer):
    """WordTokenizer with a ChatML template and a system turn, as Qwen2.5's template renders one."""

    def apply_chat_template(self, messages, add_generation_prompt=True):
        turns = [{"role": "system", "content": "You are a helpful assistant."}, *messages]
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in turns)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


@pytest.fixture(scope="module")
def tok() -> WordTokenizer:
    return WordTokenizer()


@pytest.fixture(scope="module")
def chat_tok() -> ChatWordTokenizer:
    return ChatWordTokenizer()


def _token_fraction(tok, context: str, needle: str) -> float:
    """Where `needle` starts in `context`, as a fraction of the context's tokens."""
    at = context.index(needle)
    return len(tok.encode(context[:at])) / len(tok.encode(context))


# ----------------------------------------------------------------------------- length


@pytest.mark.parametrize("length", [512, 2048])
@pytest.mark.parametrize("task", list(TASKS))
def test_prompt_fills_requested_length(tok, task, length):
    s = generate(task, tok, length, seed=length)
    n = len(tok.encode(build_prompt(s)))
    assert n == s.actual_tokens
    assert length - LENGTH_TOLERANCE <= n <= length
    assert s.target_tokens == length and s.task == task


@pytest.mark.parametrize("task", list(TASKS))
def test_chat_prompt_is_the_template_rendering(chat_tok, task):
    """chat=True: the fitted prompt is apply_chat_template(one user message) + answer prefix,
    and its tokens (template included) fill the length; the draws are those of the plain prompt."""
    length = 1024
    s = generate(task, chat_tok, length, seed=31, chat=True)
    message = user_message(s.context, s.question)
    rendered = chat_tok.apply_chat_template([{"role": "user", "content": message}]) + s.answer_prefix
    assert build_prompt(s) == rendered
    assert rendered.endswith("<|im_start|>assistant\n" + s.answer_prefix)
    assert len(chat_tok.encode(rendered)) == s.actual_tokens
    assert length - LENGTH_TOLERANCE <= s.actual_tokens <= length
    plain = generate(task, chat_tok, length, seed=31)
    assert plain.references == s.references and plain.needles == s.needles and plain.chat is None
    assert len(s.context) < len(plain.context)  # the template's tokens come out of the haystack


def test_chat_needs_a_template(tok, chat_tok):
    with pytest.raises(TypeError, match="apply_chat_template"):
        generate("passkey", tok, 512, seed=0, chat=True)

    class Rewriting(ChatWordTokenizer):  # a template that rewrites content cannot be fitted
        def apply_chat_template(self, messages, add_generation_prompt=True):
            return super().apply_chat_template([{**m, "content": m["content"].replace("pass", "PASS")} for m in messages])

    with pytest.raises(ValueError, match="chat=False"):
        generate("passkey", Rewriting(), 512, seed=0, chat=True)
    before, after = chat_frame(chat_tok)
    assert before.endswith("<|im_start|>user\n") and after == "<|im_end|>\n<|im_start|>assistant\n"
    samples = run_task_samples("vt", chat_tok, [512], n=2, seed=0, chat=True)
    assert all(x.chat == (before, after) for x in samples)


def test_fit_units_matches_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        steps = [rng.randint(0, 20) for _ in range(rng.randint(1, 300))]
        base = rng.randint(0, 50)
        counts = [base]
        for s in steps:
            counts.append(counts[-1] + s)
        length = rng.randint(base, counts[-1] + 30)
        n, got = fit_units(counts.__getitem__, length, max_units=len(steps))
        expect = max(i for i, c in enumerate(counts) if c <= length)
        assert (n, got) == (expect, counts[expect])


def test_too_short_length_names_the_minimum(tok):
    with pytest.raises(ValueError, match="ask for at least"):
        generate("niah_multiquery", tok, 40, seed=0)


# ----------------------------------------------------------------------------- needles


@pytest.mark.parametrize("task", ["niah_single_number", "niah_single_word", "niah_single_uuid"])
def test_single_needle_once(tok, task):
    s = generate(task, tok, 2048, seed=1)
    (ref,) = s.references
    (needle,) = s.needles
    assert s.context.count(needle) == 1
    assert s.context.count(ref) == 1 and ref in needle
    assert ref not in s.question and ref not in s.answer_prefix


def test_passkey_needle_once(tok):
    s = generate("passkey", tok, 2048, seed=2)
    (key,) = s.references
    assert re.fullmatch(r"\d{5}", key)
    assert s.context.count(f"The pass key is {key}. Remember it. {key} is the pass key.") == 1
    assert s.context.count(key) == 2  # both mentions are inside the one needle
    assert build_prompt(s).endswith("What is the pass key? The pass key is")


def _key_of(needle: str) -> str:
    return re.search(r"for (\S+) is:", needle).group(1)


def test_multikey_distractors_have_other_keys(tok):
    s = generate("niah_multikey", tok, 2048, seed=3)
    assert len(s.needles) == 4 and len(s.references) == 1
    keys = [_key_of(n) for n in s.needles]
    assert len(set(keys)) == 4
    asked = keys[0]
    assert asked in s.question and all(k not in s.question for k in keys[1:])
    for needle, key in zip(s.needles, keys):
        assert s.context.count(needle) == 1 and s.context.count(key) == 1
    assert s.context.count("One of the special magic numbers for") == 4
    assert s.references[0] in s.needles[0]


def test_multivalue_one_key_all_values(tok):
    s = generate("niah_multivalue", tok, 2048, seed=4)
    assert len(s.references) == 4 and len(set(s.references)) == 4
    key = _key_of(s.needles[0])
    assert s.context.count(key) == 4 and key in s.question
    assert all(s.context.count(v) == 1 for v in s.references)


def test_multiquery_asks_every_key(tok):
    s = generate("niah_multiquery", tok, 2048, seed=5)
    keys = [_key_of(n) for n in s.needles]
    assert len(set(keys)) == 4 and len(s.references) == 4
    assert all(k in s.question for k in keys)
    assert all(s.context.count(v) == 1 for v in s.references)


def test_vt_chain_in_order(tok):
    s = generate("vt", tok, 2048, seed=6, num_chains=2)
    names = s.references
    assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", v) for v in names)
    value = re.search(r"value (\d{5})", s.question).group(1)
    first = f"VAR {names[0]} = {value}."
    hops = [f"VAR {b} = VAR {a}." for a, b in itertools.pairwise(names)]
    at = [s.context.index(line) for line in [first, *hops]]
    assert at == sorted(at)
    assert all(s.context.count(line) == 1 for line in [first, *hops])
    assert s.context.count(value) == 1
    assert s.context.count("VAR ") == 2 * 5 + 2 * 4  # two chains, hops name two variables


def test_cwe_common_words_are_the_most_frequent(tok):
    s = generate("cwe", tok, 2048, seed=7)
    items = re.findall(r"(\d+)\. (\w+)", s.context)
    assert [int(i) for i, _ in items] == list(range(1, len(items) + 1))
    counts = Counter(w for _, w in items)
    assert len(s.references) == 10
    top = {c for _, c in counts.most_common(10)}
    assert len(top) == 1  # the ten common words share one frequency
    freq_cw = top.pop()
    assert {w for w, c in counts.items() if c == freq_cw} == set(s.references)
    assert max(c for w, c in counts.items() if w not in s.references) < freq_cw


def test_fwe_answers_are_ranks_two_to_four(tok):
    s = generate("fwe", tok, 2048, seed=8)
    words = s.context.split(". ", 2)[-1].split()
    counts = Counter(w for w in words if w != "....")
    ranked = counts.most_common()
    assert {w for w, _ in ranked[:3]} == set(s.references)
    assert ranked[2][1] > ranked[3][1]
    assert Counter(words)["...."] > ranked[0][1]


@pytest.mark.parametrize("task", ["passkey", "niah_single_word", "niah_multikey", "vt"])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 0.8, 1.0])
def test_depth_places_needle(tok, task, depth):
    s = generate(task, tok, 2048, seed=9, depth=depth)
    assert s.depth == depth
    # the instruction before the haystack is ~1.5% of the context; units are <= 20 tokens
    assert abs(_token_fraction(tok, s.context, s.needles[0]) - depth) < 0.04


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("task", list(TASKS))
def test_deterministic_by_seed(tok, task):
    a, b, c = (generate(task, tok, 512, seed=s) for s in (11, 11, 12))
    assert build_prompt(a) == build_prompt(b) and a.references == b.references
    assert build_prompt(a) != build_prompt(c)


def test_run_task_samples_spreads_depths(tok):
    samples = run_task_samples("niah_single_number", tok, [512, 1024], n=3, seed=0)
    assert [s.target_tokens for s in samples] == [512] * 3 + [1024] * 3
    assert [s.depth for s in samples[:3]] == pytest.approx([1 / 6, 1 / 2, 5 / 6])
    assert [s.seed for s in samples[3:]] == [sample_seed(0, 1024, i) for i in range(3)]
    assert len({s.seed for s in samples}) == 6
    cwe = run_task_samples("cwe", tok, [512], n=2, seed=0)
    assert [s.depth for s in cwe] == [None, None]


def test_options_recorded_and_bad_arguments_name_the_fix(tok):
    s = generate("niah_single_word", tok, 512, seed=3, depth=0.25, haystack="repeat")
    assert s.options == {"haystack": "repeat"} and "The grass is green." in s.context
    again = generate(s.task, tok, s.target_tokens, s.seed, s.depth, **s.options)
    assert build_prompt(again) == build_prompt(s)
    with pytest.raises(ValueError, match="known:"):
        generate("niah", tok, 512, seed=0)
    with pytest.raises(ValueError, match="its options"):
        generate("passkey", tok, 512, seed=0, value_type="uuid")
    with pytest.raises(ValueError, match="depth"):
        generate("cwe", tok, 512, seed=0, depth=0.5)
    with pytest.raises(ValueError, match="haystack must be one of"):
        generate("niah_single_word", tok, 512, seed=0, haystack="poems")


def test_essay_haystack_has_no_needle_like_text():
    units = haystack.SentenceStream("essay", seed=0).take(2000)
    text = "".join(units)
    assert not re.search(r"[\d\-]|[A-Z]{2}", text)
    assert haystack.SentenceStream("essay", seed=0).take(50) == units[:50]


def test_word_pools_are_substring_free():
    pool = haystack.word_pool()
    extra = haystack.pseudo_words(random.Random(0), 500)
    words = list(pool) + extra
    assert len(set(words)) == len(words) and len(pool) >= 300
    joined = "\n".join(words)
    assert all(joined.count(w) == 1 for w in words)


# ----------------------------------------------------------------------------- scoring


def test_score_all_and_part():
    refs = ["71432", "Quiet-Harbor", "c0ffee"]
    assert score_all("71432, quiet-harbor and C0FFEE.", refs) == 1.0
    assert score_all("The pass key is 71432 and QUIET-HARBOR", refs) == pytest.approx(2 / 3)
    assert score_all("no idea", refs) == 0.0
    assert score_part("... quiet-HARBOR ...", refs) == 1.0
    assert score_part("7143 2", refs) == 0.0
    assert postprocess("  71432\x00\x1fend ") == "71432\n\nend"
    with pytest.raises(ValueError, match="non-empty list"):
        score_all("71432", "71432")


def test_score_uses_task_table():
    assert set(TASK_METRIC) == set(TASKS)
    assert set(TASK_METRIC.values()) <= set(METRICS)
    assert score("niah_multivalue", "1 and 2", ["1", "2", "3", "4"]) == 0.5
    with pytest.raises(ValueError, match="unknown task"):
        score("qa", "x", ["x"])


def test_references_score_one_in_their_own_needles(tok):
    for task in TASKS:
        s = generate(task, tok, 512, seed=13)
        answer = " ".join(s.references)
        assert score(task, answer, s.references) == 1.0
        assert score(task, s.question, s.references) == 0.0, task


# ----------------------------------------------------------------------------- SmolLM2 tokenizer


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("kvloft.runtime.loader") is None:
        pytest.skip("kvloft.runtime.loader is not part of this checkout")
    from kvloft.runtime.loader import load_tokenizer

    return load_tokenizer("smollm2")


@pytest.mark.parametrize("task", list(TASKS))
def test_smollm2_lengths(smollm2, task):
    s = generate(task, smollm2, 2048, seed=21)
    n = len(smollm2.encode(build_prompt(s)))
    assert n == s.actual_tokens and 2048 - LENGTH_TOLERANCE <= n <= 2048


@pytest.mark.parametrize("task", ["passkey", "niah_multikey", "cwe"])
def test_smollm2_chat_lengths(smollm2, task):
    """The model's own template (from the GGUF) renders the prompt; special tokens count as one."""
    s = generate(task, smollm2, 2048, seed=23, chat=True)
    prompt = build_prompt(s)
    assert prompt.startswith("<|im_start|>") and "<|im_start|>assistant\n" in prompt
    n = len(smollm2.encode(prompt))
    assert n == s.actual_tokens and 2048 - LENGTH_TOLERANCE <= n <= 2048


@pytest.mark.parametrize("depth", [0.1, 0.6])
def test_smollm2_depth_and_needle(smollm2, depth):
    s = generate("niah_single_uuid", smollm2, 4096, seed=22, depth=depth)
    assert s.context.count(s.references[0]) == 1
    assert abs(_token_fraction(smollm2, s.context, s.needles[0]) - depth) < 0.04

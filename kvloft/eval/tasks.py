"""RULER-style synthetic long-context tasks, generated offline and fitted to a token length.

    sample = generate("niah_multikey", tokenizer, length=8192, seed=0, depth=0.5)
    output = model_answer(build_prompt(sample))              # greedy continuation
    score("niah_multikey", output, sample.references)        # kvloft.eval.scoring

A task draws its needles, keys and values from `random.Random(seed)` once, then renders
its context for n haystack units; the largest n whose prompt (context, question and
answer prefix, exactly as `build_prompt` joins them) fits in `length` tokens of the
given tokenizer is found by a galloping + binary search, and the result must land in
[length - LENGTH_TOLERANCE, length]. The prompt ends with the answer prefix ("... The pass
key is") so the model answers directly. With `chat=True` it is rendered as RULER renders
it for chat models: the context and question are one user message in the model's own
chat template (the tokenizer's `apply_chat_template`, generation prompt on), and the
answer prefix follows the assistant's turn marker; the fitting counts every template token.

Tasks (defaults follow RULER, Hsieh et al. 2024, and the passkey test of InfLLM):

  passkey              5-digit pass key in the repeated noise sentences
  niah_single_number   one 7-digit number for one key, repeated noise    (RULER niah_single_1)
  niah_single_word     one "adjective-noun" word for one key, essay
  niah_single_uuid     one UUID for one key, essay                       (RULER niah_single_3)
  niah_multikey        4 keys, one asked; the other 3 are distractors    (RULER niah_multikey_1)
  niah_multivalue      one key with 4 values, all asked                  (RULER niah_multivalue)
  niah_multiquery      4 keys, all 4 asked                               (RULER niah_multiquery)
  vt                   1 chain of 4 hops "VAR X = VAR Y" from a 5-digit value, repeated noise
  cwe                  10 common words among uncommon ones in a numbered list
  fwe                  3 most frequent coded words of a Zipf (alpha 2) sample

Depth (needle tasks and vt) is a fraction of the haystack in [0, 1]: the asked needle
(the first value of the first asked key; vt: the chain's first assignment) sits before
haystack unit round(depth * n); other needles go to random depths, vt's later hops to
random depths after the first. `depth=None` draws one from the seed.

Here: the tasks and `generate`. The sample and its prompt text are in eval/prompt.py, the
fitting to a token length in eval/fitting.py (both re-exported here).
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kvloft.eval.fitting import LENGTH_TOLERANCE, Draft, fit
from kvloft.eval.haystack import (
    HAYSTACKS,
    SentenceStream,
    coded_words,
    key_words,
    numbers,
    pseudo_words,
    uuids,
    weave,
    word_pool,
)
from kvloft.eval.prompt import (
    ChatTokenizerLike,
    Sample,
    TokenizerLike,
    build_prompt,
    chat_frame,
    join_prompt,
    user_message,
)

__all__ = [
    "LENGTH_TOLERANCE",
    "TASKS",
    "ChatTokenizerLike",
    "CweParams",
    "FweParams",
    "NiahParams",
    "PasskeyParams",
    "Sample",
    "TaskSpec",
    "TokenizerLike",
    "VtParams",
    "build_prompt",
    "chat_frame",
    "generate",
    "run_task_samples",
    "user_message",
]

def _check_haystack(haystack: str) -> None:
    if haystack not in HAYSTACKS:
        raise ValueError(f"haystack must be one of {', '.join(HAYSTACKS)}; got {haystack!r}")


@dataclass(frozen=True)
class PasskeyParams:
    haystack: str = "repeat"
    digits: int = 5

    def __post_init__(self) -> None:
        _check_haystack(self.haystack)
        if not 1 <= self.digits <= 18:
            raise ValueError(f"digits must be in 1..18, got {self.digits}")


VALUE_TYPES = {"number": "numbers", "word": "words", "uuid": "uuids"}  # type -> its name in the text


@dataclass(frozen=True)
class NiahParams:
    haystack: str = "essay"
    value_type: str = "number"  # number (7 digits), word ("adjective-noun"), uuid
    num_keys: int = 1  # needles' distinct keys; keys not asked are distractors
    num_values: int = 1  # values per key
    num_queries: int = 1  # keys asked for (the first num_queries keys)
    digits: int = 7

    def __post_init__(self) -> None:
        _check_haystack(self.haystack)
        if self.value_type not in VALUE_TYPES:
            raise ValueError(f"value_type must be one of {', '.join(VALUE_TYPES)}; got {self.value_type!r}")
        if not 1 <= self.num_queries <= self.num_keys or self.num_values < 1:
            raise ValueError(
                f"need 1 <= num_queries <= num_keys and num_values >= 1; got num_keys={self.num_keys}, "
                f"num_values={self.num_values}, num_queries={self.num_queries}"
            )


@dataclass(frozen=True)
class VtParams:
    haystack: str = "repeat"
    num_chains: int = 1  # chains from distinct values; the first is asked
    num_hops: int = 4  # "VAR B = VAR A" statements after "VAR A = value"

    def __post_init__(self) -> None:
        _check_haystack(self.haystack)
        if self.num_chains < 1 or self.num_hops < 0:
            raise ValueError(
                f"need num_chains >= 1 and num_hops >= 0; got {self.num_chains}, {self.num_hops}"
            )


@dataclass(frozen=True)
class CweParams:
    """RULER's frequencies (30 vs 3) from `full_length` tokens on; shorter prompts cannot hold
    10 x 30 list items, so below it the common words repeat 30 * length / full_length
    times (at least 4) and the uncommon ones once."""

    num_cw: int = 10
    freq_cw: int | None = None  # None: by length, as above
    freq_ucw: int | None = None
    full_length: int = 4096

    def frequencies(self, length: int) -> tuple[int, int]:
        full = length >= self.full_length
        cw = self.freq_cw or (30 if full else max(4, round(30 * length / self.full_length)))
        ucw = self.freq_ucw or (3 if full else 1)
        if cw <= ucw:
            raise ValueError(f"freq_cw ({cw}) must exceed freq_ucw ({ucw})")
        return cw, ucw


@dataclass(frozen=True)
class FweParams:
    alpha: float = 2.0  # Zipf exponent: the word of rank k appears about n * k^-alpha / zeta times
    vocab_size: int = 2000
    word_length: int = 6


def _passkey(rng: random.Random, p: PasskeyParams, length: int, depth: float | None) -> Draft:
    key = numbers(rng, 1, p.digits)[0]
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    head = (
        "There is an important info hidden inside a lot of irrelevant text. "
        "Find it and memorize it. I will quiz you about the important information there."
    )
    stream = SentenceStream(p.haystack, rng.getrandbits(64))
    return Draft(
        render=lambda n: head + "\n\n" + weave(stream.take(n), [(depth, needle)]),
        question="What is the pass key?",
        answer_prefix="The pass key is",
        references=[key],
        depth=depth,
        needles=[needle],
    )


def _draw_values(rng: random.Random, p: NiahParams, k: int, avoid: list[str]) -> list[str]:
    if p.value_type == "number":
        return numbers(rng, k, p.digits, avoid)
    if p.value_type == "word":
        return key_words(rng, k, avoid)
    return uuids(rng, k, avoid)


def _enumerate(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", and " + items[-1]


def _niah(rng: random.Random, p: NiahParams, length: int, depth: float | None) -> Draft:
    keys = key_words(rng, p.num_keys)
    flat = _draw_values(rng, p, p.num_keys * p.num_values, avoid=keys)
    values = [flat[i * p.num_values : (i + 1) * p.num_values] for i in range(p.num_keys)]
    kind = VALUE_TYPES[p.value_type]
    needles = [f"One of the special magic {kind} for {k} is: {v}." for k, vs in zip(keys, values) for v in vs]
    # needles[0] (first value of the first, asked key) at `depth`; the rest anywhere
    inserts = [(depth, needles[0])] + [(rng.random(), t) for t in needles[1:]]
    query = _enumerate(keys[: p.num_queries])
    head = (
        f"Some special magic {kind} are hidden within the following text. "
        f"Make sure to memorize it. I will quiz you about the {kind} afterwards."
    )
    stream = SentenceStream(p.haystack, rng.getrandbits(64))
    return Draft(
        render=lambda n: head + "\n" + weave(stream.take(n), inserts),
        question=f"What are all the special magic {kind} for {query} mentioned in the provided text?",
        answer_prefix=f"The special magic {kind} for {query} mentioned in the provided text are",
        references=[v for vs in values[: p.num_queries] for v in vs],
        depth=depth,
        needles=needles,
    )


def _vt(rng: random.Random, p: VtParams, length: int, depth: float | None) -> Draft:
    hops = p.num_hops + 1
    names = [w.upper() for w in coded_words(rng, p.num_chains * hops, length=5)]
    chains = [names[c * hops : (c + 1) * hops] for c in range(p.num_chains)]
    values = numbers(rng, p.num_chains, 5)
    inserts: list[tuple[float, str]] = []
    for c, (chain, value) in enumerate(zip(chains, values)):
        start = depth if c == 0 else rng.random()
        later = sorted(rng.uniform(start, 1.0) for _ in range(p.num_hops))
        lines = [f"VAR {chain[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in itertools.pairwise(chain)]
        inserts += zip([start, *later], lines)
    head = "Memorize and track the chain(s) of variable assignment hidden in the following text."
    stream = SentenceStream(p.haystack, rng.getrandbits(64))
    return Draft(
        render=lambda n: head + "\n\n" + weave(stream.take(n), inserts),
        question=f"Question: Find all variables that are assigned the value {values[0]} in the text above.",
        answer_prefix=(
            "Answer: According to the chain(s) of variable assignment in the text above, "
            f"{hops} variables are assigned the value {values[0]}, they are:"
        ),
        references=chains[0],
        depth=depth,
        needles=[line for _, line in inserts],
    )


def _cwe(rng: random.Random, p: CweParams, length: int, depth: float | None) -> Draft:
    freq_cw, freq_ucw = p.frequencies(length)
    pool = list(word_pool())
    if p.num_cw >= len(pool):
        raise ValueError(f"num_cw must be below {len(pool)}, got {p.num_cw}")
    rng.shuffle(pool)
    common, english = pool[: p.num_cw], pool[p.num_cw :]
    # every list item costs at least a token, so this many uncommon words overfill `length`
    supply = english + pseudo_words(rng, max(0, length // freq_ucw + 1 - len(english)))
    shuffle_seed = rng.getrandbits(64)
    head = (
        "Below is a numbered list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often."
    )

    def render(n: int) -> str:
        words = common * freq_cw + supply[:n] * freq_ucw
        random.Random(f"{shuffle_seed}:{n}").shuffle(words)
        return head + "\n" + " ".join(f"{i}. {w}" for i, w in enumerate(words, 1))

    return Draft(
        render=render,
        question=f"Question: What are the {p.num_cw} most common words in the above list?",
        answer_prefix=f"Answer: The top {p.num_cw} words that appear most often in the list are:",
        references=common,
        min_units=p.num_cw,
        max_units=len(supply),
    )


def _zipf_shares(p: FweParams) -> list[float]:
    """Share of the word of rank k = 1..vocab_size: k^-alpha normalised over the vocabulary."""
    weights = [k**-p.alpha for k in range(1, p.vocab_size + 1)]
    total = sum(weights)
    return [w / total for w in weights]


def _counts(shares: list[float], n: int) -> list[int]:
    return [int(n * s) for s in shares]


def _fwe(rng: random.Random, p: FweParams, length: int, depth: float | None) -> Draft:
    vocab = coded_words(rng, p.vocab_size, p.word_length)
    vocab[0] = "...."  # the most frequent "word" is noise the question says to ignore
    shuffle_seed = rng.getrandbits(64)
    shares = _zipf_shares(p)
    # ranks 2..4 must be strictly above rank 5 for the answer to be well defined
    min_units = next(n for n in range(1, 10**6) if int(n * shares[3]) > int(n * shares[4]))

    def render(n: int) -> str:
        words = [w for w, c in zip(vocab, _counts(shares, n)) for _ in range(c)]
        random.Random(f"{shuffle_seed}:{n}").shuffle(words)
        return (
            "Read the following coded text and track the frequency of each coded word. "
            "Find the three most frequently appeared coded words. " + " ".join(words)
        )

    return Draft(
        render=render,
        question=(
            "Question: Do not provide any explanation. Please ignore the dots '....'. "
            "What are the three most frequently appeared words in the above coded text?"
        ),
        answer_prefix="Answer: According to the coded text above, the three most frequently appeared words are:",
        references=vocab[1:4],
        min_units=min_units,
    )


@dataclass(frozen=True)
class TaskSpec:
    name: str
    build: Callable[[random.Random, Any, int, float | None], Draft]
    params: Any  # the task's params dataclass with its defaults
    uses_depth: bool


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("passkey", _passkey, PasskeyParams(), True),
        TaskSpec("niah_single_number", _niah, NiahParams(haystack="repeat"), True),
        TaskSpec("niah_single_word", _niah, NiahParams(value_type="word"), True),
        TaskSpec("niah_single_uuid", _niah, NiahParams(value_type="uuid"), True),
        TaskSpec("niah_multikey", _niah, NiahParams(num_keys=4), True),
        TaskSpec("niah_multivalue", _niah, NiahParams(num_values=4), True),
        TaskSpec("niah_multiquery", _niah, NiahParams(num_keys=4, num_queries=4), True),
        TaskSpec("vt", _vt, VtParams(), True),
        TaskSpec("cwe", _cwe, CweParams(), False),
        TaskSpec("fwe", _fwe, FweParams(), False),
    )
}


def _params(spec: TaskSpec, overrides: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(spec.params)}
    unknown = set(overrides) - names
    if unknown:
        raise ValueError(f"task {spec.name!r} has no option {sorted(unknown)}; its options: {sorted(names)}")
    return dataclasses.replace(spec.params, **overrides)


def generate(
    task: str, tokenizer: TokenizerLike, length: int, seed: int, depth: float | None = None, *,
    chat: bool = False, **options: Any
) -> Sample:
    """One sample of `task` whose prompt is `length` tokens (minus at most LENGTH_TOLERANCE).

    depth: needle position as a fraction of the haystack (tasks with needles; None: drawn
    from the seed). chat: render the prompt in the tokenizer's chat template (the same
    needles, keys and haystack as the plain prompt of that seed, fewer haystack units).
    options: fields of the task's params dataclass (e.g. haystack="essay").
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    if not callable(getattr(tokenizer, "encode", None)):
        raise TypeError("tokenizer needs an encode(text) -> list[int] method")
    if not isinstance(length, int) or length <= 0:
        raise ValueError(f"length must be a positive int of tokens, got {length!r}")
    spec = TASKS[task]
    if depth is not None and not (spec.uses_depth and 0.0 <= depth <= 1.0):
        raise ValueError(f"depth must be in [0, 1] and only for needle tasks; {task!r} got depth={depth}")
    rng = random.Random(seed)
    if spec.uses_depth and depth is None:
        depth = rng.random()
    frame = chat_frame(tokenizer) if chat else None
    draft = spec.build(rng, _params(spec, options), length, depth)
    context, actual = fit(draft, tokenizer, length, frame)
    if frame is not None:
        _check_chat_rendering(tokenizer, context, draft, frame)
    return Sample(
        task=task,
        context=context,
        question=draft.question,
        answer_prefix=draft.answer_prefix,
        references=list(draft.references),
        target_tokens=length,
        actual_tokens=actual,
        seed=seed,
        depth=draft.depth,
        needles=list(draft.needles),
        options=dict(options),
        chat=frame,
    )


def _check_chat_rendering(tokenizer: ChatTokenizerLike, context: str, draft: Draft, frame: tuple[str, str]) -> None:
    """The fitted prompt must be exactly what the template renders for the full message."""
    full = tokenizer.apply_chat_template([{"role": "user", "content": user_message(context, draft.question)}],
                                         add_generation_prompt=True)
    if full + draft.answer_prefix != join_prompt(context, draft.question, draft.answer_prefix, frame):
        raise ValueError("the chat template renders this message differently from a short one "
                         "(it rewrites message content); use chat=False (a plain prompt)")


def sample_seed(seed: int, length: int, index: int) -> int:
    """The seed of sample `index` at `length` in a run seeded with `seed` (stable across runs)."""
    return random.Random(f"{seed}:{length}:{index}").getrandbits(31)


def run_task_samples(
    task: str, tokenizer: TokenizerLike, lengths: Sequence[int], n: int, seed: int, *, chat: bool = False,
    **options: Any
) -> list[Sample]:
    """n samples of `task` per length, ordered by length then index.

    Needle tasks get depths spread evenly over the haystack, (i + 0.5) / n, unless a fixed
    `depth` is passed; each sample's seed is `sample_seed(seed, length, i)`.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    fixed_depth = options.pop("depth", None)
    uses_depth = task in TASKS and TASKS[task].uses_depth
    samples = []
    for length in lengths:
        for i in range(n):
            depth = fixed_depth if fixed_depth is not None else ((i + 0.5) / n if uses_depth else None)
            samples.append(generate(task, tokenizer, length, sample_seed(seed, length, i), depth, chat=chat,
                                    **options))
    return samples

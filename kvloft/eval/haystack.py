"""Haystack text and word pools for the synthetic long-context tasks, all offline.

Two haystacks, both streams of sentence units whose first n units are the same for
every n (prefix-stable), so the prompt length grows monotonically with n and a task
is fitted to a token budget by searching over n:

  "repeat"  the noise sentences of the passkey test ("The grass is green. ..."),
  "essay"   essay-like prose assembled from a built-in vocabulary of common English
            words by a small sentence grammar; it holds no digits, hyphens or
            all-capital words, so numbers, "adjective-noun" keys, UUIDs and VAR names
            planted in it occur only where they were planted.

The word pools (needle keys, word-list tasks) come from the same vocabulary, plus
pronounceable six-letter pseudo-words when a task needs more distinct words than it has.
"""

from __future__ import annotations

import functools
import random
import re
import string
import uuid
from collections.abc import Callable, Sequence

__all__ = [
    "HAYSTACKS",
    "NOISE_SENTENCES",
    "SentenceStream",
    "coded_words",
    "key_words",
    "numbers",
    "pseudo_words",
    "uuids",
    "weave",
    "word_pool",
]

HAYSTACKS = ("repeat", "essay")

NOISE_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


# Nouns take a plural by adding "s"; verbs are base forms that read after "can" or "we".
NOUNS = _words("""
river mountain garden window table teacher student doctor farmer painter writer singer
player builder driver market village forest ocean island valley bridge tower castle
harbor road street path field meadow lake pond hill desert cloud storm wind season
morning evening night week month year moment letter book paper pencil picture
song poem idea plan question answer problem reason result method system engine machine
tool hammer basket bottle bucket candle lamp mirror pillow blanket carpet curtain door
floor wall roof kitchen bedroom garage station airport office school
museum theater hospital restaurant shop neighbor friend brother sister mother
father daughter parent cousin captain soldier sailor pilot worker leader member stranger
visitor traveler merchant baker horse rabbit turtle tiger lion eagle falcon sparrow
dolphin whale beetle spider monkey donkey apple orange lemon melon carrot onion flower
seed root stone rock planet star moon comet signal channel network message record
chapter lesson subject concept habit skill talent career journey adventure
holiday festival dinner guitar piano violin drum trumpet camera phone screen keyboard
wheel rocket vessel canoe wagon truck bicycle ticket coin wallet jacket shirt sweater
boot glove helmet ribbon painting kettle ladder lantern needle
notebook orchard palace pocket puzzle rainbow saddle shadow shelter shovel
statue tunnel umbrella uniform vineyard wardrobe whistle cabin canyon cottage crystal
""")

ADJECTIVES = _words("""
bright quiet gentle careful patient clever honest brave calm eager happy proud simple
strange ancient modern distant nearby hidden silent golden silver wooden narrow broad
shallow deep steep smooth rough soft warm cold cool fresh green yellow purple crimson
gray dark pale heavy light rapid slow sudden early late rare common humble noble loyal
curious polite busy lazy tiny huge little young old elegant fragile sturdy hollow
plain quick sharp dull vivid faint bold shy wise famous modest tidy messy crowded empty
lonely friendly hungry thirsty sleepy cheerful gloomy serious playful sensible
stubborn graceful clumsy fancy rustic urban rural frozen sunny windy cloudy misty
""")

VERBS = _words("""
build carry follow find keep open paint read visit explore gather measure notice
observe prepare protect repair describe discover admire borrow collect deliver enjoy
examine imagine improve invite mention organize polish remember share support clean
cover design draw fill guide hold lift move pack pull push reach save select send shape
sort test trace trust wash weigh answer arrange attach balance bake count decorate
""")

ADVERBS = _words("""
quietly slowly quickly carefully gently often rarely usually sometimes always eventually
suddenly patiently happily calmly boldly eagerly
""")

PREPOSITIONS = ("near", "behind", "beside", "under", "above", "across", "inside", "beyond", "around")
MODALS = ("can", "will", "should", "might", "could", "would", "must")
OPENERS = (
    "In the morning",
    "After a while",
    "Every year",
    "Later that day",
    "Without warning",
    "For many years",
    "At the same time",
    "In most cases",
    "Over time",
    "Before long",
    "Now and then",
    "Once in a while",
    "On a quiet evening",
    "By the end of the season",
)
PLURAL_SUBJECTS = ("People", "We", "They", "Most of us", "Many of them", "Our neighbors")


def _an(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _essay_sentence(rng: random.Random) -> str:
    n, a, v = (lambda: rng.choice(NOUNS)), (lambda: rng.choice(ADJECTIVES)), (lambda: rng.choice(VERBS))
    prep, modal, adv = rng.choice(PREPOSITIONS), rng.choice(MODALS), rng.choice(ADVERBS)
    forms: tuple[Callable[[], str], ...] = (
        lambda: f"{rng.choice(OPENERS)}, the {a()} {n()} {modal} {v()} {_an(n())} {prep} the {n()}.",
        lambda: f"{rng.choice(PLURAL_SUBJECTS)} {adv} {v()} the {a()} {n()}s.",
        lambda: f"The {n()} was {a()}, and the {n()} was {a()}.",
        lambda: f"Nobody knew why the {n()} {modal} {v()} every {n()} {prep} the {n()}.",
        lambda: f"It is {a()} to {v()} {_an(n())} when the {n()} is {a()}.",
        lambda: f"{rng.choice(OPENERS)}, we {v()} the {n()} and {v()} the {a()} {n()}.",
        lambda: f"{_an(a()).capitalize()} {n()} is not the same as {_an(a())} {n()}.",
        lambda: f"If you {v()} the {n()}, the {n()} {modal} {v()} you {adv}.",
        lambda: f"Some say that {n()}s {v()} {n()}s {prep} the {a()} {n()}.",
        lambda: f"There was {_an(a())} {n()} {prep} the {n()}, and it was {a()}.",
    )
    return rng.choice(forms)()


class SentenceStream:
    """Haystack units of one kind, generated lazily and cached: `take(n)` is a prefix of `take(n + 1)`.

    Each unit carries its trailing separator (" ", or "\\n\\n" where an essay paragraph ends),
    so joining units with "" gives the text.
    """

    def __init__(self, kind: str, seed: int) -> None:
        if kind not in HAYSTACKS:
            raise ValueError(f"haystack must be one of {', '.join(HAYSTACKS)}; got {kind!r}")
        self.kind = kind
        self._rng = random.Random(seed)
        self._units: list[str] = []

    def _next(self) -> str:
        if self.kind == "repeat":
            return NOISE_SENTENCES[len(self._units) % len(NOISE_SENTENCES)] + " "
        # paragraphs of about six sentences
        return _essay_sentence(self._rng) + ("\n\n" if self._rng.random() < 1 / 6 else " ")

    def take(self, n: int) -> list[str]:
        while len(self._units) < n:
            self._units.append(self._next())
        return self._units[:n]


def weave(units: Sequence[str], inserts: Sequence[tuple[float, str]]) -> str:
    """Join haystack units with each insert placed before unit round(depth * len(units)).

    inserts: (depth in [0, 1], text) pairs; depth 0 puts the text first, 1 last; inserts
    falling in the same slot keep their depth order.
    """
    n = len(units)
    slots: dict[int, list[str]] = {}
    for depth, text in sorted(inserts, key=lambda x: x[0]):
        slots.setdefault(round(depth * n), []).append(text + " ")
    parts: list[str] = []
    for i in range(n + 1):
        parts.extend(slots.get(i, ()))
        if i < n:
            parts.append(units[i])
    return "".join(parts).rstrip()


@functools.cache
def word_pool() -> tuple[str, ...]:
    """Distinct vocabulary words of 4+ letters, none a substring of another (sorted).

    Substring-free so that a case-insensitive substring scorer never credits one word
    for another ("cool" inside "cooler").
    """
    words = sorted({w for w in NOUNS + ADJECTIVES + VERBS if len(w) >= 4})
    joined = "\n".join(words)
    return tuple(w for w in words if joined.count(w) == 1)


_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"


def pseudo_words(rng: random.Random, k: int) -> list[str]:
    """k distinct pronounceable six-letter words (consonant-vowel x 3), none containing,
    nor contained in, a `word_pool()` word; there are about 340,000 candidates."""
    pool = word_pool()
    contains_pool_word = re.compile("|".join(sorted(pool, key=len, reverse=True)))
    joined = "\n".join(pool)
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < k:
        w = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(3))
        if w in seen or w in joined or contains_pool_word.search(w):
            continue
        seen.add(w)
        out.append(w)
    return out


def coded_words(rng: random.Random, k: int, length: int = 6) -> list[str]:
    """k distinct random lowercase strings of one length (so none is inside another)."""
    if k > 26**length // 2:
        raise ValueError(f"{k} coded words of length {length} is too many; use longer words")
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < k:
        w = "".join(rng.choices(string.ascii_lowercase, k=length))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def _distinct(draw: Callable[[], str], k: int, avoid: Sequence[str]) -> list[str]:
    """k draws, none a substring of another draw or of an `avoid` item, nor containing one."""
    out: list[str] = []
    taken = list(avoid)
    for _ in range(1000 * (k + 1)):
        if len(out) == k:
            break
        w = draw()
        if not any(w in t or t in w for t in taken):
            out.append(w)
            taken.append(w)
    if len(out) < k:
        raise ValueError(f"could not draw {k} distinct items; ask for fewer")
    return out


def key_words(rng: random.Random, k: int, avoid: Sequence[str] = ()) -> list[str]:
    """k distinct "adjective-noun" keys (about 20,000 possible), e.g. "quiet-harbor"."""
    return _distinct(lambda: f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}", k, avoid)


def numbers(rng: random.Random, k: int, digits: int, avoid: Sequence[str] = ()) -> list[str]:
    """k distinct decimal numbers of exactly `digits` digits."""
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    return _distinct(lambda: str(rng.randint(lo, hi)), k, avoid)


def uuids(rng: random.Random, k: int, avoid: Sequence[str] = ()) -> list[str]:
    """k distinct version-4 UUID strings drawn from `rng` (not from the OS)."""
    return _distinct(lambda: str(uuid.UUID(int=rng.getrandbits(128), version=4)), k, avoid)

"""Needle-in-a-haystack tasks of RULER (Hsieh et al. 2024, https://arxiv.org/abs/2404.06654, Sec. 3.1).

A needle is a sentence "One of the special magic numbers for <key> is: <value>."; the model must return
the value(s) of the queried key(s). The eight variants differ in the haystack (noise sentences, essays,
or other needles), the kind of keys and values (words, 7-digit numbers, UUIDs) and how many needles
are hidden or asked for.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from .common import Sample, count_tokens
from .haystacks import filler
from .prose import NOISE, adjectives_nouns, essay_sentences, fill, insert

__all__ = ["NIAH", "NiahConfig", "build_niah"]


@dataclass(frozen=True)
class NiahConfig:
    """One needle-in-a-haystack variant.

    Parameters
    ----------
    haystack: ``"noise"`` (RULER's repeated sentences), ``"essay"`` (Paul Graham's essays) or
        ``"needles"`` (the haystack is made of needles with other keys).
    keys: ``"words"`` (adjective-noun pairs) or ``"uuids"``.
    values: ``"numbers"`` (7 digits) or ``"uuids"``.
    num_keys: needles with distinct keys; the first ``num_queries`` are asked, the rest distract.
    num_values: values hidden for each asked key (all must be returned).
    num_queries: keys asked at once.
    """

    haystack: str
    keys: str
    values: str
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1


NIAH: dict[str, NiahConfig] = {
    "niah_single_1": NiahConfig("noise", "words", "numbers"),
    "niah_single_2": NiahConfig("essay", "words", "numbers"),
    "niah_single_3": NiahConfig("essay", "words", "uuids"),
    "niah_multikey_1": NiahConfig("essay", "words", "numbers", num_keys=4),
    "niah_multikey_2": NiahConfig("needles", "words", "numbers"),
    "niah_multikey_3": NiahConfig("needles", "uuids", "uuids"),
    "niah_multivalue": NiahConfig("essay", "words", "numbers", num_values=4),
    "niah_multiquery": NiahConfig("essay", "words", "numbers", num_keys=4, num_queries=4),
}

_SINGULAR = {"numbers": "number", "uuids": "uuid"}


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _drawer(kind: str, rng: random.Random, seen: set[str]) -> Callable[[], str]:
    """A function drawing keys or values of ``kind`` that are not in ``seen`` (and adding them to it)."""
    adjectives, nouns = adjectives_nouns()

    def draw_one() -> str:
        if kind == "words":
            return f"{rng.choice(adjectives)}-{rng.choice(nouns)}"
        if kind == "numbers":
            return str(rng.randint(1_000_000, 9_999_999))
        return _uuid(rng)

    def draw() -> str:
        while (x := draw_one()) in seen:
            pass
        seen.add(x)
        return x

    return draw


def _needle(kind: str, key: str, value: str) -> str:
    return f"One of the special magic {kind} for {key} is: {value}."


def _listing(keys: list[str]) -> str:
    """'a', 'a and b', 'a, b, and c'."""
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + (", and " if len(keys) > 2 else " and ") + keys[-1]


def build_niah(
    task: str,
    tokenizer: PreTrainedTokenizerBase,
    index: int,
    rng_seed: str,
    depth: float,
    budget: int,
    haystack: str | None = None,
) -> Sample:
    """One sample of NIAH variant ``task`` whose haystack takes about ``budget`` tokens.

    Args:
        rng_seed: seeds all random choices, so the same seed and budget give the same sample.
        depth: where the first asked needle sits, 0 = start of the haystack, 1 = end; the other
            needles go to random depths.
        haystack: a family of ``haystacks.FAMILIES`` to fill the haystack with instead of the
            variant's noise or essays; a haystack made of needles (multikey_2/3) stays as it is.
    """
    cfg = NIAH[task]
    rng = random.Random(rng_seed)
    keys_seen: set[str] = set()
    values_seen: set[str] = set()
    keys, values = _drawer(cfg.keys, rng, keys_seen), _drawer(cfg.values, rng, values_seen)
    kind = cfg.values
    asked = [keys() for _ in range(cfg.num_queries)]
    distractors = [keys() for _ in range(cfg.num_keys - cfg.num_queries)]
    needles: list[tuple[float, str]] = []
    references: list[str] = []
    for key in asked:
        for _ in range(cfg.num_values):
            references.append(values())
            needles.append((rng.random(), _needle(kind, key, references[-1])))
    needles[0] = (depth, needles[0][1])
    needles += [(rng.random(), _needle(kind, key, values())) for key in distractors]

    budget = max(0, budget)
    family = haystack if cfg.haystack != "needles" else None  # needles stay needles
    if family is not None:
        units = filler(tokenizer, family, rng, budget)
    elif cfg.haystack == "noise":
        units = fill(tokenizer, "noise", NOISE, 0, budget)
    elif cfg.haystack == "essay":
        sentences = essay_sentences()
        units = fill(tokenizer, "essays", sentences, rng.randrange(len(sentences)), budget, partial=True)
    else:
        # Other needles make the haystack: drawn from their own stream so that a larger budget
        # extends the same haystack instead of redrawing it.
        filler_rng = random.Random(rng.getrandbits(64))
        filler_keys = _drawer(cfg.keys, filler_rng, keys_seen)
        filler_values = _drawer(cfg.values, filler_rng, values_seen)
        units, used = [], 0
        while True:
            line = _needle(kind, filler_keys(), filler_values())
            n = count_tokens(tokenizer, " " + line)
            if used + n > budget:
                break
            units.append(line)
            used += n
        # A needle line is long (about 80 tokens with UUIDs): close the last gap with a few of RULER's
        # noise sentences at the start, so the prompt still lands within a few tokens of its target.
        units = fill(tokenizer, "noise", NOISE, 0, budget - used) + units
    text = insert(units, needles)

    single = len(references) == 1
    what = _SINGULAR[kind] if single else kind
    listing = _listing(asked)
    context = (
        f"Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
        f"I will quiz you about the {kind} afterwards.\n{text}"
    )
    if single:
        question = f"What is the special magic {what} for {listing} mentioned in the provided text?"
        answer_prefix = f"Answer: The special magic {what} for {listing} mentioned in the provided text is"
    else:
        question = f"What are all the special magic {what} for {listing} mentioned in the provided text?"
        answer_prefix = f"Answer: The special magic {what} for {listing} mentioned in the provided text are"
    return Sample(task, index, context, question, answer_prefix, tuple(references), "all", family)

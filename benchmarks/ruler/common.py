"""Shared pieces of the RULER-style tasks: the sample record, token counting and length fitting.

RULER: Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language
Models?", https://arxiv.org/abs/2404.06654. This is our own implementation from the paper's
description; no RULER code is used.
"""

from __future__ import annotations

import random
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

__all__ = ["Sample", "count_tokens", "depths", "fit_length", "prompt_tokens", "sample_rng", "unit_tokens"]

# A sample's prompt must land within this fraction of the requested length; fit_length aims tighter.
TOLERANCE = 0.03


@dataclass(frozen=True)
class Sample:
    """One RULER-style test case.

    The plain prompt is ``context + question`` (one user turn) followed by ``answer_prefix`` (the start
    of the model's answer). ``question`` opens with its own separator from the context.

    Attributes:
        task: task name, e.g. ``"niah_single_1"``.
        index: sample index within the task.
        context: the long document; the part compressed in the query-agnostic protocol.
        question: the query: RULER's per-task question/instruction text.
        answer_prefix: the start of the answer, e.g. ``"Answer: The special magic number for X ..."``.
        references: the strings a correct output contains.
        metric: ``"all"`` (each reference counts for its share) or ``"any"`` (one reference suffices).
    """

    task: str
    index: int
    context: str
    question: str
    answer_prefix: str
    references: tuple[str, ...]
    metric: str


def count_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    """Number of tokens of ``text`` without special tokens."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_tokens(sample: Sample, tokenizer: PreTrainedTokenizerBase) -> int:
    """Tokens of the plain prompt: ``context + question`` plus ``answer_prefix``, no chat template.

    The two parts are counted separately because a chat template puts the assistant header between
    them; the sum is what ``context_tokens`` targets.
    """
    return count_tokens(tokenizer, sample.context + sample.question) + count_tokens(tokenizer, sample.answer_prefix)


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


def sample_rng(task: str, seed: int, context_tokens: int, index: int) -> random.Random:
    """The random source of one sample. String seeds hash with SHA-512, so runs and hosts agree."""
    return random.Random(f"ruler/{task}/{seed}/{context_tokens}/{index}")


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
    of list items), so a secant search converges in two or three tokenizations of the full prompt.

    Args:
        build: deterministic for a given ``size``; larger sizes give longer prompts.
        tokenizer: counts the prompt (see ``prompt_tokens``).
        target: the wanted prompt length in tokens.
        start: a small size that ``build`` accepts (the search starts there).
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
        raise ValueError(f"context_tokens={target} is too short for this task: its fixed parts take {lengths[start]} tokens")
    for _ in range(8):
        ranked = sorted(lengths, key=lambda s: abs(lengths[s] - target))
        best = ranked[0]
        if abs(lengths[best] - target) <= max(2, 0.002 * target):
            break
        if len(ranked) > 1 and lengths[ranked[0]] != lengths[ranked[1]] and ranked[0] != ranked[1]:
            # Secant: the slope between the two points nearest the target (kept positive).
            slope = max(1e-3, (lengths[ranked[0]] - lengths[ranked[1]]) / (ranked[0] - ranked[1]))
        size = max(start, best + round((target - lengths[best]) / slope))
        if size in lengths:  # the search cycles: step once past the closest point instead
            size = best + (1 if lengths[best] < target else -1)
            if size in lengths or size < start:
                break
        measure(size)
    best = min(lengths, key=lambda s: abs(lengths[s] - target))
    if abs(lengths[best] - target) > TOLERANCE * target:
        raise ValueError(f"could not fit the prompt to {target} tokens (closest: {lengths[best]})")
    return samples[best]

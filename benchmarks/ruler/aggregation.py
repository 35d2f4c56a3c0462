"""Aggregation tasks of RULER (Hsieh et al. 2024, https://arxiv.org/abs/2404.06654, Sec. 3.3).

- cwe, common words extraction: a numbered list of dictionary words in which 10 words appear much
  more often than the rest; return the 10.
- fwe, frequent words extraction: "coded" words (random letter strings) drawn from a Zipf
  distribution (exponent 2); return the 3 most frequent.
Both contexts are nothing but the list, so their size is a number of list entries.
"""

from __future__ import annotations

import collections
import math
import random
import string

from .common import Sample
from .prose import dictionary_words

__all__ = ["build_cwe", "build_fwe"]

NUM_COMMON = 10  # cwe: words to return
NUM_FREQUENT = 3  # fwe: words to return
ZIPF_EXPONENT = 2.0
FWE_VOCAB = 1000  # coded words available to fwe's Zipf draw


def _cwe_frequencies(entries: int) -> tuple[int, int]:
    """(count of each common word, count of each rare word) for a list of ``entries`` words.

    RULER uses 30 and 3; a short list scales the common count down (at least 3x the rare one) so that
    rare words still fill part of it.
    """
    common = min(30, max(3, entries // 20))
    return common, max(1, min(3, common // 3))


def build_cwe(task: str, index: int, rng_seed: str, entries: int) -> Sample:
    """One common-words sample: a numbered list of ``entries`` words (at least ``NUM_COMMON * 3``)."""
    rng = random.Random(rng_seed)
    freq_common, freq_rare = _cwe_frequencies(entries)
    rare_entries = max(0, entries - NUM_COMMON * freq_common)
    num_rare = math.ceil(rare_entries / freq_rare)
    pool = dictionary_words()
    if NUM_COMMON + num_rare > len(pool):
        raise ValueError(f"cwe needs {NUM_COMMON + num_rare} distinct words; the word list has {len(pool)}")
    words = rng.sample(pool, NUM_COMMON + num_rare)
    rare = words[NUM_COMMON:]
    # A common word inside another listed word ("art" in "start") would be found by string matching
    # in an answer that lists the other word: swap such common words for unused ones.
    common: list[str] = []
    used = set(words)
    candidates = iter(rng.sample(pool, len(pool)))
    for word in words[:NUM_COMMON]:
        while any(word != other and word in other for other in (*words, *common)):
            word = next(w for w in candidates if w not in used)
            used.add(word)
        common.append(word)
    listing = common * freq_common + (rare * freq_rare)[:rare_entries]
    rng.shuffle(listing)
    numbered = " ".join(f"{i}. {word}" for i, word in enumerate(listing, 1))
    context = (
        "Below is a numbered list of words. In these words, some appear more often than others. "
        f"Memorize the ones that appear most often.\n{numbered}"
    )
    question = f"Question: What are the {NUM_COMMON} most common words in the above list?"
    answer_prefix = f"Answer: The top {NUM_COMMON} words that appear most often in the list are:"
    return Sample(task, index, context, question, answer_prefix, tuple(common), "all")


def build_fwe(task: str, index: int, rng_seed: str, entries: int) -> Sample:
    """One frequent-words sample: ``entries`` coded words (at least 10), Zipf-distributed."""
    rng = random.Random(rng_seed)
    vocab: list[str] = []
    seen: set[str] = set()
    while len(vocab) < FWE_VOCAB:
        # Four letters each, so no coded word is a substring of another.
        if (word := "".join(rng.choices(string.ascii_lowercase, k=4))) not in seen:
            seen.add(word)
            vocab.append(word)
    weights = [1 / rank**ZIPF_EXPONENT for rank in range(1, FWE_VOCAB + 1)]
    for _ in range(100):
        draws = rng.choices(vocab, weights=weights, k=entries)
        ranked = collections.Counter(draws).most_common(NUM_FREQUENT + 1)
        counts = [c for _, c in ranked] + [0]
        # The top words must be unambiguous: no tie among them or with the next word.
        if len(set(counts[: NUM_FREQUENT + 1])) == NUM_FREQUENT + 1:
            break
    else:
        raise ValueError(f"fwe: {entries} entries are too few for an unambiguous top {NUM_FREQUENT}")
    top = tuple(word for word, _ in ranked[:NUM_FREQUENT])
    context = (
        "Read the following coded text and track the frequency of each coded word. Find the three most "
        f"frequently appeared coded words. {' .... '.join(draws)}"
    )
    question = (
        "Question: Do not provide any explanation. Please ignore the dots '....'. "
        "What are the three most frequently appeared words in the above coded text?"
    )
    answer_prefix = "Answer: According to the coded text above, the three most frequently appeared words are:"
    return Sample(task, index, context, question, answer_prefix, top, "all")

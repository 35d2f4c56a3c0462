"""qa_1: question answering over many documents, RULER's real-data task (Hsieh et al. 2024,
https://arxiv.org/abs/2404.06654, Sec. 3.4): the paragraph that answers the question hides among
distractor paragraphs, and the answer is scored by string match against the reference.

Data: BIG-bench's ``disfl_qa`` task (Gupta et al. 2021, https://arxiv.org/abs/2106.04016): SQuAD v2
paragraphs (CC BY-SA 4.0) with questions rewritten by people to contain disfluencies ("What part the
biosphere no sorry the atmosphere ..."), inside the PyPI source archive ``bigbench==1.0.0`` (358 MB;
BIG-bench is Apache-2.0). Fetch it once with::

    python -m benchmarks.ruler.qa --fetch

which runs ``pip download --no-deps bigbench==1.0.0`` into a temporary folder, keeps only
``bigbench/benchmark_tasks/disfl_qa/task.json`` (8 MB, SHA-256 checked) as
``$ZIGZAG_CACHE/data/bigbench-1.0.0/disfl_qa/task.json`` (default ``~/.cache/zigzag/data/...``) and
deletes the archive. Nothing is committed.

Differences from RULER's qa_1 (SQuAD dev): the questions are disfluent, each has one reference
answer, and only answerable questions are used (2,107 of the 8,000 are "unknown"). The text was
stored word-tokenized ("Earth ' s", "fault - tolerant"); ``detokenize`` undoes that.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from ..cli import HelpFormatter
from .common import Sample, unit_tokens
from .prose import truncate

__all__ = ["QAItem", "build_qa", "detokenize", "disfl_qa_path", "fetch_disfl_qa", "load_disfl_qa"]

PACKAGE = "bigbench==1.0.0"
MEMBER = "bigbench-1.0.0/bigbench/benchmark_tasks/disfl_qa/task.json"
SHA256 = "baff19410992adcf14e5bb2e1ea652e7589a8e11e8c314a00225110e104e2824"
FETCH_COMMAND = "python -m benchmarks.ruler.qa --fetch"

# Tokens that "Document 12:\n" and the blank line after a document add to its paragraph.
_DOC_OVERHEAD = 7

_INSTRUCTION = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other words."
)


@dataclass(frozen=True)
class QAItem:
    """A question, its reference answer and the index of the paragraph that answers it."""

    question: str
    answer: str
    paragraph: int


def disfl_qa_path() -> Path:
    """Where the fetched ``disfl_qa`` task file lives: ``$ZIGZAG_CACHE/data/...`` or ``~/.cache/zigzag/data/...``."""
    root = Path(os.environ.get("ZIGZAG_CACHE") or "~/.cache/zigzag").expanduser()
    return root / "data" / "bigbench-1.0.0" / "disfl_qa" / "task.json"


def detokenize(text: str) -> str:
    """Undo the word tokenization of the stored SQuAD text: ``Earth ' s ( 1 , 300 ft )`` -> ``Earth's (1,300 ft)``."""
    t = " ".join(text.split())
    t = re.sub(r"(?<=\d) ([.,]) (?=\d)", r"\1", t)  # 1 , 300 -> 1,300 and 3 . 5 -> 3.5
    t = re.sub(r'" (.*?) "', r'"\1"', t)  # quotes come in pairs: hug the quoted words
    t = re.sub(r" ([.,;:!?%)\]}])", r"\1", t)
    t = re.sub(r"([(\[{$]) ", r"\1", t)
    t = t.replace(" ' ", "'").replace(" - ", "-")
    return t.strip()


@functools.cache
def load_disfl_qa(path: Path) -> tuple[tuple[QAItem, ...], tuple[str, ...]]:
    """Answerable questions and all distinct paragraphs of a BIG-bench ``disfl_qa`` task file.

    Questions whose answer cannot be found verbatim in their (detokenized) paragraph are dropped.
    """
    examples = json.loads(path.read_text(encoding="utf-8"))["examples"]
    index: dict[str, int] = {}
    items: list[QAItem] = []
    for example in examples:
        question, _, paragraph = example["input"].partition("\ncontext:")
        paragraph = detokenize(paragraph)
        k = index.setdefault(paragraph, len(index))
        answer = detokenize(example["target"])
        if answer.lower() != "unknown" and answer and answer in paragraph:
            items.append(QAItem(detokenize(question), answer, k))
    if not items:
        raise ValueError(f"no answerable questions in {path}")
    return tuple(items), tuple(index)


def build_qa(
    task: str, tokenizer: PreTrainedTokenizerBase, index: int, rng_seed: str, depth: float, budget: int
) -> Sample:
    """One qa_1 sample: the answering paragraph at ``depth`` (0..1) among distractors of about ``budget`` tokens.

    Raises:
        FileNotFoundError: the ``disfl_qa`` data was not fetched; the message gives the command.
    """
    path = disfl_qa_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"qa_1 needs BIG-bench's disfl_qa task at {path}; fetch it once with `{FETCH_COMMAND}` "
            f"(downloads the 358 MB {PACKAGE} source archive from PyPI and keeps 8 MB of it)"
        )
    items, paragraphs = load_disfl_qa(path)
    rng = random.Random(rng_seed)
    item = rng.choice(items)
    counts = unit_tokens(tokenizer, f"disfl_qa:{path}", [f"Document 10:\n{p}\n\n" for p in paragraphs])
    # Distractors: paragraphs in a random order, each taken if it still fits the budget, so the total
    # lands close to it; the first one that did not fit, cut at a word, closes the last gap. Paragraphs
    # that contain the answer are skipped: one gold document.
    remaining = budget
    docs: list[str] = []
    first_left_out: str | None = None
    for k in rng.sample(range(len(paragraphs)), len(paragraphs)):
        if k == item.paragraph or item.answer.lower() in paragraphs[k].lower():
            continue
        if counts[k] <= remaining:
            docs.append(paragraphs[k])
            remaining -= counts[k]
        elif first_left_out is None:
            first_left_out = paragraphs[k]
    if first_left_out and (head := truncate(tokenizer, first_left_out, remaining - _DOC_OVERHEAD)):
        docs.append(head)
    docs.insert(round(depth * len(docs)), paragraphs[item.paragraph])
    documents = "\n\n".join(f"Document {n}:\n{doc}" for n, doc in enumerate(docs, 1))
    context = f"{_INSTRUCTION}\n\nThe following are given documents.\n\n{documents}"
    question = f"{_INSTRUCTION}\n\nQuestion: {item.question}"
    return Sample(task, index, context, question, "Answer:", (item.answer,), "any")


def fetch_disfl_qa(dest: Path | None = None) -> Path:
    """Download ``bigbench==1.0.0`` with pip, keep its ``disfl_qa`` task file at ``dest``, drop the rest."""
    dest = dest or disfl_qa_path()
    with tempfile.TemporaryDirectory(prefix="zigzag-bigbench-") as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--dest", tmp]
        subprocess.run([*pip, PACKAGE], check=True)
        archive = next(Path(tmp).glob("bigbench-*.tar.gz"))
        data = None
        with tarfile.open(archive, "r|gz") as tar:  # streamed: the archive is read once, front to back
            for member in tar:
                if member.name == MEMBER and (f := tar.extractfile(member)) is not None:
                    data = f.read()
                    break
    if data is None:
        raise FileNotFoundError(f"{MEMBER} is not in the {PACKAGE} archive")
    if (digest := hashlib.sha256(data).hexdigest()) != SHA256:
        raise ValueError(f"{MEMBER} has SHA-256 {digest}; expected {SHA256}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(".part")
    part.write_bytes(data)
    part.replace(dest)  # atomic: a reader never sees half a file
    return dest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ruler.qa", description="qa_1 data (BIG-bench disfl_qa) for the RULER-style benchmark.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--fetch", action="store_true", help=f"download {PACKAGE} with pip and keep disfl_qa")
    args = parser.parse_args(argv)
    path = disfl_qa_path()
    if args.fetch:
        path = fetch_disfl_qa()
    if not path.is_file():
        sys.exit(f"missing {path}; run `{FETCH_COMMAND}`")
    items, paragraphs = load_disfl_qa(path)
    print(f"{path}: {len(items)} answerable questions over {len(paragraphs)} paragraphs")


if __name__ == "__main__":
    main()

"""The README's Python examples run as written and print what the README says they print."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_llama
from zigzag.pipeline.hf import cache_argument

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _block_after(heading: str, language: str = "python") -> str:
    """The first fenced block of ``language`` after ``heading``."""
    section = README.split(heading, 1)[1]
    return re.search(rf"```{language}\n(.*?)```", section, flags=re.DOTALL).group(1)


def test_own_scorer_and_allocator_example_runs():
    model = tiny_llama(layers=3)
    ctx = {"input_ids": torch.randint(0, 128, (2, 40)), "attention_mask": torch.ones(2, 40, dtype=torch.long)}
    namespace = {"model": model, "ctx": ctx}
    exec(_block_after("### Your own scorer or allocator"), namespace)  # noqa: S102 (the README's own code)
    cache = namespace["cache"]
    assert cache.budgets.sum(dim=1).tolist() == [3 * 20, 3 * 20]
    assert cache.budgets[0, 0] > cache.budgets[0, 2]  # front-loaded
    assert all(bool((kept[:, :, -1] == 39).all()) for kept in cache.kept_positions)  # the most recent token kept


@pytest.mark.slow
@pytest.mark.skipif(cache_argument(tiny_llama(layers=1)) != "cache", reason="the README shows the cache= form of current transformers")
def test_use_it_example_prints_what_the_readme_shows():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(_block_after("## Use it"), {})  # noqa: S102 (the README's own code)
    shown = _block_after("It prints:", "text").strip()
    assert out.getvalue().strip() == shown


def test_static_decoding_example_runs():
    model = tiny_llama(layers=2)
    ctx = {"input_ids": torch.randint(0, 128, (2, 40)), "attention_mask": torch.ones(2, 40, dtype=torch.long)}
    namespace = {"model": model, "ctx": ctx, "question_ids": torch.randint(0, 128, (2, 5))}
    exec(_block_after("## Fast decoding: a static cache and CUDA graphs"), namespace)  # noqa: S102 (the README's own code)
    assert namespace["tokens"].shape == (2, 200)

"""A token budget instead of a ratio: ``compress_cache(..., max_tokens=n)`` keeps ``min(n, T)`` tokens
per layer and KV head on average, through the same plan as a ratio."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import continuation_logits, tiny_llama
from zigzag import compress_cache, prefill_context


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=3)


def _rows(lengths=(60, 25), seed=4):
    seq = max(lengths)
    ids = torch.randint(0, 128, (len(lengths), seq), generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(seq)[None] >= torch.tensor([seq - n for n in lengths])[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("budget", ["uniform", "zigzag", "adakv", "zigzag_heads"])
def test_max_tokens_is_the_ratio_that_keeps_as_many(model, budget):
    inputs = {"input_ids": torch.randint(0, 128, (1, 80), generator=torch.Generator().manual_seed(1))}
    by_ratio = compress_cache(model, inputs, 0.75, "snapkv", budget)
    by_tokens = compress_cache(model, inputs, scorer="snapkv", budget=budget, max_tokens=20)
    again = prefill_context(model, inputs).compress(scorer="snapkv", budget=budget, max_tokens=20)
    for a, b, c in zip(by_ratio.kept_positions, by_tokens.kept_positions, again.kept_positions):
        assert torch.equal(a, b) and torch.equal(b, c)
    assert torch.equal(by_ratio.budgets, by_tokens.budgets)


@pytest.mark.parametrize("budget", ["uniform", "zigzag"])
def test_rows_shorter_than_the_budget_keep_everything(model, budget):
    inputs = _rows()
    cache = compress_cache(model, inputs, scorer="knorm", budget=budget, max_tokens=30)
    assert cache.budgets.sum(dim=1).tolist() == [3 * 30, 3 * 25]
    assert cache.budgets[1].tolist() == [25, 25, 25]  # the short row: every token, in every layer
    ours, reference = continuation_logits(model, inputs, cache, 3)
    torch.testing.assert_close(ours, reference.to(ours.dtype), atol=1e-4, rtol=0)


def test_chunked_prefill_stays_within_the_budget(model):
    inputs = _rows((120, 90))
    cache = compress_cache(model, inputs, scorer="knorm", budget="uniform", max_tokens=16, chunk_size=32)
    assert cache.budgets.tolist() == [[16, 16, 16], [16, 16, 16]]
    assert all(kept.shape[-1] == 16 for kept in cache.kept_positions)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of ratio"),
        ({"ratio": 0.5, "max_tokens": 8}, "exactly one of ratio"),
        ({"max_tokens": 0}, "max_tokens must be a positive int"),
        ({"max_tokens": 2.5}, "max_tokens must be a positive int"),
        ({"max_tokens": True}, "max_tokens must be a positive int"),
    ],
)
def test_bad_budgets_are_named(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        compress_cache(model, _rows(), **kwargs)
    with pytest.raises(ValueError, match=match):
        prefill_context(model, _rows()).compress(**kwargs)

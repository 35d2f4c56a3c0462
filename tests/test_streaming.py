"""Layer-wise compression during the prefill gives the same cache as compressing a full prefill."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_llama
from zigzag import compress_cache, prefill_context
from zigzag.merge import CosineMerge


def _batch(seed: int, vocab: int, lengths=(40, 29)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    seq = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), seq), generator=g)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, seq - n :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _assert_same_cache(a, b) -> None:
    assert torch.equal(a.budgets, b.budgets)
    assert (a.lmba is None) == (b.lmba is None)
    if a.lmba is not None:
        torch.testing.assert_close(a.lmba, b.lmba, rtol=0, atol=0)
    for la, lb in zip(a.layers, b.layers):
        assert torch.equal(la.kept_positions, lb.kept_positions)
        torch.testing.assert_close(la.keys, lb.keys, rtol=0, atol=0)
        torch.testing.assert_close(la.values, lb.values, rtol=1e-6, atol=1e-6)
        assert (la.prefix_bias is None) == (lb.prefix_bias is None)
        if la.prefix_bias is not None:
            torch.testing.assert_close(la.prefix_bias, lb.prefix_bias)


@pytest.mark.parametrize("budget", ["uniform", "pyramid", "zigzag", "adakv"])
@pytest.mark.parametrize("scorer", ["snapkv", "expected_attention", "knorm", "tova", "streaming_llm"])
def test_layerwise_equals_full_prefill_tiny(scorer, budget):
    model = tiny_llama(layers=4, seed=3)
    inputs = _batch(seed=hash((scorer, budget)) % 1000, vocab=128)
    reference = prefill_context(model, inputs, window=64).compress(0.6, scorer, budget)
    _assert_same_cache(compress_cache(model, inputs, 0.6, scorer, budget), reference)


@pytest.mark.parametrize("budget", ["uniform", "zigzag"])
def test_layerwise_with_merge_equals_full_prefill(budget):
    model = tiny_llama(layers=3, seed=5)
    inputs = _batch(seed=11, vocab=128)
    merge = CosineMerge(preserve_mass=True)
    reference = prefill_context(model, inputs, window=64).compress(0.5, "knorm", budget, merge=merge)
    _assert_same_cache(compress_cache(model, inputs, 0.5, "knorm", budget, merge=merge), reference)


def test_layerwise_equals_full_prefill_smollm2(smollm2):
    model, tok = smollm2
    texts = ["The quick brown fox jumps over the lazy dog. " * 12, "A short second row of text, padded on the left."]
    tok.padding_side = "left"
    inputs = tok(texts, return_tensors="pt", padding=True)
    for scorer, budget in [("expected_attention", "zigzag"), ("snapkv", "uniform")]:
        reference = prefill_context(model, inputs).compress(0.7, scorer, budget)
        _assert_same_cache(compress_cache(model, inputs, 0.7, scorer, budget), reference)

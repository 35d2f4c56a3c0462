"""Merge-on-evict inside compress_cache: exact against the masked reference, and the log(count) bias."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import tiny_llama
from tests.reference import keep_masks, masked_reference
from zigzag import cache_kwarg, prefill_context
from zigzag.cache.attention import RaggedKeys
from zigzag.merge import CosineMerge


def _scatter_prefix(full_states: torch.Tensor, kept: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Write ``slots (batch, kv_heads, n, d)`` into a copy of ``full_states`` at the kept columns."""
    out = full_states.clone()
    for b in range(kept.shape[0]):
        for h in range(kept.shape[1]):
            use = kept[b, h] >= 0
            out[b, h, kept[b, h][use]] = slots[b, h][use]
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("preserve_mass", [False, True])
def test_merged_cache_matches_masked_reference_with_merged_values(attn, preserve_mass):
    model = tiny_llama(attn, seed=3)
    batch, seq, q = 2, 40, 4
    ids = torch.randint(0, 128, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, :7] = 0
    pre = prefill_context(model, {"input_ids": ids, "attention_mask": mask})
    merge = CosineMerge(preserve_mass=preserve_mass)
    cache = pre.compress(0.6, "knorm", "zigzag", merge=merge)
    plain = pre.compress(0.6, "knorm", "zigzag")
    assert [torch.equal(a, b) for a, b in zip(cache.kept_positions, plain.kept_positions)] == [True] * 3
    assert any(not torch.equal(a.values, b.values) for a, b in zip(cache.layers, plain.layers))

    # Reference: the full cache with merged values written at the kept columns, evicted ones masked.
    reference = pre.cache
    biases = []
    for layer, ref_layer in zip(cache.layers, reference.layers):
        ref_layer.values = _scatter_prefix(ref_layer.values, layer.kept_positions, layer.values)
        if preserve_mass:
            bias = torch.zeros(batch, layer.keys.shape[1], seq)
            biases.append(_scatter_prefix(bias[..., None], layer.kept_positions, layer.prefix_bias[..., None])[..., 0])
    new = torch.randint(0, 128, (batch, q))
    full_mask = torch.cat([mask, torch.ones(batch, q, dtype=torch.long)], dim=-1)
    positions = (full_mask.cumsum(-1) - 1)[:, -q:]
    with torch.no_grad():
        ours = model(input_ids=new, attention_mask=full_mask, position_ids=positions, **cache_kwarg(model, cache)).logits
        with masked_reference(model, keep_masks(cache.kept_positions, seq), biases or None):
            ref = model(input_ids=new, attention_mask=full_mask, position_ids=positions, **cache_kwarg(model, reference)).logits
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_log_count_bias_restores_the_attention_mass_of_absorbed_duplicates():
    """Two identical tokens, one evicted and merged: with log(2) on the survivor's logit, attention
    is exactly that of the full cache; without it, the pair's share of attention halves."""
    torch.manual_seed(0)
    d = 8
    keys = torch.randn(1, 1, 4, d)
    values = torch.randn(1, 1, 4, d)
    keys[0, 0, 3], values[0, 0, 3] = keys[0, 0, 1], values[0, 0, 1]  # token 3 duplicates token 1
    query = torch.randn(1, 1, 1, d)
    full = F.scaled_dot_product_attention(query, keys, values)

    kept = torch.tensor([[[0, 1, 2]]])
    result = CosineMerge().merge(keys, values, kept, torch.ones(1, 4, dtype=torch.bool))
    assert result.counts.tolist() == [[[1.0, 2.0, 1.0]]]
    torch.testing.assert_close(result.values, values[:, :, :3])  # merging a duplicate keeps its value
    valid = torch.ones(1, 1, 3, dtype=torch.bool)
    with_bias = RaggedKeys.wrap(keys[:, :, :3], valid, True, result.counts.log())
    without = RaggedKeys.wrap(keys[:, :, :3], valid, True, None)
    torch.testing.assert_close(F.scaled_dot_product_attention(query, with_bias, result.values), full)
    dropped = F.scaled_dot_product_attention(query, without, result.values)
    assert (dropped - full).abs().max() > 1e-3
    # The survivor's weight with the bias equals the two originals' weights together.
    logits = (query @ keys.transpose(-1, -2))[0, 0, 0] / math.sqrt(d)
    p_full = logits.softmax(-1)
    p_bias = (logits[:3] + torch.tensor([0.0, math.log(2), 0.0])).softmax(-1)
    torch.testing.assert_close(p_bias[1], p_full[1] + p_full[3])

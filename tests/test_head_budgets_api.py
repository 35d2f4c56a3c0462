"""Head-wise ZigZag budgets (zigzag_heads) through Prefill.compress: exact per-head counts, the
per-layer report, and the same continuation as the masked full cache (float64 reference)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import continuation_logits, tiny_llama
from zigzag import prefill_context
from zigzag.budget import ZigZagHeads, layer_mean_budgets


def _model(attn="sdpa", seed=4):
    """The tiny Llama with sharper queries and keys in the second KV group of layer 1 (query heads 2 and 3), so
    that KV heads attend differently and head-wise budgets really differ (random weights alone give
    near-uniform attention everywhere)."""
    model = tiny_llama(attn, seed=seed)
    with torch.no_grad():
        attention = model.model.layers[1].self_attn
        attention.q_proj.weight[32:] *= 30.0  # query heads 2, 3 (head_dim 16)
        attention.k_proj.weight[16:] *= 30.0  # KV head 1
    return model


def _context(batch=2, seq=48, pad=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, :pad] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("budget", ["zigzag_heads", "zigzag_heads+skip1+cap2"])
def test_head_wise_zigzag_budgets_are_exact_on_a_tiny_model(attn, budget):
    model = _model(attn)
    ctx = _context()
    batch, seq, q, ratio = 2, 48, 3, 0.5
    mask = ctx["attention_mask"]
    pre = prefill_context(model, ctx)
    allocator = ZigZagHeads() if budget == "zigzag_heads" else ZigZagHeads(skip_layers=1, max_multiple=2.0)
    head_budgets, head_lmba = pre.budgets(ratio, allocator)
    kv_heads = model.config.num_key_value_heads
    assert head_budgets.shape == (batch, 3, kv_heads) and head_lmba.shape == (batch, 3, kv_heads)
    cache = pre.compress(ratio, "knorm", budget)
    lengths = mask.sum(-1)
    avg = [int(0.5 * int(n)) for n in lengths]
    for layer, kept in enumerate(cache.kept_positions):
        # each head keeps exactly its own budget of real, distinct tokens
        per_head = (kept >= 0).sum(-1)
        assert torch.equal(per_head, head_budgets[:, layer])
        for b in range(batch):
            real = kept[b][kept[b] >= 0]
            assert bool((real >= seq - int(lengths[b])).all()), "a padded position was kept"
    assert head_budgets.sum((1, 2)).tolist() == [3 * kv_heads * a for a in avg]
    # cache.budgets: (batch, layers), mean per KV head, exact row totals; cache.lmba: mean over heads
    assert cache.budgets.shape == (batch, 3) and cache.budgets.sum(1).tolist() == [3 * a for a in avg]
    assert torch.equal(cache.budgets, layer_mean_budgets(head_budgets))
    torch.testing.assert_close(cache.lmba, head_lmba.mean(-1))
    ours, ref = continuation_logits(model, ctx, cache, q)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_heads_really_differ_and_lmba_is_per_kv_head():
    model = _model()
    pre = prefill_context(model, _context(seed=1))
    budgets, lmba = pre.budgets(0.5, ZigZagHeads())
    valid = pre.context.valid
    for layer in range(3):
        mass = pre.window_mass(layer, 64)
        assert torch.equal(lmba[:, layer], ZigZagHeads().measure(mass, valid, 2).cpu())
    assert all(len(set(budgets[b, 1].tolist())) > 1 for b in range(2))  # the sharpened KV head keeps fewer


@pytest.mark.parametrize("scorer", ["knorm+shared", "expected_attention+maxpool5+first8+last4", "snapkv+sharedmax"])
def test_wrapped_scorers_compress_through_the_prefill(scorer):
    model = tiny_llama("sdpa", seed=2)
    ctx = _context(seed=3)
    cache = prefill_context(model, ctx).compress(0.5, scorer, "zigzag+skip1")
    lengths = ctx["attention_mask"].sum(-1)
    assert cache.budgets.sum(1).tolist() == [3 * int(0.5 * int(n)) for n in lengths]
    if "shared" in scorer:  # every KV head keeps the same tokens
        for kept in cache.kept_positions:
            assert torch.equal(kept[:, 0], kept[:, 1])
    if "first8" in scorer:
        for kept in cache.kept_positions:
            for b in range(2):
                start = 48 - int(lengths[b])
                assert set(range(start, start + 8)) | set(range(44, 48)) <= set(kept[b, 0].tolist())

"""A scorer and an LMBA allocator written from the documented protocols alone (no zigzag base class),
and the same through the base classes' defaults, run end to end on a tiny model."""

from __future__ import annotations

import torch

from tests.conftest import continuation_logits, tiny_llama
from zigzag import BudgetAllocator, Scorer, compress_cache, prefill_context
from zigzag.budget import apportion, lmba


class LastQueryDot:
    """Scores each key by its dot product with the last window query, summed over the group."""

    name = "last_query_dot"
    query_window = 1
    needs_query_stats = False
    query_stats_skip = 0

    def score(self, layer):
        q = layer.window_queries[:, :, -1]  # (batch, heads, head_dim)
        groups = q.shape[1] // layer.kv_heads
        q = q.reshape(layer.batch, layer.kv_heads, groups, -1).sum(dim=2)
        return torch.einsum("bhd,bhsd->bhs", q, layer.keys.float())


class LmbaProportional:
    """Budgets proportional to each layer's LMBA, at least one token: written from the protocol only."""

    name = "lmba_proportional"
    granularity = "layer"
    needs_lmba = True
    window = 8

    def measure(self, attention, valid, kv_heads):
        return lmba(attention, valid, tau=0.5)

    def allocate(self, avg_budget, seq_len, num_layers, lmba=None):
        total = num_layers * avg_budget
        return apportion(lmba.double() + 1e-3, total, lower=torch.ones_like(avg_budget)[:, None], upper=seq_len[:, None])


class Halves(BudgetAllocator):
    """Through the base class: the first half of the layers gets three quarters of the tokens."""

    name = "halves"

    def allocate(self, avg_budget, seq_len, num_layers, lmba=None):
        first = torch.minimum((3 * avg_budget) // 2, seq_len)
        return torch.stack([first, 2 * avg_budget - first], dim=1)


class Recent(Scorer):
    """Through the base class: later tokens first."""

    name = "recent"

    def score(self, layer):
        return layer.positions[:, None, :].float().expand(-1, layer.kv_heads, -1)


def _inputs():
    ids = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_protocol_only_scorer_and_lmba_allocator_run_end_to_end():
    model = tiny_llama(layers=2)
    inputs = _inputs()
    cache = compress_cache(model, inputs, 0.5, LastQueryDot(), LmbaProportional())
    again = prefill_context(model, inputs, window=8).compress(0.5, LastQueryDot(), LmbaProportional())
    for ours, theirs in zip(cache.kept_positions, again.kept_positions):
        assert torch.equal(ours, theirs)
    assert cache.lmba is not None and cache.lmba.shape == (2, 2)
    assert cache.budgets.sum(dim=1).tolist() == [2 * 24, 2 * 20]
    assert bool((cache.budgets >= 1).all())
    ours, reference = continuation_logits(model, inputs, cache, 4)
    torch.testing.assert_close(ours, reference.to(ours.dtype), atol=1e-4, rtol=0)


def test_base_class_defaults_are_enough():
    model = tiny_llama(layers=2)
    inputs = _inputs()
    cache = compress_cache(model, inputs, 0.5, Recent(), Halves())
    assert cache.budgets.tolist() == [[36, 12], [30, 10]]
    assert cache.lmba is None
    for kept, budgets in zip(cache.kept_positions, cache.budgets.T):
        last = kept[:, :, -1]
        assert bool((last == 47).all())  # the most recent token is always kept
        assert (kept >= 0).sum(-1)[:, 0].tolist() == budgets.tolist()

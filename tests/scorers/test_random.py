from __future__ import annotations

import dataclasses

import torch

from zigzag.scorers import RandomScorer


def test_reproducible_and_seed_dependent(kit):
    layer = kit.build([kit.random_row(n, 4, 2, 8) for n in (300, 120)])
    a = RandomScorer(seed=5).score(layer)
    torch.testing.assert_close(a, RandomScorer(seed=5).score(layer), rtol=0, atol=0)
    assert not torch.equal(a, RandomScorer(seed=6).score(layer))
    assert not torch.equal(a[:, 0], a[:, 1])  # kv heads draw independently
    other_layer = dataclasses.replace(layer, layer_idx=1)
    assert not torch.equal(a, RandomScorer(seed=5).score(other_layer))
    valid = layer.valid[:, None, :].expand_as(a)
    assert a.dtype == torch.float32 and (a >= 0).all() and (a < 1).all()
    assert abs(a[valid].mean().item() - 0.5) < 0.05


def test_unseeded_differs_between_calls_and_leaves_global_rng_alone(kit):
    layer = kit.build([kit.random_row(64, 2, 2, 8)])
    state = torch.get_rng_state()
    a = RandomScorer(seed=None).score(layer)
    b = RandomScorer(seed=None).score(layer)
    assert not torch.equal(a, b)
    assert torch.equal(state, torch.get_rng_state())


def test_long_rows_cross_blocks(kit):
    """Scores past the first block of positions are still tied to positions, not to the length."""
    long_row = kit.random_row(2100, 1, 1, 4)
    short_row = kit.Row(*(t[:, :1500] for t in (long_row.k_pre, long_row.values, long_row.q_pre, long_row.reconstruction)))
    scorer = RandomScorer(seed=1)
    long_scores = scorer.score(kit.build([long_row]))
    short_scores = scorer.score(kit.build([short_row]))
    torch.testing.assert_close(long_scores[..., :1500], short_scores, rtol=0, atol=0)

"""SimLayerKV: the lazy-layer statistic against a float64 loop, and the budget rule on exact cases."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zigzag.budget import SimLayerKV, get_budget, sink_and_recent_mass


def test_mass_on_sinks_and_recent_tokens_matches_a_loop():
    batch, heads, seq = 3, 4, 30
    attention = torch.rand(batch, heads, seq, dtype=torch.float64).softmax(-1)
    valid = torch.ones(batch, seq, dtype=torch.bool)
    valid[1, :7] = False
    valid[2, :26] = False  # 4 tokens: the two ends overlap, each token counts once
    ours = sink_and_recent_mass(attention, valid, n_initial=3, n_recent=5)
    for b in range(batch):
        tokens = [j for j in range(seq) if valid[b, j]]
        counted = set(tokens[:3]) | set(tokens[-5:])
        expected = sum(float(attention[b, h, j]) for h in range(heads) for j in counted) / heads
        assert ours[b].item() == pytest.approx(expected, rel=1e-12)


def test_lazy_layers_keep_sinks_plus_recent_and_the_others_share_the_rest():
    allocator = SimLayerKV(threshold=0.5, n_initial=2, n_recent=8)
    mass = torch.tensor([[0.9, 0.1, 0.6, 0.2]], dtype=torch.float64)
    assert allocator.allocate(torch.tensor([20]), torch.tensor([40]), 4, mass).tolist() == [[10, 30, 10, 30]]
    # A budget below n_initial + n_recent: every layer keeps the average.
    assert allocator.allocate(torch.tensor([5]), torch.tensor([40]), 4, mass).tolist() == [[5, 5, 5, 5]]
    # Three lazy layers, one busy layer full: the lazy cap rises to the least that fits (34).
    mass = torch.tensor([[0.9, 0.9, 0.9, 0.1]], dtype=torch.float64)
    assert allocator.allocate(torch.tensor([35]), torch.tensor([40]), 4, mass).tolist() == [[34, 34, 34, 38]]


@settings(max_examples=200, deadline=None)
@given(
    layers=st.integers(1, 8),
    seq=st.integers(1, 300),
    fraction=st.floats(0, 1),
    lazy=st.lists(st.booleans(), min_size=8, max_size=8),
    recent=st.integers(0, 100),
)
def test_totals_caps_and_lazy_layers_never_above_busy_ones(layers, seq, fraction, lazy, recent):
    allocator = SimLayerKV(threshold=0.5, n_initial=4, n_recent=recent)
    avg = int(seq * fraction)
    mass = torch.tensor([[0.9 if x else 0.1 for x in lazy[:layers]]], dtype=torch.float64)
    budgets = allocator.allocate(torch.tensor([avg]), torch.tensor([seq]), layers, mass)[0]
    assert int(budgets.sum()) == layers * avg
    assert bool((budgets >= 0).all()) and bool((budgets <= seq).all())
    is_lazy = mass[0] > 0.5
    if is_lazy.any() and (~is_lazy).any():
        assert int(budgets[is_lazy].max()) <= int(budgets[~is_lazy].min()) + 1


def test_registry_options_and_errors():
    assert get_budget("simlayerkv+threshold0.7+sink8+recent256+window4") == SimLayerKV(0.7, 8, 256, 4)
    for bad in ({"threshold": 1.5}, {"n_initial": -1}, {"n_recent": 1.5}, {"window": 0}):
        with pytest.raises(ValueError):
            SimLayerKV(**bad)

"""AdaKV head-wise budgets: exact conservation, the alpha floor, caps, and where the tokens go."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zigzag.budget import AdaKV, adakv_head_budgets


@settings(max_examples=150, deadline=None)
@given(
    batch=st.integers(1, 3),
    heads=st.integers(1, 5),
    seq=st.integers(1, 40),
    alpha=st.sampled_from([0.0, 0.2, 0.5, 1.0]),
    data=st.data(),
)
def test_conservation_floor_and_caps(batch, heads, seq, alpha, data):
    pads = [data.draw(st.integers(0, seq - 1)) for _ in range(batch)]
    valid = torch.ones(batch, seq, dtype=torch.bool)
    for b, p in enumerate(pads):
        valid[b, :p] = False
    lengths = valid.sum(-1)
    budget = torch.tensor([data.draw(st.integers(0, int(n))) for n in lengths])
    scores = torch.randn(batch, heads, seq)
    counts = adakv_head_budgets(scores, valid, budget, alpha)
    assert counts.sum(-1).tolist() == (heads * budget).tolist()
    floor = (alpha * budget.double()).floor().long()
    assert bool((counts >= floor[:, None]).all())
    assert bool((counts <= lengths[:, None]).all())
    if alpha == 1.0:
        assert torch.equal(counts, budget[:, None].expand(batch, heads))


def test_a_focused_head_gives_its_share_to_a_spread_head():
    seq = 20
    scores = torch.zeros(1, 2, seq)
    scores[0, 0, :2] = 10.0  # head 0 needs two tokens
    scores[0, 1] = torch.linspace(5.0, 4.0, seq)  # head 1 values many tokens
    counts = adakv_head_budgets(scores, torch.ones(1, seq, dtype=torch.bool), torch.tensor([6]), alpha=0.2)
    assert counts.tolist() == [[2, 10]]  # floor(0.2 * 6) = 1 each, the 10 free slots: 1 to head 0, 9 to head 1
    assert AdaKV().split_heads(scores, torch.ones(1, seq, dtype=torch.bool), torch.tensor([6])).tolist() == [[2, 10]]

"""PyramidKV: linear fall from the first layer to the last, exact totals, caps."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zigzag.budget import BudgetAllocator, Pyramid

SETTINGS = settings(max_examples=120, deadline=None)


@st.composite
def cases(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, int]:
    batch = draw(st.integers(1, 3))
    layers = draw(st.integers(1, 10))
    seq = draw(st.lists(st.integers(0, 400), min_size=batch, max_size=batch))
    avg = [draw(st.integers(0, t)) for t in seq]
    return torch.tensor(avg), torch.tensor(seq), layers


betas = st.sampled_from([1.0, 2.0, 5.0, 20.0, 100.0])


def exact_targets(avg: int, layers: int, beta: float) -> list[Fraction]:
    if layers == 1:
        return [Fraction(avg)]
    low = Fraction(avg) / Fraction(beta)
    high = 2 * avg - low
    return [high - (high - low) * Fraction(l, layers - 1) for l in range(layers)]


@SETTINGS
@given(cases(), betas)
def test_exact_total_bounds_and_falling(case, beta: float) -> None:
    avg, seq, layers = case
    out = Pyramid(beta).allocate(avg, seq, layers)
    assert out.dtype == torch.long and out.shape == (avg.shape[0], layers)
    for b in range(avg.shape[0]):
        row = out[b].tolist()
        assert sum(row) == layers * int(avg[b])
        assert min(row) >= 0 and max(row) <= int(seq[b])
        assert row == sorted(row, reverse=True)


@SETTINGS
@given(case=cases(), beta=betas)
def test_matches_formula_within_one_token(case, beta: float, waterfill_ref) -> None:
    """Against the PyramidKV formula in exact arithmetic, capped at seq_len and water-filled."""
    avg, seq, layers = case
    out = Pyramid(beta).allocate(avg, seq, layers)
    for b in range(avg.shape[0]):
        a, t = int(avg[b]), int(seq[b])
        target = exact_targets(a, layers, beta)
        assert sum(target) == layers * a
        if max(target) <= t:
            for v, e in zip(out[b].tolist(), target):
                assert math.floor(e) <= v <= math.ceil(e)
        ref = waterfill_ref(target, layers * a, [0] * layers, [t] * layers)
        for v, e in zip(out[b].tolist(), ref):
            assert math.floor(e - 1e-9) <= v <= math.ceil(e + 1e-9)


@SETTINGS
@given(cases(), st.data())
def test_smaller_budget_costs_any_layer_at_most_one_token(case, data) -> None:
    """Keep-counts versus the ratio: the weaker property that holds (see the ZigZag test).

    Rounding can take a token from a layer when B_avg grows (Alabama paradox): L=6, T=9,
    B_avg 5 -> 6 gives [9, 8, 6, 4, 2, 1] -> [9, 9, 9, 6, 3, 0]. Never more than one.
    """
    avg, seq, layers = case
    bigger = torch.tensor([data.draw(st.integers(int(a), int(t))) for a, t in zip(avg, seq)])
    small = Pyramid().allocate(avg, seq, layers)
    large = Pyramid().allocate(bigger, seq, layers)
    assert bool((large >= small - 1).all())


def test_hand_example() -> None:
    # B=100, L=5, beta=20: min 5, max 195, step 47.5 -> [195, 147.5, 100, 52.5, 5]; the .5 tie goes
    # to the earlier (larger) layer.
    assert Pyramid().allocate(torch.tensor([100]), torch.tensor([1000]), 5).tolist() == [[195, 148, 100, 52, 5]]


def test_hand_example_with_cap() -> None:
    # B=7, L=5, T=9: targets [13.65, 10.325, 7, 3.675, 0.35]; the first three are capped at 9 and the
    # last two share 8 tokens 3.675 : 0.35 -> [7.30, 0.70] -> [7, 1].
    assert Pyramid().allocate(torch.tensor([7]), torch.tensor([9]), 5).tolist() == [[9, 9, 9, 7, 1]]


def test_single_layer_and_beta_one_are_uniform() -> None:
    assert Pyramid().allocate(torch.tensor([37]), torch.tensor([50]), 1).tolist() == [[37]]
    assert Pyramid(beta=1.0).allocate(torch.tensor([37]), torch.tensor([50]), 6).tolist() == [[37] * 6]


def test_zero_budget_and_full_budget() -> None:
    assert Pyramid().allocate(torch.tensor([0]), torch.tensor([50]), 4).tolist() == [[0] * 4]
    assert Pyramid().allocate(torch.tensor([50]), torch.tensor([50]), 4).tolist() == [[50] * 4]


def test_targets_sum_to_total() -> None:
    t = Pyramid().targets(torch.tensor([100, 13]), 7)
    assert t.shape == (2, 7)
    torch.testing.assert_close(t.sum(dim=-1), torch.tensor([700.0, 91.0], dtype=torch.float64))


def test_protocol_and_flags() -> None:
    p = Pyramid()
    assert isinstance(p, BudgetAllocator)
    assert p.name == "pyramid" and p.needs_lmba is False and p.beta == 20.0
    # lmba is accepted and ignored.
    out = p.allocate(torch.tensor([10]), torch.tensor([20]), 3, torch.rand(1, 3))
    assert out.tolist() == p.allocate(torch.tensor([10]), torch.tensor([20]), 3).tolist()


@pytest.mark.parametrize("beta", [0.5, 0.0, -1.0, float("inf"), float("nan")])
def test_beta_errors(beta: float) -> None:
    with pytest.raises(ValueError, match="beta must be finite and >= 1"):
        Pyramid(beta)


def test_allocate_errors() -> None:
    with pytest.raises(ValueError, match=r"avg_budget must lie in \[0, seq_len\]"):
        Pyramid().allocate(torch.tensor([21]), torch.tensor([20]), 3)
    with pytest.raises(ValueError, match="num_layers must be >= 1"):
        Pyramid().allocate(torch.tensor([2]), torch.tensor([20]), 0)

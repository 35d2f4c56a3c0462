"""ZigZag over layers x KV heads (zigzag_heads): Eq. 6 jointly, exact totals, bounds, per-head LMBA."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.budget.conftest import assert_more_uncertainty_never_fewer_tokens
from zigzag.budget import (
    ZigZag,
    ZigZagHeads,
    get_budget,
    layer_mean_budgets,
    lmba_per_head,
    zigzag_head_budgets,
)

SETTINGS = settings(max_examples=120, deadline=None)

lmba_values = st.one_of(st.integers(0, 9).map(float), st.floats(0.0, 4096.0, allow_subnormal=False))


@st.composite
def cases(draw: st.DrawFn):
    """(avg_budget, seq_len, lmba (batch, L, H))."""
    batch = draw(st.integers(1, 3))
    layers = draw(st.integers(1, 6))
    heads = draw(st.integers(1, 4))
    seq = draw(st.lists(st.integers(0, 300), min_size=batch, max_size=batch))
    avg = [draw(st.integers(0, t)) for t in seq]
    flat = draw(st.lists(lmba_values, min_size=batch * layers * heads, max_size=batch * layers * heads))
    lm = torch.tensor(flat, dtype=torch.float64).reshape(batch, layers, heads)
    return torch.tensor(avg), torch.tensor(seq), lm


@SETTINGS
@given(cases(), st.sampled_from([0.0, 0.2, 0.5, 1.0]))
def test_exact_total_floor_and_cap(case, bound_fraction: float) -> None:
    avg, seq, lm = case
    out = ZigZagHeads(bound_fraction=bound_fraction).allocate(avg, seq, lm.shape[1], lm)
    assert out.dtype == torch.long and out.shape == lm.shape
    layers, heads = lm.shape[1:]
    for b in range(avg.shape[0]):
        a, t = int(avg[b]), int(seq[b])
        assert int(out[b].sum()) == layers * heads * a
        assert int(out[b].min()) >= math.floor(Fraction(str(bound_fraction)) * a)
        assert int(out[b].max()) <= t


@SETTINGS
@given(cases(), st.floats(0.0, 100.0))
def test_equal_lmba_gives_exactly_uniform(case, value: float) -> None:
    avg, seq, lm = case
    out = zigzag_head_budgets(avg, seq, torch.full_like(lm, value))
    assert torch.equal(out, avg[:, None, None].expand_as(out))


@SETTINGS
@given(cases())
def test_more_uncertainty_never_fewer_tokens_across_layers_and_heads(case) -> None:
    avg, seq, lm = case
    out = zigzag_head_budgets(avg, seq, lm)
    for b in range(avg.shape[0]):
        assert_more_uncertainty_never_fewer_tokens(lm[b].flatten().tolist(), out[b].flatten().tolist())


@SETTINGS
@given(cases(), st.randoms(use_true_random=False))
def test_pairs_are_interchangeable(case, rnd) -> None:
    """Eq. 6 runs over (layer, head) pairs jointly: shuffling all pairs shuffles the budgets."""
    avg, seq, lm = case
    batch, layers, heads = lm.shape
    perm = list(range(layers * heads))
    rnd.shuffle(perm)
    out = zigzag_head_budgets(avg, seq, lm).reshape(batch, -1)
    out_p = zigzag_head_budgets(avg, seq, lm.reshape(batch, -1)[:, perm].reshape(batch, layers, heads)).reshape(batch, -1)
    for b in range(batch):
        assert sorted(out_p[b].tolist()) == sorted(out[b].tolist())
        if len(set(lm[b].flatten().tolist())) == layers * heads:
            assert out_p[b].tolist() == out[b, perm].tolist()


@SETTINGS
@given(cases())
def test_one_head_per_layer_is_layer_zigzag(case) -> None:
    avg, seq, lm = case
    one = lm[:, :, :1]
    assert torch.equal(zigzag_head_budgets(avg, seq, one)[..., 0], ZigZag().allocate(avg, seq, lm.shape[1], one[..., 0]))


@SETTINGS
@given(case=cases())
def test_matches_joint_eq6_within_one_token(case, waterfill_ref) -> None:
    avg, seq, lm = case
    out = zigzag_head_budgets(avg, seq, lm)
    batch, layers, heads = lm.shape
    n = layers * heads
    for b in range(batch):
        a, t = int(avg[b]), int(seq[b])
        u = [Fraction(v) for v in lm[b].flatten().tolist()]
        ref = waterfill_ref(u, n * a, [a // 5] * n, [t] * n)
        for v, e in zip(out[b].flatten().tolist(), ref):
            assert math.floor(e - 1e-9) <= v <= math.ceil(e + 1e-9)


@SETTINGS
@given(cases(), st.integers(0, 7), st.sampled_from([None, 1.0, 2.0]), st.sampled_from([0.0, 0.5, 1.0]))
def test_variants_keep_the_contract(case, skip: int, cap, gamma: float) -> None:
    avg, seq, lm = case
    out = ZigZagHeads(skip_layers=skip, max_multiple=cap, gamma=gamma).allocate(avg, seq, lm.shape[1], lm)
    layers, heads = lm.shape[1:]
    for b in range(avg.shape[0]):
        a, t = int(avg[b]), int(seq[b])
        assert int(out[b].sum()) == layers * heads * a
        limit = t if cap is None else min(t, max(a, math.floor(cap * a + 1e-9)))
        assert int(out[b].max()) <= limit and int(out[b].min()) >= a // 5
        assert bool((out[b, :skip] == a).all())
        if gamma == 0.0:
            assert bool((out[b] == a).all())


@SETTINGS
@given(cases())
def test_rows_are_independent(case) -> None:
    avg, seq, lm = case
    out = zigzag_head_budgets(avg, seq, lm)
    for b in range(avg.shape[0]):
        assert torch.equal(out[b : b + 1], zigzag_head_budgets(avg[b : b + 1], seq[b : b + 1], lm[b : b + 1]))


@SETTINGS
@given(cases())
def test_layer_report_is_the_rounded_mean_with_exact_totals(case) -> None:
    avg, seq, lm = case
    heads_b = zigzag_head_budgets(avg, seq, lm)
    layers, heads = lm.shape[1:]
    report = layer_mean_budgets(heads_b)
    assert report.shape == lm.shape[:2] and report.dtype == torch.long
    assert report.sum(-1).tolist() == (layers * avg).tolist()
    mean = heads_b.double().mean(-1)
    assert bool((report >= mean.floor()).all()) and bool((report <= mean.ceil()).all())


def test_layer_report_of_equal_heads_is_their_value() -> None:
    b = torch.tensor([[[4, 4, 4], [7, 7, 7]]])
    assert layer_mean_budgets(b).tolist() == [[4, 7]]
    # sums 10 and 14 over 3 heads: 3.33 and 4.67 -> the larger remainder rounds up; total 8.
    assert layer_mean_budgets(torch.tensor([[[3, 3, 4], [4, 5, 5]]])).tolist() == [[3, 5]]


def test_hand_example() -> None:
    # L=2, H=2, B_avg=10, B_bound=2, LMBA [[1, 1], [1, 5]]: 2 + 8 * 4 * u = [[6, 6], [6, 22]].
    out = zigzag_head_budgets(torch.tensor([10]), torch.tensor([100]), torch.tensor([[[1.0, 1.0], [1.0, 5.0]]]))
    assert out.tolist() == [[[6, 6], [6, 22]]]
    # Capped at T=20: the 2 freed tokens are shared by the other three heads.
    out = zigzag_head_budgets(torch.tensor([10]), torch.tensor([20]), torch.tensor([[[1.0, 1.0], [1.0, 5.0]]]))
    assert out[0, 1, 1] == 20 and int(out.sum()) == 40


def test_measure_group_mass_and_mean() -> None:
    # One KV head with two query heads looking at different tokens: each alone needs 1 token, the
    # group's mean mass needs 2 (tau 0.9: 0.5 + 0.5).
    attn = torch.zeros(1, 2, 6)
    attn[0, 0, 1] = 1.0
    attn[0, 1, 4] = 1.0
    assert ZigZagHeads().measure(attn, None, 1).tolist() == [[2.0]]
    assert ZigZagHeads(group="mean").measure(attn, None, 1).tolist() == [[1.0]]
    # GQA layout: query heads 0, 1 -> KV head 0; 2, 3 -> KV head 1.
    attn4 = torch.softmax(torch.randn(2, 4, 30), dim=-1)
    got = ZigZagHeads().measure(attn4, torch.ones(2, 30, dtype=torch.bool), 2)
    want = lmba_per_head(attn4.reshape(2, 2, 2, 30).mean(2), None, 0.9).double()
    assert torch.equal(got, want)


def test_registry_and_flags() -> None:
    z = get_budget("zigzag_heads")
    assert isinstance(z, ZigZagHeads) and z.needs_lmba and z.granularity == "head" and z.window == 64


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.tensor([5]), torch.tensor([10]), 2, None), "lmba is required"),
        ((torch.tensor([5]), torch.tensor([10]), 2, torch.ones(1, 2)), r"\(batch, num_layers, kv_heads\)"),
        ((torch.tensor([5]), torch.tensor([10]), 3, torch.ones(1, 2, 2)), "num_layers is 3"),
        ((torch.tensor([5]), torch.tensor([10]), 2, -torch.ones(1, 2, 2)), "lmba must be >= 0"),
        ((torch.tensor([11]), torch.tensor([10]), 2, torch.ones(1, 2, 2)), r"avg_budget must lie in \[0, seq_len\]"),
        ((torch.tensor([5, 5]), torch.tensor([10, 10]), 2, torch.ones(1, 2, 2)), r"\(batch, num_layers, kv_heads\)"),
    ],
)
def test_allocate_errors(args, match) -> None:
    with pytest.raises(ValueError, match=match):
        ZigZagHeads().allocate(*args)


@pytest.mark.parametrize("kwargs", [{"group": "sum"}, {"tau": 0.0}, {"window": 0}, {"bound_fraction": 1.5}, {"skip_layers": -1}])
def test_bad_hyperparameters(kwargs) -> None:
    with pytest.raises(ValueError):
        ZigZagHeads(**kwargs)

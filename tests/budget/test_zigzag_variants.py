"""ZigZag design variants (skip_layers, gamma, max_multiple): exact totals, bounds, and what each does."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.budget.conftest import assert_more_uncertainty_never_fewer_tokens
from zigzag.budget import ZigZag

SETTINGS = settings(max_examples=120, deadline=None)


@st.composite
def cases(draw: st.DrawFn):
    batch = draw(st.integers(1, 3))
    layers = draw(st.integers(1, 8))
    seq = draw(st.lists(st.integers(0, 300), min_size=batch, max_size=batch))
    avg = [draw(st.integers(0, t)) for t in seq]
    lm = draw(
        st.lists(
            st.lists(st.one_of(st.integers(0, 9).map(float), st.floats(0.0, 4096.0, allow_subnormal=False)), min_size=layers, max_size=layers),
            min_size=batch,
            max_size=batch,
        )
    )
    return torch.tensor(avg), torch.tensor(seq), layers, torch.tensor(lm, dtype=torch.float64)


variants = st.builds(
    ZigZag,
    skip_layers=st.integers(0, 9),
    gamma=st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0]),
    max_multiple=st.sampled_from([None, 1.0, 1.5, 2.0, 4.0]),
    bound_fraction=st.sampled_from([0.0, 0.2, 0.5]),
)


@SETTINGS
@given(cases(), variants)
def test_exact_total_floor_and_caps(case, z: ZigZag) -> None:
    avg, seq, layers, lm = case
    out = z.allocate(avg, seq, layers, lm)
    assert out.dtype == torch.long and out.shape == (avg.shape[0], layers)
    for b in range(avg.shape[0]):
        a, t = int(avg[b]), int(seq[b])
        cap = t if z.max_multiple is None else min(t, max(a, math.floor(z.max_multiple * a + 1e-9)))
        assert int(out[b].sum()) == layers * a
        assert int(out[b].min()) >= math.floor(z.bound_fraction * a + 1e-9)
        assert int(out[b].max()) <= cap
        assert out[b, : z.skip_layers].tolist() == [a] * min(z.skip_layers, layers)


@SETTINGS
@given(cases(), st.integers(0, 9))
def test_skipped_layers_leave_eq6_to_the_others(case, skip: int) -> None:
    avg, seq, layers, lm = case
    out = ZigZag(skip_layers=skip).allocate(avg, seq, layers, lm)
    if skip < layers:
        rest = ZigZag().allocate(avg, seq, layers - skip, lm[:, skip:])
        assert torch.equal(out[:, skip:], rest)


@SETTINGS
@given(cases())
def test_gamma_zero_is_uniform_and_gamma_one_is_the_paper(case) -> None:
    avg, seq, layers, lm = case
    assert torch.equal(ZigZag(gamma=0.0).allocate(avg, seq, layers, lm), avg[:, None].expand(-1, layers))
    assert torch.equal(ZigZag(gamma=1.0).allocate(avg, seq, layers, lm), ZigZag().allocate(avg, seq, layers, lm))


@SETTINGS
@given(cases(), st.sampled_from([0.25, 0.5, 2.0]))
def test_gamma_keeps_the_order_of_uncertainty(case, gamma: float) -> None:
    avg, seq, layers, lm = case
    out = ZigZag(gamma=gamma).allocate(avg, seq, layers, lm)
    powered = lm.pow(gamma)
    for b in range(avg.shape[0]):
        # Only orders that float64 can still tell apart after the power (LMBA ** 2 of 1e-200 is 0).
        assert_more_uncertainty_never_fewer_tokens(lm[b].tolist(), out[b].tolist(), tie_slack=None, separable=powered[b].tolist())


def test_hand_examples() -> None:
    avg, seq, lm = torch.tensor([10]), torch.tensor([100]), torch.tensor([[50.0, 1.0, 2.0, 3.0]])
    # Eq. 6: B_bound 2, 2 + 8 * 4 * [50, 1, 2, 3] / 56 = [30.57, 2.57, 3.14, 3.71]; largest remainders
    # 0.71, then 0.57 (tie: the larger LMBA) get the 2 units left.
    assert ZigZag().allocate(avg, seq, 4, lm).tolist() == [[31, 2, 3, 4]]
    # The uniform first layer keeps 10; the other three share 30 as [6, 10, 14] (2 + 8 * 3 * u).
    assert ZigZag(skip_layers=1).allocate(avg, seq, 4, lm).tolist() == [[10, 6, 10, 14]]
    # Cap 2 x B_avg = 20: the 10.57 freed tokens go to the others in proportion to LMBA.
    capped = ZigZag(max_multiple=2.0).allocate(avg, seq, 4, lm)
    assert capped[0, 0] == 20 and int(capped.sum()) == 40
    # Tempered: weights sqrt(LMBA) move less of the budget towards layer 0.
    tempered = ZigZag(gamma=0.5).allocate(avg, seq, 4, lm)
    assert 10 < int(tempered[0, 0]) < 31 and int(tempered.sum()) == 40


@pytest.mark.parametrize(
    "kwargs", [{"skip_layers": -1}, {"skip_layers": 1.5}, {"gamma": -0.5}, {"gamma": float("nan")}, {"max_multiple": 0.9}, {"max_multiple": float("inf")}]
)
def test_bad_options(kwargs) -> None:
    with pytest.raises(ValueError):
        ZigZag(**kwargs)

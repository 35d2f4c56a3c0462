"""ZigZagKV: Eq. 6 budgets (exact totals, floors, caps, order) and the LMBA statistic."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.budget.conftest import assert_more_uncertainty_never_fewer_tokens
from zigzag.budget import BudgetAllocator, ZigZag, lmba, lmba_per_head

SETTINGS = settings(max_examples=120, deadline=None)

lmba_values = st.one_of(
    st.integers(0, 9).map(float),  # ties
    st.floats(0.0, 4096.0, allow_nan=False, allow_infinity=False, allow_subnormal=False),
)


@st.composite
def cases(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """(avg_budget, seq_len, num_layers, lmba) for a small batch."""
    batch = draw(st.integers(1, 3))
    layers = draw(st.integers(1, 8))
    seq = draw(st.lists(st.integers(0, 300), min_size=batch, max_size=batch))
    avg = [draw(st.integers(0, t)) for t in seq]
    lm = draw(st.lists(st.lists(lmba_values, min_size=layers, max_size=layers), min_size=batch, max_size=batch))
    return torch.tensor(avg), torch.tensor(seq), layers, torch.tensor(lm, dtype=torch.float64)


bound_fractions = st.sampled_from([0.0, 0.1, 0.2, 0.25, 0.3, 0.5, 0.7, 1.0])


def exact_bound(avg: int, bound_fraction: float) -> int:
    """floor(bound_fraction * avg) with the decimal meaning of bound_fraction."""
    return math.floor(Fraction(str(bound_fraction)) * avg)


@SETTINGS
@given(cases(), bound_fractions)
def test_exact_total_floor_and_cap(case, bound_fraction: float) -> None:
    avg, seq, layers, lm = case
    out = ZigZag(bound_fraction=bound_fraction).allocate(avg, seq, layers, lm)
    assert out.dtype == torch.long and out.shape == (avg.shape[0], layers)
    for b in range(avg.shape[0]):
        a, t = int(avg[b]), int(seq[b])
        assert int(out[b].sum()) == layers * a
        assert int(out[b].min()) >= exact_bound(a, bound_fraction)
        assert int(out[b].max()) <= t


@SETTINGS
@given(cases(), st.floats(0.0, 100.0))
def test_equal_lmba_gives_exactly_uniform(case, value: float) -> None:
    avg, seq, layers, lm = case
    out = ZigZag().allocate(avg, seq, layers, torch.full_like(lm, value))
    assert torch.equal(out, avg[:, None].expand_as(out))


@SETTINGS
@given(cases())
def test_more_uncertainty_never_fewer_tokens(case) -> None:
    avg, seq, layers, lm = case
    out = ZigZag().allocate(avg, seq, layers, lm)
    for b in range(avg.shape[0]):
        assert_more_uncertainty_never_fewer_tokens(lm[b].tolist(), out[b].tolist())


@SETTINGS
@given(cases(), st.randoms(use_true_random=False))
def test_layer_order_does_not_matter(case, rnd) -> None:
    avg, seq, layers, lm = case
    perm = list(range(layers))
    rnd.shuffle(perm)
    out = ZigZag().allocate(avg, seq, layers, lm)
    out_p = ZigZag().allocate(avg, seq, layers, lm[:, perm])
    for b in range(avg.shape[0]):
        assert sorted(out_p[b].tolist()) == sorted(out[b].tolist())
        if len(set(lm[b].tolist())) == layers:
            assert out_p[b].tolist() == out[b, perm].tolist()


@SETTINGS
@given(case=cases())
def test_matches_eq6_within_one_token(case, waterfill_ref) -> None:
    """Against Eq. 6 in exact arithmetic (B_bound = floor(0.2 B_avg)), capped and water-filled."""
    avg, seq, layers, lm = case
    out = ZigZag().allocate(avg, seq, layers, lm)
    for b in range(avg.shape[0]):
        a, t = int(avg[b]), int(seq[b])
        bound = a // 5
        u = [Fraction(v) for v in lm[b].tolist()]
        if sum(u) > 0:
            eq6 = [bound + (a - bound) * layers * ui / sum(u) for ui in u]
            if max(eq6) <= t:
                for v, e in zip(out[b].tolist(), eq6):
                    assert math.floor(e) <= v <= math.ceil(e)
        ref = waterfill_ref(u, layers * a, [bound] * layers, [t] * layers)
        for v, e in zip(out[b].tolist(), ref):
            assert math.floor(e - 1e-9) <= v <= math.ceil(e + 1e-9)


@SETTINGS
@given(cases())
def test_rows_are_independent(case) -> None:
    avg, seq, layers, lm = case
    out = ZigZag().allocate(avg, seq, layers, lm)
    for b in range(avg.shape[0]):
        assert torch.equal(out[b : b + 1], ZigZag().allocate(avg[b : b + 1], seq[b : b + 1], layers, lm[b : b + 1]))


@SETTINGS
@given(cases(), st.data())
def test_smaller_budget_costs_any_layer_at_most_one_token(case, data) -> None:
    """Keep-counts versus the compression ratio: the weaker property that holds.

    The continuous Eq. 6 budgets never decrease when B_avg grows, but largest-remainder rounding can
    (the Alabama paradox): e.g. L=6, T=39, LMBA [3, 1, 4, 7, 20, 19], B_avg 16 -> 17 takes layer 1 from
    5 to 4 tokens. Rounding stays within 1 of the continuous budget, so no layer ever loses more than
    one token when B_avg grows (equivalently: a smaller B_avg gives no layer more than one extra token).
    """
    avg, seq, layers, lm = case
    bigger = torch.tensor([data.draw(st.integers(int(a), int(t))) for a, t in zip(avg, seq)])
    small = ZigZag().allocate(avg, seq, layers, lm)
    large = ZigZag().allocate(bigger, seq, layers, lm)
    assert bool((large >= small - 1).all())


def test_all_zero_lmba_gives_uniform() -> None:
    out = ZigZag().allocate(torch.tensor([7, 0]), torch.tensor([10, 3]), 4, torch.zeros(2, 4))
    assert out.tolist() == [[7] * 4, [0] * 4]


# Hand-computed Eq. 6 examples.


def test_eq6_hand_example() -> None:
    # L=3, B_avg=10, B_bound=2, u = [1, 2, 3] / 6: 2 + 8 * 3 * u = [6, 10, 14].
    out = ZigZag().allocate(torch.tensor([10]), torch.tensor([100]), 3, torch.tensor([[1.0, 2.0, 3.0]]))
    assert out.tolist() == [[6, 10, 14]]


def test_eq6_hand_example_with_cap() -> None:
    # Same with T=12: 14 -> 12, the 2 freed tokens go 1:2 -> [6.67, 11.33, 12] -> [7, 11, 12].
    out = ZigZag().allocate(torch.tensor([10]), torch.tensor([12]), 3, torch.tensor([[1.0, 2.0, 3.0]]))
    assert out.tolist() == [[7, 11, 12]]


def test_eq6_hand_example_floor_of_bound() -> None:
    # B_avg=7: B_bound = floor(1.4) = 1; 1 + (7 - 1) * 4 * [1, 1, 1, 5] / 8 = [4, 4, 4, 16].
    out = ZigZag().allocate(torch.tensor([7]), torch.tensor([100]), 4, torch.tensor([[1.0, 1.0, 1.0, 5.0]]))
    assert out.tolist() == [[4, 4, 4, 16]]


def test_bound_fraction_one_is_uniform_and_zero_is_pure_proportional() -> None:
    lm = torch.tensor([[1.0, 3.0]])
    assert ZigZag(bound_fraction=1.0).allocate(torch.tensor([8]), torch.tensor([8]), 2, lm).tolist() == [[8, 8]]
    assert ZigZag(bound_fraction=0.0).allocate(torch.tensor([8]), torch.tensor([16]), 2, lm).tolist() == [[4, 12]]


def test_bound_uses_decimal_meaning() -> None:
    assert ZigZag(bound_fraction=0.3).bound(torch.tensor([10, 20, 30, 9])).tolist() == [3, 6, 9, 2]


def test_protocol_and_flags() -> None:
    z = ZigZag()
    assert isinstance(z, BudgetAllocator)
    assert z.name == "zigzag" and z.needs_lmba is True
    assert (z.tau, z.bound_fraction) == (0.9, 0.2)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.tensor([5]), torch.tensor([10]), 2, None), "lmba is required"),
        ((torch.tensor([5]), torch.tensor([10]), 2, torch.ones(1, 3)), r"lmba must have shape \(batch, num_layers\)"),
        ((torch.tensor([5]), torch.tensor([10]), 2, torch.tensor([[1.0, -1.0]])), "lmba must be >= 0"),
        ((torch.tensor([5]), torch.tensor([10]), 2, torch.tensor([[1.0, float("nan")]])), "lmba must be finite"),
        ((torch.tensor([11]), torch.tensor([10]), 2, torch.ones(1, 2)), r"avg_budget must lie in \[0, seq_len\]"),
        ((torch.tensor([-1]), torch.tensor([10]), 2, torch.ones(1, 2)), r"avg_budget must lie in \[0, seq_len\]"),
        ((torch.tensor([5.0]), torch.tensor([10]), 2, torch.ones(1, 2)), "avg_budget must have an integer dtype"),
        ((torch.tensor([5, 5]), torch.tensor([10]), 2, torch.ones(2, 2)), "seq_len must have the shape"),
        ((torch.tensor([[5]]), torch.tensor([10]), 2, torch.ones(1, 2)), r"avg_budget must have shape \(batch,\)"),
        ((torch.tensor([5]), torch.tensor([10]), 0, torch.ones(1, 0)), "num_layers must be >= 1"),
    ],
)
def test_allocate_errors(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ZigZag().allocate(*args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"tau": 0.0}, "tau must lie in"), ({"tau": 1.5}, "tau must lie in"), ({"bound_fraction": -0.1}, "bound_fraction"),
     ({"bound_fraction": 1.2}, "bound_fraction")],
)
def test_config_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ZigZag(**kwargs)


# LMBA.


def lmba_reference(attention: torch.Tensor, valid: torch.Tensor | None, tau: float) -> list[list[int]]:
    """Plain loops in float64, straight from the definition (with the documented 1e-9 slack)."""
    batch, heads, seq = attention.shape
    out = []
    for b in range(batch):
        row = []
        for h in range(heads):
            masses = [float(attention[b, h, i]) for i in range(seq) if valid is None or bool(valid[b, i])]
            if tau == 1.0:
                row.append(sum(1 for m in masses if m > 0))
                continue
            masses.sort(reverse=True)
            total = sum(masses)
            if total <= 0:
                row.append(0)
                continue
            acc, k = 0.0, 0
            while acc < tau * total * (1 - 1e-9):
                acc += masses[k]
                k += 1
            row.append(k)
        out.append(row)
    return out


@st.composite
def attentions(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax-like masses from flat to peaked, left padding, some heads or tokens with zero mass."""
    batch, heads, seq = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 40))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([0.0, 0.5, 2.0, 8.0]))
    att = torch.softmax(torch.randn(batch, heads, seq, generator=gen, dtype=torch.float64) * scale, dim=-1)
    if draw(st.booleans()):
        att = att * (torch.rand(batch, heads, seq, generator=gen) > 0.3)
    if draw(st.booleans()):
        att[:, 0] = 0.0
    valid = None
    if draw(st.booleans()):
        pad = torch.randint(0, seq + 1, (batch,), generator=gen)
        valid = torch.arange(seq)[None, :] >= pad[:, None]
        if draw(st.booleans()):
            att = att * valid[:, None, :]  # the pipeline's case: padding holds no mass
    return att.to(draw(st.sampled_from([torch.float32, torch.float64]))), valid


taus = st.one_of(st.sampled_from([0.5, 0.9, 0.95, 0.99, 1.0]), st.floats(0.01, 1.0, exclude_min=False))


@settings(max_examples=200, deadline=None)
@given(attentions(), taus)
def test_lmba_matches_reference_loop(att_valid, tau: float) -> None:
    att, valid = att_valid
    per_head = lmba_per_head(att, valid, tau)
    assert per_head.dtype == torch.long
    assert per_head.tolist() == lmba_reference(att.to(torch.float64), valid, tau)
    mean = lmba(att, valid, tau)
    assert mean.dtype == torch.float64 and mean.shape == (att.shape[0],)
    torch.testing.assert_close(mean, per_head.to(torch.float64).mean(dim=-1))


@SETTINGS
@given(attentions(), taus, st.randoms(use_true_random=False))
def test_lmba_ignores_token_order(att_valid, tau: float, rnd) -> None:
    att, _ = att_valid
    perm = list(range(att.shape[-1]))
    rnd.shuffle(perm)
    assert torch.equal(lmba_per_head(att[..., perm], None, tau), lmba_per_head(att, None, tau))


@SETTINGS
@given(attentions(), st.floats(0.05, 0.95), st.floats(0.05, 0.95))
def test_lmba_monotone_in_tau(att_valid, t1: float, t2: float) -> None:
    att, valid = att_valid
    lo, hi = min(t1, t2), max(t1, t2)
    assert bool((lmba_per_head(att, valid, lo) <= lmba_per_head(att, valid, hi)).all())


@SETTINGS
@given(st.integers(1, 200), st.integers(1, 20), st.integers(0, 30), st.sampled_from([1.0, "prob"]))
def test_lmba_uniform_attention_is_ceil_tau_n(n: int, q: int, pad: int, mass) -> None:
    """Uniform mass over n valid tokens: ceil(tau * n), with tau = p / q read as the exact fraction."""
    for p in range(1, q + 1):
        tau = p / q
        value = 1.0 if mass == 1.0 else 1.0 / n
        att = torch.cat([torch.full((1, 2, pad), 0.7), torch.full((1, 2, n), value)], dim=-1)
        valid = torch.arange(pad + n)[None, :] >= pad
        expected = math.ceil(Fraction(p, q) * n)
        assert lmba_per_head(att, valid, tau).tolist() == [[expected, expected]]


@SETTINGS
@given(st.integers(1, 50), st.floats(0.01, 1.0), st.integers(0, 49))
def test_lmba_one_hot_is_one(seq: int, tau: float, hot: int) -> None:
    att = torch.zeros(1, 3, seq)
    att[0, :, hot % seq] = 0.25
    assert lmba(att, None, tau).tolist() == [1.0]


def test_lmba_tau_one_counts_nonzero_mass() -> None:
    att = torch.tensor([[[0.5, 0.0, 1e-30, 0.5], [0.0, 0.0, 0.0, 0.0]]], dtype=torch.float64)
    # The 1e-30 token cannot change a float sum, but it has mass: tau=1 counts it.
    assert lmba_per_head(att, None, 1.0).tolist() == [[3, 0]]
    assert lmba_per_head(att, None, 0.999).tolist() == [[2, 0]]


def test_lmba_edge_cases() -> None:
    assert lmba_per_head(torch.zeros(2, 3, 0), None, 0.9).tolist() == [[0, 0, 0], [0, 0, 0]]
    att = torch.tensor([[[0.95, 0.025, 0.025]]])
    valid = torch.tensor([[False, True, True]])
    # The masked position is ignored even though it holds most of the mass here.
    assert lmba_per_head(att, valid, 0.9).tolist() == [[2]]
    assert lmba_per_head(att, None, 0.9).tolist() == [[1]]
    assert lmba_per_head(att.to(torch.bfloat16), None, 0.9).tolist() == [[1]]
    assert lmba(torch.tensor([[[1.0, 0.0], [0.5, 0.5]]]), None, 0.9).tolist() == [1.5]
    assert ZigZag(tau=0.5).measure(torch.tensor([[[0.4, 0.3, 0.3]]])).tolist() == [2.0]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.rand(2, 3), None, 0.9), r"shape \(batch, heads, seq\)"),
        ((torch.ones(1, 1, 3, dtype=torch.long), None, 0.9), "floating-point"),
        ((-torch.rand(1, 1, 3), None, 0.9), "attention must be >= 0"),
        ((torch.full((1, 1, 3), float("nan")), None, 0.9), "finite"),
        ((torch.rand(1, 1, 3), torch.ones(1, 4, dtype=torch.bool), 0.9), r"valid must have shape"),
        ((torch.rand(1, 1, 3), torch.ones(1, 3), 0.9), "valid must be a bool tensor"),
        ((torch.rand(1, 1, 3), None, 0.0), "tau must lie in"),
        ((torch.rand(1, 1, 3), None, 1.01), "tau must lie in"),
        ((torch.rand(1, 0, 3), None, 0.9), "at least one head"),
    ],
)
def test_lmba_errors(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        lmba(*args)

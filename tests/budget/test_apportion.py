"""apportion: exact totals, bounds, proportionality (against an exact rational reference), ties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from zigzag.budget import apportion

SETTINGS = settings(max_examples=150, deadline=None)

weight_values = st.one_of(
    st.integers(0, 12).map(float),  # many exact ties and zeros
    st.floats(0.0, 1.0e3, allow_nan=False, allow_infinity=False, allow_subnormal=False),
)


@st.composite
def problems(draw: st.DrawFn, common_bounds: bool = False) -> tuple[list[float], int, list[int], list[int]]:
    """A feasible problem: weights, total, lower, upper (1-D)."""
    n = draw(st.integers(1, 9))
    weights = draw(st.lists(weight_values, min_size=n, max_size=n))
    if common_bounds:
        lo = draw(st.integers(0, 20))
        hi = lo + draw(st.integers(0, 40))
        lower, upper = [lo] * n, [hi] * n
    else:
        lower = draw(st.lists(st.integers(-5, 20), min_size=n, max_size=n))
        upper = [v + draw(st.integers(0, 40)) for v in lower]
    total = draw(st.integers(sum(lower), sum(upper)))
    return weights, total, lower, upper


def run(weights: list[float], total: int, lower: list[int], upper: list[int]) -> torch.Tensor:
    return apportion(
        torch.tensor(weights, dtype=torch.float64), total, torch.tensor(lower), torch.tensor(upper)
    )


@SETTINGS
@given(problems())
def test_exact_total_and_bounds(problem) -> None:
    weights, total, lower, upper = problem
    out = run(*problem)
    assert out.dtype == torch.long and out.shape == (len(weights),)
    assert int(out.sum()) == total
    assert all(lo <= v <= hi for lo, v, hi in zip(lower, out.tolist(), upper))


@SETTINGS
@given(problem=problems())
# A tiny weight left alone after the others are capped must still take everything that is left.
@example(problem=([0.0, 1.5e-300, 0.0, 1.0], 8, [0, 0, 0, 0], [0, 8, 1, 0]))
def test_within_one_of_exact_waterfill_target(problem, waterfill_ref) -> None:
    """floor(x*) <= x <= ceil(x*), x* the exact water-filling target (1e-9 slack for float rounding)."""
    target = waterfill_ref(*problem)
    for v, t in zip(run(*problem).tolist(), target):
        assert math.floor(t - 1e-9) <= v <= math.ceil(t + 1e-9)


@SETTINGS
@given(problem=problems())
def test_largest_remainder(problem, waterfill_ref) -> None:
    """An entry rounded up never has a clearly smaller fractional part than one rounded down with room."""
    weights, total, lower, upper = problem
    target = [float(t) for t in waterfill_ref(*problem)]
    out = run(*problem).tolist()
    up = [t - math.floor(t) for v, t in zip(out, target) if v > math.floor(t) + 0.5]
    down = [t - math.floor(t) for v, t, hi in zip(out, target, upper) if v == math.floor(t) and v < hi]
    if up and down:
        assert min(up) >= max(down) - 1e-9


@SETTINGS
@given(problems(), st.randoms(use_true_random=False))
def test_permutation_equivariant(problem, rnd) -> None:
    weights, total, lower, upper = problem
    perm = list(range(len(weights)))
    rnd.shuffle(perm)
    out = run(*problem)
    out_p = run([weights[i] for i in perm], total, [lower[i] for i in perm], [upper[i] for i in perm])
    if len(set(weights)) == len(weights):
        assert out_p.tolist() == out[perm].tolist()


@SETTINGS
@given(problems(common_bounds=True), st.randoms(use_true_random=False))
def test_permutation_same_multiset_with_common_bounds(problem, rnd) -> None:
    """With shared bounds equal weights are interchangeable, so the multiset never depends on order."""
    weights, total, lower, upper = problem
    perm = list(range(len(weights)))
    rnd.shuffle(perm)
    out = run(*problem)
    out_p = run([weights[i] for i in perm], total, lower, upper)
    assert sorted(out_p.tolist()) == sorted(out.tolist())
    if len(set(weights)) == len(weights):
        assert out_p.tolist() == out[perm].tolist()


@SETTINGS
@given(problems(common_bounds=True))
def test_monotone_in_weight_with_common_bounds(problem) -> None:
    weights, *_ = problem
    out = run(*problem).tolist()
    for i, wi in enumerate(weights):
        for j, wj in enumerate(weights):
            if wi > wj:
                assert out[i] >= out[j]
            if wi == wj:
                assert abs(out[i] - out[j]) <= 1


@SETTINGS
@given(st.integers(1, 9), st.integers(0, 50), st.floats(0.0, 10.0))
def test_equal_weights_spread_evenly(n: int, total: int, w: float) -> None:
    out = apportion(torch.full((n,), w), total)
    assert out.max() - out.min() <= 1 and int(out.sum()) == total
    # Leftover units go to the lowest indices (equal remainders, equal weights).
    assert out.tolist() == sorted(out.tolist(), reverse=True)


@SETTINGS
@given(st.lists(problems(), min_size=1, max_size=4).filter(lambda ps: len({len(p[0]) for p in ps}) == 1))
def test_batch_rows_are_independent(batch) -> None:
    weights = torch.tensor([p[0] for p in batch], dtype=torch.float64)
    total = torch.tensor([p[1] for p in batch])
    lower = torch.tensor([p[2] for p in batch])
    upper = torch.tensor([p[3] for p in batch])
    out = apportion(weights, total, lower, upper)
    assert out.shape == weights.shape
    for b, p in enumerate(batch):
        assert out[b].tolist() == run(*p).tolist()


@SETTINGS
@given(problems())
def test_infeasible_inputs_raise(problem) -> None:
    weights, total, lower, upper = problem
    w = torch.tensor(weights)
    with pytest.raises(ValueError, match=r"sum\(lower\)"):
        apportion(w, sum(lower) - 1, torch.tensor(lower), torch.tensor(upper))
    with pytest.raises(ValueError, match=r"sum\(upper\)"):
        apportion(w, sum(upper) + 1, torch.tensor(lower), torch.tensor(upper))


# Hand-computed examples.


def test_proportional_without_bounds() -> None:
    assert apportion(torch.tensor([1.0, 2.0, 3.0]), 12).tolist() == [2, 4, 6]


def test_floor_then_proportional_share() -> None:
    # 2 + 24 * [1, 2, 3] / 6 = [6, 10, 14] (ZigZagKV Eq. 6, L=3, B_avg=10, B_bound=2).
    assert apportion(torch.tensor([1.0, 2.0, 3.0]), 30, 2, 100).tolist() == [6, 10, 14]


def test_cap_frees_units_for_the_others() -> None:
    # 14 is cut to 12; the 2 freed units go 1:2 -> [6 + 2/3, 10 + 4/3, 12]; largest remainder -> [7, 11, 12].
    assert apportion(torch.tensor([1.0, 2.0, 3.0]), 30, 2, 12).tolist() == [7, 11, 12]


def test_cascading_caps() -> None:
    # [1, 1, 8] over 20 with cap 9: 16 -> 9, then [5.5, 5.5] -> cap not hit; tie broken by index.
    assert apportion(torch.tensor([1.0, 1.0, 8.0]), 20, 0, 9).tolist() == [6, 5, 9]
    # With caps [3, 9, 9]: first capped later at 3 after the 8 is capped: [3, 8, 9].
    assert apportion(torch.tensor([1.0, 1.0, 8.0]), 20, 0, torch.tensor([3, 9, 9])).tolist() == [3, 8, 9]


def test_largest_remainder_tie_goes_to_larger_weight() -> None:
    # Targets [1.5, 4.5, 3.0] (weights 1, 3, 2 over 9): both .5, the weight-3 entry wins.
    assert apportion(torch.tensor([1.0, 3.0, 2.0]), 9).tolist() == [1, 5, 3]
    assert apportion(torch.tensor([3.0, 1.0, 2.0]), 9).tolist() == [5, 1, 3]


def test_all_zero_weights_spread_evenly() -> None:
    assert apportion(torch.zeros(3), 10).tolist() == [4, 3, 3]
    assert apportion(torch.zeros(3), 10, torch.tensor([5, 0, 0])).tolist() == [7, 2, 1]


def test_zero_weights_take_the_rest_when_the_others_are_capped() -> None:
    assert apportion(torch.tensor([1.0, 0.0, 0.0]), 10, 0, 4).tolist() == [4, 3, 3]


def test_tight_totals() -> None:
    w = torch.tensor([5.0, 1.0, 2.0])
    assert apportion(w, 6, torch.tensor([1, 2, 3]), 10).tolist() == [1, 2, 3]
    assert apportion(w, 15, 0, torch.tensor([4, 5, 6])).tolist() == [4, 5, 6]


def test_large_totals_stay_exact() -> None:
    w = torch.rand(80, dtype=torch.float64)
    total = 80 * 131_072 // 2
    out = apportion(w, total, 26_214, 131_072)
    assert int(out.sum()) == total and int(out.min()) >= 26_214 and int(out.max()) <= 131_072


def test_scalar_total_broadcasts_over_batch_and_empty_rows() -> None:
    out = apportion(torch.tensor([[1.0, 1.0], [3.0, 1.0]]), 8)
    assert out.tolist() == [[4, 4], [6, 2]]
    assert apportion(torch.zeros(0), 0).shape == (0,)


def test_extreme_weights_keep_their_ratios() -> None:
    f64 = torch.float64
    assert apportion(torch.tensor([1e305, 3e305, 0.0], dtype=f64), 10**7).tolist() == [2_500_000, 7_500_000, 0]
    assert apportion(torch.tensor([1e-310, 3e-310], dtype=f64), 8).tolist() == [2, 6]
    assert apportion(torch.tensor([5e-324, 1.5e-323], dtype=f64), 8).tolist() == [2, 6]
    assert apportion(torch.tensor([1.7e308, 1.7e308, 5e-324], dtype=f64), 9).tolist() == [5, 4, 0]


def test_float32_and_integer_weights_accepted() -> None:
    assert apportion(torch.tensor([1, 3]), 8).tolist() == [2, 6]
    assert apportion(torch.tensor([1.0, 3.0], dtype=torch.float32), 8).tolist() == [2, 6]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weights": torch.tensor([1.0, -1.0]), "total": 2}, "weights must be >= 0"),
        ({"weights": torch.tensor([1.0, float("nan")]), "total": 2}, "finite"),
        ({"weights": torch.tensor([1.0, float("inf")]), "total": 2}, "finite"),
        ({"weights": torch.ones(2, 2, 2), "total": 2}, "shape"),
        ({"weights": torch.ones(2), "total": torch.tensor(2.0)}, "total must have an integer dtype"),
        ({"weights": torch.ones(2, 3), "total": torch.tensor([1, 2, 3])}, "total must"),
        ({"weights": torch.ones(2), "total": 4, "lower": torch.tensor([1, 2, 3])}, "lower must"),
        ({"weights": torch.ones(2), "total": 4, "lower": 3, "upper": 2}, "lower must be <= upper"),
        ({"weights": torch.ones(2), "total": 5, "lower": 3}, r"sum\(lower\) <= total"),
        ({"weights": torch.ones(2), "total": 5, "upper": 2}, r"sum\(upper\) >= total"),
        ({"weights": torch.ones(2, 2), "total": torch.tensor([4, 5]), "upper": 2}, "row 1"),
    ],
)
def test_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        apportion(**kwargs)


def test_type_errors() -> None:
    with pytest.raises(TypeError, match="weights"):
        apportion([1.0, 2.0], 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="total"):
        apportion(torch.ones(2), 3.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="total"):
        apportion(torch.ones(2), True)  # type: ignore[arg-type]


def test_equal_weights_exact_uniform_when_divisible() -> None:
    for n in range(1, 40):
        for w in (0.1, 1.0 / 3.0, 7.0, 1e-12):
            out = apportion(torch.full((n,), w, dtype=torch.float64), n * 17, 3, 40)
            assert out.tolist() == [17] * n


@pytest.mark.parametrize("large", [1.0, 10.0, 1e-300, 1e200])
def test_a_subnormal_weight_keeps_its_share_when_the_larger_is_capped(large):
    # Exact arithmetic: the capped entry takes 8, the zero weight nothing, the tiny one the rest.
    tiny = 5e-324
    got = apportion(torch.tensor([0.0, large, tiny], dtype=torch.float64), 12, 0, 8).tolist()
    assert got == [0, 8, 4]

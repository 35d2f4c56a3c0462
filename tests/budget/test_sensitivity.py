"""Sensitivity budgets against an independent float64 reference of their rule, and their guarantees."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zigzag.budget import Sensitivity, get_budget


def reference(weights: list[float], avg: int, seq: int, bound_fraction: float, gamma: float) -> list[float]:
    """Continuous budgets: floor + proportional share, layers over the cap fixed at it and the rest
    re-shared, by plain iteration in float64."""
    L = len(weights)
    floor = int(bound_fraction * avg)
    w = [x**gamma if gamma else 1.0 for x in weights]
    if sum(w) == 0:
        w = [1.0] * L
    capped: set[int] = set()
    while True:
        free = [i for i in range(L) if i not in capped]
        left = L * avg - seq * len(capped) - floor * len(free)
        total_w = sum(w[i] for i in free)
        x = {i: floor + left * w[i] / total_w if total_w else floor + left / len(free) for i in free}
        over = [i for i in free if x[i] > seq]
        if not over:
            return [seq if i in capped else x[i] for i in range(L)]
        capped |= set(over)


@settings(max_examples=60, deadline=None)
@given(
    weights=st.lists(st.floats(0.0, 10.0), min_size=2, max_size=12),
    seq=st.integers(8, 400),
    frac=st.floats(0.0, 1.0),
    bound=st.sampled_from([0.0, 0.2, 0.5, 1.0]),
    gamma=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
)
def test_matches_reference_within_one_token(weights, seq, frac, bound, gamma):
    avg = int(frac * seq)
    out = Sensitivity(weights=tuple(weights), bound_fraction=bound, gamma=gamma).allocate(avg, seq, len(weights))[0]
    ref = reference(weights, avg, seq, bound, gamma)
    assert int(out.sum()) == len(weights) * avg
    assert all(abs(int(o) - r) < 1 + 1e-6 for o, r in zip(out, ref)), (out.tolist(), ref)
    assert int(out.min()) >= int(bound * avg) and int(out.max()) <= seq
    order = sorted(range(len(weights)), key=lambda i: weights[i])
    assert all(out[a] <= out[b] for a, b in itertools.pairwise(order) if weights[a] < weights[b])


def test_uniform_limits():
    w = (0.1, 5.0, 2.0, 0.0)
    for allocator in (
        Sensitivity(weights=w, bound_fraction=1.0),
        Sensitivity(weights=w, gamma=0.0),
        Sensitivity(weights=(0.0,) * 4),
    ):
        assert allocator.allocate(torch.tensor([37]), torch.tensor([90]), 4).tolist() == [[37] * 4]


def test_batch_rows_are_independent():
    allocator = Sensitivity(weights=(1.0, 2.0, 3.0), bound_fraction=0.2)
    both = allocator.allocate(torch.tensor([10, 50]), torch.tensor([20, 60]), 3)
    assert both[0].tolist() == allocator.allocate(10, 20, 3)[0].tolist()
    assert both[1].tolist() == allocator.allocate(50, 60, 3)[0].tolist()


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="calibrated profile"):
        Sensitivity()
    with pytest.raises(ValueError, match="finite"):
        Sensitivity(weights=(1.0, float("nan")))
    with pytest.raises(ValueError, match="finite"):
        Sensitivity(weights=(1.0, -1.0))
    with pytest.raises(ValueError, match="bound_fraction"):
        Sensitivity(weights=(1.0,), bound_fraction=1.5)
    with pytest.raises(ValueError, match="3 layers, the model 4"):
        Sensitivity(weights=(1.0, 2.0, 3.0)).allocate(5, 10, 4)


def test_registry_reads_a_profile(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"layers": [1.0, 3.0]}))
    allocator = get_budget("sensitivity+bound0.2+gamma0.5", profile=path)
    assert allocator == Sensitivity(weights=(1.0, 3.0), bound_fraction=0.2, gamma=0.5)
    assert Sensitivity.from_file(path, bound_fraction=0.2, gamma=0.5) == allocator
    with pytest.raises(ValueError, match="pass profile="):
        get_budget("sensitivity")
    with pytest.raises(ValueError, match="takes no profile"):
        get_budget("uniform", profile=path)
    path.write_text(json.dumps({"nothing": 1}))
    with pytest.raises(ValueError, match="not a sensitivity profile"):
        get_budget("sensitivity", profile=path)

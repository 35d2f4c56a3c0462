"""Uniform budgets and the shared argument checks of allocate."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zigzag.budget import BudgetAllocator, Uniform


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 500), st.integers(0, 500)), min_size=1, max_size=4), st.integers(1, 12))
def test_every_layer_gets_the_average(rows, layers: int) -> None:
    seq = torch.tensor([max(a, b) for a, b in rows])
    avg = torch.tensor([min(a, b) for a, b in rows])
    out = Uniform().allocate(avg, seq, layers)
    assert out.dtype == torch.long and out.shape == (len(rows), layers)
    assert torch.equal(out, avg[:, None].expand(-1, layers))
    assert torch.equal(out.sum(dim=-1), layers * avg)


def test_accepts_ints_and_lists_and_ignores_lmba() -> None:
    assert Uniform().allocate(3, 5, 2).tolist() == [[3, 3]]
    assert Uniform().allocate([3, 4], [5, 4], 2, lmba=torch.rand(2, 2)).tolist() == [[3, 3], [4, 4]]


def test_result_is_writable_and_not_a_view() -> None:
    avg = torch.tensor([3])
    out = Uniform().allocate(avg, torch.tensor([5]), 2)
    out[0, 0] = 0
    assert avg.tolist() == [3]


def test_protocol_and_flags() -> None:
    u = Uniform()
    assert isinstance(u, BudgetAllocator)
    assert u.name == "uniform" and u.needs_lmba is False


@pytest.mark.parametrize(
    ("args", "exc", "match"),
    [
        ((torch.tensor([6]), torch.tensor([5]), 2), ValueError, r"avg_budget must lie in \[0, seq_len\]"),
        ((torch.tensor([1]), torch.tensor([-1]), 2), ValueError, "seq_len must be >= 0"),
        ((torch.tensor([1.0]), torch.tensor([5]), 2), ValueError, "integer dtype"),
        ((torch.tensor([1]), torch.tensor([5.0]), 2), ValueError, "seq_len must have an integer dtype"),
        ((torch.tensor([1]), torch.tensor([5]), 0), ValueError, "num_layers must be >= 1"),
        ((torch.tensor([1]), torch.tensor([5]), 2.0), TypeError, "num_layers must be an int"),
        ((torch.tensor([1]), torch.tensor([5]), True), TypeError, "num_layers must be an int"),
        ((torch.tensor([1, 2]), torch.tensor([5]), 2), ValueError, "seq_len must have the shape"),
        (("1", torch.tensor([5]), 2), TypeError, "avg_budget"),
        ((1.5, torch.tensor([5]), 2), TypeError, "avg_budget"),
    ],
)
def test_errors(args: tuple, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        Uniform().allocate(*args)

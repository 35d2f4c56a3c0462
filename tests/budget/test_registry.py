"""The budget registry: names, objects, errors."""

from __future__ import annotations

import pytest
import torch

from zigzag.budget import BUDGETS, AdaKV, BudgetAllocator, Pyramid, Uniform, ZigZag, ZigZagHeads, get_budget


def test_registry_contents() -> None:
    assert BUDGETS == {
        "uniform": Uniform, "pyramid": Pyramid, "zigzag": ZigZag, "adakv": AdaKV, "zigzag_heads": ZigZagHeads,
    }
    for name, cls in BUDGETS.items():
        assert cls.name == name


@pytest.mark.parametrize(("spec", "cls"), [("uniform", Uniform), ("PyramiD", Pyramid), (" ZigZag ", ZigZag)])
def test_names_are_case_insensitive(spec: str, cls: type) -> None:
    alloc = get_budget(spec)
    assert type(alloc) is cls and isinstance(alloc, BudgetAllocator)


def test_objects_pass_through() -> None:
    z = ZigZag(tau=0.8)
    assert get_budget(z) is z

    class Custom:
        name = "custom"
        needs_lmba = False

        def allocate(self, avg_budget, seq_len, num_layers, lmba=None):
            return avg_budget[:, None].expand(-1, num_layers)

    c = Custom()
    assert get_budget(c) is c and isinstance(c, BudgetAllocator)
    assert get_budget(c).allocate(torch.tensor([2]), torch.tensor([4]), 2).tolist() == [[2, 2]]


def test_unknown_name_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown budget 'snapkv'; known budgets: adakv, pyramid, uniform, zigzag, zigzag_heads"):
        get_budget("snapkv")


@pytest.mark.parametrize("spec", [3, None, ZigZag, object(), ["zigzag"]])
def test_wrong_types(spec: object) -> None:
    with pytest.raises(TypeError):
        get_budget(spec)  # type: ignore[arg-type]


def test_flags() -> None:
    assert [get_budget(n).needs_lmba for n in ("uniform", "pyramid", "zigzag")] == [False, False, True]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("zigzag+skip2", ZigZag(skip_layers=2)),
        ("ZigZag+Cap2+gamma0.5", ZigZag(max_multiple=2.0, gamma=0.5)),
        ("zigzag+tau0.8+bound0.1", ZigZag(tau=0.8, bound_fraction=0.1)),
        ("zigzag_heads+skip1+cap3", ZigZagHeads(skip_layers=1, max_multiple=3.0)),
        ("pyramid+beta5", Pyramid(beta=5.0)),
        ("adakv+alpha0.5", AdaKV(alpha=0.5)),
    ],
)
def test_options_as_suffixes(spec: str, expected: object) -> None:
    assert get_budget(spec) == expected


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("zigzag+foo1", "unknown option 'foo1'.*options of zigzag: \\+skip<value>"),
        ("uniform+skip1", "options of uniform: none"),
        ("zigzag+skip1.5", "needs an integer"),
        ("zigzag+cap0.5", "max_multiple must be"),
        ("zigzag+skip", "unknown option 'skip'"),
        ("zz+skip1", "unknown budget 'zz\\+skip1'"),
    ],
)
def test_bad_suffixes(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        get_budget(spec)

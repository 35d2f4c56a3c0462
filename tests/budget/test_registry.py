"""The budget registry: names, objects, errors."""

from __future__ import annotations

import pytest
import torch

from zigzag.budget import BUDGETS, AdaKV, BudgetAllocator, Pyramid, Uniform, ZigZag, get_budget


def test_registry_contents() -> None:
    assert BUDGETS == {"uniform": Uniform, "pyramid": Pyramid, "zigzag": ZigZag, "adakv": AdaKV}
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

        def allocate(self, avg_budget, seq_len, num_layers, lmba=None):  # noqa: ANN001, ANN201
            return avg_budget[:, None].expand(-1, num_layers)

    c = Custom()
    assert get_budget(c) is c and isinstance(c, BudgetAllocator)
    assert get_budget(c).allocate(torch.tensor([2]), torch.tensor([4]), 2).tolist() == [[2, 2]]


def test_unknown_name_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown budget 'snapkv'; known budgets: adakv, pyramid, uniform, zigzag"):
        get_budget("snapkv")


@pytest.mark.parametrize("spec", [3, None, ZigZag, object(), ["zigzag"]])
def test_wrong_types(spec: object) -> None:
    with pytest.raises(TypeError):
        get_budget(spec)  # type: ignore[arg-type]


def test_flags() -> None:
    assert [get_budget(n).needs_lmba for n in ("uniform", "pyramid", "zigzag")] == [False, False, True]

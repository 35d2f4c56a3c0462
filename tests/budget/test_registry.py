"""The budget registry: names, objects, errors."""

from __future__ import annotations

import pytest
import torch

from zigzag.budget import (
    ALLOCATORS,
    BUDGETS,
    GRANULARITIES,
    AdaKV,
    BudgetAllocator,
    Pyramid,
    Uniform,
    ZigZag,
    ZigZagHeads,
    get_budget,
)


def test_registry_is_built_from_the_class_names() -> None:
    assert set(BUDGETS.values()) == set(ALLOCATORS)
    for name, cls in BUDGETS.items():
        assert cls.name == name and issubclass(cls, BudgetAllocator)
        assert cls.granularity in GRANULARITIES
        if cls.calibrated:  # built from a measured profile, never from defaults
            profile = [1.0, 2.0, 3.0]
            assert get_budget(name, profile=profile) == cls(weights=tuple(profile))
            continue
        allocator = cls()
        assert get_budget(name) == allocator
        if allocator.needs_lmba:
            assert isinstance(allocator.window, int) and allocator.window >= 1


@pytest.mark.parametrize(("spec", "cls"), [("uniform", Uniform), ("PyramiD", Pyramid), (" ZigZag ", ZigZag)])
def test_names_are_case_insensitive(spec: str, cls: type) -> None:
    alloc = get_budget(spec)
    assert type(alloc) is cls and isinstance(alloc, BudgetAllocator)


def test_objects_pass_through() -> None:
    z = ZigZag(tau=0.8)
    assert get_budget(z) is z

    class Custom:  # the documented members, no base class
        name = "custom"
        granularity = "layer"
        needs_lmba = False

        def allocate(self, avg_budget, seq_len, num_layers, lmba=None):
            return avg_budget[:, None].expand(-1, num_layers)

    c = Custom()
    assert get_budget(c) is c
    assert get_budget(c).allocate(torch.tensor([2]), torch.tensor([4]), 2).tolist() == [[2, 2]]


def _custom(**members: object) -> object:
    body = {"name": "custom", "granularity": "layer", "needs_lmba": False, "window": 8, **members}
    body = {k: v for k, v in body.items() if v is not _ABSENT}
    return type("Custom", (), {**body, "allocate": lambda self, avg, seq, layers, lmba=None: avg[:, None].expand(-1, layers)})()


_ABSENT = object()


@pytest.mark.parametrize(
    ("members", "missing"),
    [
        ({"name": _ABSENT}, "name"),
        ({"granularity": _ABSENT}, "granularity"),
        ({"needs_lmba": _ABSENT}, "needs_lmba"),
        ({"needs_lmba": True, "window": _ABSENT}, "window"),
        ({"needs_lmba": True}, "measure"),
        ({"granularity": "split"}, "split_heads"),
    ],
)
def test_a_missing_member_is_named(members: dict, missing: str) -> None:
    with pytest.raises(TypeError, match=f"has no attribute '{missing}'"):
        get_budget(_custom(**members))


def test_bad_members_are_named() -> None:
    with pytest.raises(TypeError, match="granularity must be one of"):
        get_budget(_custom(granularity="row"))
    with pytest.raises(TypeError, match="window must be a positive int"):
        get_budget(_custom(needs_lmba=True, window=0, measure=lambda self, a, v, k: a.sum(-1)))


def test_unknown_name_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown budget 'snapkv'; known budgets: .*uniform.*zigzag"):
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

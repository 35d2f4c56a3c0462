"""Per-layer KV budgets: pure functions from per-layer statistics to integer token budgets.

* :func:`apportion`: exact integer split of a total under floors and caps (water-filling + largest
  remainder); every allocator uses it.
* :class:`BudgetAllocator`: the protocol (``name``, ``needs_lmba``, ``allocate``).
* :class:`Uniform`, :class:`Pyramid` (PyramidKV, https://arxiv.org/abs/2406.02069),
  :class:`ZigZag` (ZigZagKV, https://arxiv.org/abs/2412.09036) and its statistic :func:`lmba`.
* :class:`AdaKV` (https://arxiv.org/abs/2407.11550): uniform layers, budgets split across each
  layer's KV heads by score (:func:`adakv_head_budgets`); allocators with ``split_heads`` do this.
* :data:`BUDGETS` and :func:`get_budget`: the registry.
"""

from __future__ import annotations

from zigzag.budget.adakv import AdaKV, adakv_head_budgets
from zigzag.budget.apportion import apportion
from zigzag.budget.base import BudgetAllocator, check_allocate_args
from zigzag.budget.pyramid import Pyramid
from zigzag.budget.uniform import Uniform
from zigzag.budget.zigzag import LMBA_REL_TOL, ZigZag, lmba, lmba_per_head

__all__ = [
    "AdaKV",
    "BUDGETS",
    "BudgetAllocator",
    "LMBA_REL_TOL",
    "Pyramid",
    "Uniform",
    "ZigZag",
    "adakv_head_budgets",
    "apportion",
    "check_allocate_args",
    "get_budget",
    "lmba",
    "lmba_per_head",
]

BUDGETS: dict[str, type] = {"uniform": Uniform, "pyramid": Pyramid, "zigzag": ZigZag, "adakv": AdaKV}
"""Registry: name -> allocator class (constructed with its defaults by :func:`get_budget`)."""


def get_budget(spec: str | BudgetAllocator) -> BudgetAllocator:
    """Resolve a budget allocator.

    Args:
        spec: a registry name (case-insensitive, surrounding spaces ignored): one of :data:`BUDGETS`,
            built with default parameters; or an allocator object (anything with ``allocate`` and
            ``name``), returned as is.

    Raises:
        ValueError: unknown name (the message lists the known ones).
        TypeError: anything else, including an allocator *class* (pass an instance, e.g. ``ZigZag()``).
    """
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key not in BUDGETS:
            raise ValueError(f"unknown budget {spec!r}; known budgets: {', '.join(sorted(BUDGETS))}")
        return BUDGETS[key]()
    if isinstance(spec, type):
        raise TypeError(f"budget must be a name or an allocator instance; got the class {spec.__name__} (call it)")
    if callable(getattr(spec, "allocate", None)) and isinstance(getattr(spec, "name", None), str):
        return spec
    raise TypeError(
        f"budget must be a name ({', '.join(sorted(BUDGETS))}) or an object with `allocate` and `name`; "
        f"got {type(spec).__name__}"
    )

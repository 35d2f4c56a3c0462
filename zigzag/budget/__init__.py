"""Per-layer KV budgets: pure functions from per-layer statistics to integer token budgets.

* :func:`apportion`: exact integer split of a total under floors and caps (water-filling + largest
  remainder); every allocator uses it.
* :class:`BudgetAllocator`: the base class and protocol (``name``, ``granularity``, ``needs_lmba``,
  ``window``, ``options``, ``measure``, ``allocate``, ``split_heads``) and :func:`check_allocator`.
* :class:`Uniform`, :class:`Pyramid` (PyramidKV, https://arxiv.org/abs/2406.02069),
  :class:`ZigZag` (ZigZagKV, https://arxiv.org/abs/2412.09036) and its statistic :func:`lmba`.
* :class:`AdaKV` (https://arxiv.org/abs/2407.11550): uniform layers, budgets split across each
  layer's KV heads by score (:func:`adakv_head_budgets`): granularity ``"split"``.
* :class:`ZigZagHeads` (``"zigzag_heads"``): Eq. 6 over layers x KV heads jointly, on per-KV-head
  LMBA (:func:`zigzag_head_budgets`): granularity ``"head"``, ``(batch, L, kv_heads)`` budgets.
* :class:`Sensitivity` (``"sensitivity"``): budgets from a per-layer sensitivity profile calibrated
  once per model (:mod:`zigzag.calibrate`); ``get_budget("sensitivity", profile=path)``.
* :class:`SimLayerKV` (``"simlayerkv"``, https://arxiv.org/abs/2410.13846): layers whose last query
  looks only at the sinks and recent tokens keep only those; the others share the rest.
* :class:`DuoAttention` (``"duo"``, https://arxiv.org/abs/2410.10819): calibrated per-KV-head
  streaming deviations; streaming heads keep sinks + recent tokens, retrieval heads the rest.
* :data:`BUDGETS` and :func:`get_budget`: the registry. Names take options as ``+<option><value>``
  suffixes (:data:`BUDGET_OPTIONS`), e.g. ``"zigzag+skip2+cap2"`` or ``"zigzag_heads+gamma0.5"``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from zigzag.budget.adakv import AdaKV, adakv_head_budgets
from zigzag.budget.apportion import apportion
from zigzag.budget.base import GRANULARITIES, BudgetAllocator, check_allocate_args, check_allocator
from zigzag.budget.duo import DuoAttention, duo_head_budgets, read_duo_profile
from zigzag.budget.heads import ZigZagHeads, layer_mean_budgets, zigzag_head_budgets
from zigzag.budget.pyramid import Pyramid
from zigzag.budget.sensitivity import Sensitivity, read_profile
from zigzag.budget.simlayerkv import SimLayerKV, sink_and_recent_mass
from zigzag.budget.uniform import Uniform
from zigzag.budget.zigzag import LMBA_REL_TOL, ZigZag, lmba, lmba_per_head

__all__ = [
    "ALLOCATORS",
    "BUDGETS",
    "BUDGET_OPTIONS",
    "GRANULARITIES",
    "LMBA_REL_TOL",
    "AdaKV",
    "BudgetAllocator",
    "DuoAttention",
    "Pyramid",
    "Sensitivity",
    "SimLayerKV",
    "Uniform",
    "ZigZag",
    "ZigZagHeads",
    "adakv_head_budgets",
    "apportion",
    "check_allocate_args",
    "check_allocator",
    "duo_head_budgets",
    "get_budget",
    "layer_mean_budgets",
    "lmba",
    "lmba_per_head",
    "read_duo_profile",
    "read_profile",
    "sink_and_recent_mass",
    "zigzag_head_budgets",
]

ALLOCATORS: tuple[type[BudgetAllocator], ...] = (Uniform, Pyramid, ZigZag, AdaKV, ZigZagHeads, Sensitivity, SimLayerKV, DuoAttention)
"""Every allocator class zigzag ships; a new one is one file and one entry here."""

BUDGETS: dict[str, type[BudgetAllocator]] = {cls.name: cls for cls in ALLOCATORS}
"""Registry: name -> allocator class (constructed with its defaults by :func:`get_budget`)."""

BUDGET_OPTIONS: dict[str, dict[str, tuple[str, type]]] = {cls.name: cls.options for cls in ALLOCATORS if cls.options}
"""Per registry name: suffix ``+<option><value>`` -> (constructor argument, type), from each class's
``options``. E.g. ``zigzag+skip2`` is ``ZigZag(skip_layers=2)``."""

_OPTION = re.compile(r"^([a-z_]+?)(-?[0-9]+(?:\.[0-9]*)?(?:e-?[0-9]+)?)$")


def _parse(key: str, spec: str, profile: str | os.PathLike[str] | Sequence[float] | None) -> BudgetAllocator:
    name, *options = key.split("+")
    if name not in BUDGETS:
        raise ValueError(f"unknown budget {spec!r}; known budgets: {', '.join(sorted(BUDGETS))}")
    known = BUDGET_OPTIONS.get(name, {})
    kwargs: dict = {}
    for option in options:
        match = _OPTION.match(option)
        if match is None or match.group(1) not in known:
            listed = ", ".join(f"+{o}<value>" for o in known) or "none"
            raise ValueError(f"unknown option {option!r} in budget {spec!r}; options of {name}: {listed}")
        field, kind = known[match.group(1)]
        text = match.group(2)
        if kind is int and not text.lstrip("-").isdigit():
            raise ValueError(f"option +{match.group(1)} in budget {spec!r} needs an integer; got {text!r}")
        kwargs[field] = kind(text)
    cls = BUDGETS[name]
    if getattr(cls, "calibrated", False):
        if profile is None:
            raise ValueError(f"budget {spec!r} is calibrated: pass profile= (a file from `python -m zigzag.calibrate {name}`)")
        weights = read_profile(profile)["layers"] if isinstance(profile, (str, os.PathLike)) else profile
        kwargs["weights"] = tuple(weights)
    elif profile is not None:
        raise ValueError(f"budget {spec!r} takes no profile")
    return cls(**kwargs)


def get_budget(
    spec: str | BudgetAllocator, *, profile: str | os.PathLike[str] | Sequence[float] | None = None
) -> BudgetAllocator:
    """Resolve a budget allocator.

    Args:
        spec: a registry name (case-insensitive, surrounding spaces ignored): one of :data:`BUDGETS`,
            built with default parameters, optionally followed by ``+<option><value>`` suffixes of
            :data:`BUDGET_OPTIONS` (``"zigzag+skip2+cap2"``); or an allocator object with the members
            of :class:`BudgetAllocator` (checked by :func:`check_allocator`), returned as is.
        profile: for calibrated budgets (``"sensitivity"``) only and required there: the profile's
            file, or its per-layer values.

    Raises:
        ValueError: unknown name or option (the message lists the known ones), or a bad option value.
        TypeError: anything else, including an allocator *class* (pass an instance, e.g. ``ZigZag()``),
            or an object that lacks a member of the protocol (the message names it).
    """
    if isinstance(spec, str):
        return _parse(spec.strip().lower(), spec, profile)
    if isinstance(spec, type):
        raise TypeError(f"budget must be a name or an allocator instance; got the class {spec.__name__} (call it)")
    if not callable(getattr(spec, "allocate", None)):
        raise TypeError(
            f"budget must be a name ({', '.join(sorted(BUDGETS))}) or an allocator object (see "
            f"zigzag.budget.BudgetAllocator); got {type(spec).__name__}"
        )
    check_allocator(spec)
    return spec

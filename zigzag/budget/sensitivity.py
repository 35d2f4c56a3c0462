"""Per-layer budgets from a calibrated sensitivity profile (measured once per model, offline).

ZigZagKV's Eq. 6 gives more tokens to layers whose attention is diffuse (a large LMBA). On small models
the most diffuse layer is often the first one, which then takes the whole context, while the layers
that retrieve from far back get less. This allocator reads a different statistic: how much the model's
predictions change when one layer alone is compressed, measured once per model on calibration text by
:func:`zigzag.calibrate.measure_sensitivity` (``python -m zigzag.calibrate sensitivity ...``). A layer
whose compression hurts more gets more of the budget:

``budget_l = B_bound + (L * B_avg - L * B_bound) * s_l ** gamma / sum_j s_j ** gamma``, with
``B_bound = floor(bound_fraction * B_avg)``, integerized exactly by :func:`~zigzag.budget.apportion`
(cap ``seq_len``: what a capped layer frees goes to the others in proportion to their weights).

``bound_fraction`` mixes with uniform budgets: 1 is uniform, 0 is purely proportional to the profile.
The profile does not depend on the prompt, so the budgets cost nothing at run time.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from zigzag.budget.apportion import apportion
from zigzag.budget.base import BudgetAllocator, check_allocate_args

__all__ = ["SENSITIVITY_OPTIONS", "Sensitivity", "read_profile"]

SENSITIVITY_OPTIONS: dict[str, tuple[str, type]] = {"bound": ("bound_fraction", float), "gamma": ("gamma", float)}
"""Name suffixes: ``sensitivity+bound0.5`` is ``bound_fraction=0.5``, ``+gamma0.5`` is ``gamma=0.5``."""


def read_profile(path: str | os.PathLike[str]) -> dict:
    """The JSON profile written by :func:`zigzag.calibrate.save_profile`; checks that it holds a
    ``"layers"`` list of finite non-negative numbers."""
    with open(path, encoding="utf-8") as f:
        profile = json.load(f)
    layers = profile.get("layers") if isinstance(profile, dict) else None
    if not isinstance(layers, list) or not layers:
        raise ValueError(f"{path} is not a sensitivity profile: it needs a non-empty 'layers' list")
    return profile


@dataclass(frozen=True)
class Sensitivity(BudgetAllocator):
    """Budgets proportional to a per-layer sensitivity profile, above a floor of ``bound_fraction * B_avg``.

    Parameters
    ----------
    weights:
        One finite value ``>= 0`` per layer, e.g. the ``"layers"`` of a profile from
        :func:`zigzag.calibrate.measure_sensitivity`; :meth:`from_file` reads one. Only ratios matter.
    bound_fraction:
        ``B_bound / B_avg`` in ``[0, 1]``: every layer keeps at least this share of the average budget
        (1 gives uniform budgets).
    gamma:
        Exponent on the weights, ``>= 0`` (0 gives uniform budgets, 1 follows the profile).

    Per row: the sum is exactly ``L * B_avg``, every budget lies in ``[B_bound, seq_len]``, a larger
    weight never gets fewer tokens, and all-zero weights give uniform budgets.
    """

    weights: tuple[float, ...] | None = None
    bound_fraction: float = 0.5
    gamma: float = 1.0

    name: ClassVar[str] = "sensitivity"
    needs_lmba: ClassVar[bool] = False
    calibrated: ClassVar[bool] = True
    options: ClassVar[dict[str, tuple[str, type]]] = SENSITIVITY_OPTIONS

    def __post_init__(self) -> None:
        if self.weights is None:
            raise ValueError(
                "sensitivity budgets need a calibrated profile: Sensitivity.from_file(path), or "
                "get_budget('sensitivity', profile=path); write one with `python -m zigzag.calibrate sensitivity`"
            )
        weights = tuple(float(w) for w in self.weights)
        if not weights or not all(math.isfinite(w) and w >= 0 for w in weights):
            raise ValueError(f"weights must be finite and >= 0, one per layer; got {self.weights!r}")
        object.__setattr__(self, "weights", weights)
        if not 0.0 <= self.bound_fraction <= 1.0:
            raise ValueError(f"bound_fraction must lie in [0, 1]; got {self.bound_fraction}")
        if not (math.isfinite(self.gamma) and self.gamma >= 0):
            raise ValueError(f"gamma must be finite and >= 0; got {self.gamma}")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **options: float) -> Sensitivity:
        """The allocator for the profile at ``path`` (see :func:`read_profile`) with ``options``
        (``bound_fraction``, ``gamma``)."""
        return cls(weights=tuple(read_profile(path)["layers"]), **options)

    def allocate(
        self,
        avg_budget: torch.Tensor | int | Sequence[int],
        seq_len: torch.Tensor | int | Sequence[int],
        num_layers: int,
        lmba: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return ``(batch, num_layers)`` long budgets; row ``b`` sums to ``num_layers * avg_budget[b]``.

        Args:
            avg_budget: ``(batch,)`` long, ``0 <= avg_budget <= seq_len``.
            seq_len: ``(batch,)`` long, unpadded length of each row (cap of every layer).
            num_layers: must equal the profile's number of layers.
            lmba: ignored.

        Raises:
            ValueError: the profile was measured on a model with another number of layers.
        """
        avg, seq, _ = check_allocate_args(avg_budget, seq_len, num_layers, lmba, needs_lmba=False)
        assert self.weights is not None  # __post_init__ guarantees it
        if len(self.weights) != num_layers:
            raise ValueError(f"the sensitivity profile has {len(self.weights)} layers, the model {num_layers}")
        # torch's 0 ** 0 is 1, so gamma 0 gives equal weights (uniform budgets), zero weights included.
        weights = torch.tensor(self.weights, dtype=torch.float64).pow(self.gamma)[None].expand(avg.shape[0], num_layers)
        lower = (avg.double() * self.bound_fraction).floor().long()
        return apportion(weights, num_layers * avg, lower=lower[:, None], upper=seq[:, None])

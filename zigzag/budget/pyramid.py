"""PyramidKV budgets: many tokens in the first layers, few in the last, falling linearly."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from zigzag.budget.apportion import apportion
from zigzag.budget.base import BudgetAllocator, check_allocate_args

__all__ = ["Pyramid"]


@dataclass(frozen=True)
class Pyramid(BudgetAllocator):
    """Budgets fall linearly from the first layer to the last (PyramidKV).

    Paper: https://arxiv.org/abs/2406.02069 ("PyramidKV: Dynamic KV Cache Compression based on
    Pyramidal Information Funneling", Cai et al., 2024).

    For a row with average budget ``B`` over ``L`` layers: ``min = B / beta``, ``max = 2 B - min``
    and layer ``l`` (0-based) targets ``max - (max - min) * l / (L - 1)`` (``B`` when ``L == 1``);
    the targets sum to ``L * B``. They are integerized by :func:`~zigzag.budget.apportion` with
    floor 0 and cap ``seq_len``: when the first layers would exceed the row's length, the excess is
    shared by the other layers in proportion to their targets; the total stays exactly ``L * B``.
    Budgets never increase with the layer index (ties in rounding favour the earlier layer).

    Parameters
    ----------
    beta:
        Ratio between the average and the last layer's budget; ``>= 1`` (1 gives uniform budgets).
        The paper and its code use 20.
    """

    beta: float = 20.0

    name: ClassVar[str] = "pyramid"
    needs_lmba: ClassVar[bool] = False
    options: ClassVar[dict[str, tuple[str, type]]] = {"beta": ("beta", float)}

    def __post_init__(self) -> None:
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)):
            raise TypeError(f"beta must be a number; got {type(self.beta).__name__}")
        if not (1.0 <= self.beta < float("inf")):
            raise ValueError(
                f"beta must be finite and >= 1 (last layer keeps avg/beta, so budgets fall); got {self.beta}"
            )

    def targets(self, avg_budget: torch.Tensor, num_layers: int) -> torch.Tensor:
        """Real-valued PyramidKV budgets before capping and rounding.

        Args:
            avg_budget: ``(batch,)`` average budget per layer.
            num_layers: ``L >= 1``.

        Returns:
            ``(batch, num_layers)`` float64; each row sums to ``L * avg_budget`` (up to rounding).
        """
        avg = avg_budget.to(torch.float64)[:, None]
        if num_layers == 1:
            return avg.clone()
        low = avg / self.beta
        high = 2.0 * avg - low
        frac = torch.arange(num_layers, dtype=torch.float64, device=avg.device) / (num_layers - 1)
        return high - (high - low) * frac

    def allocate(
        self,
        avg_budget: torch.Tensor | int | Sequence[int],
        seq_len: torch.Tensor | int | Sequence[int],
        num_layers: int,
        lmba: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return PyramidKV budgets.

        Args:
            avg_budget: ``(batch,)`` long, ``0 <= avg_budget <= seq_len``.
            seq_len: ``(batch,)`` long, unpadded length of each row (cap of every layer).
            num_layers: number of layers, ``>= 1``.
            lmba: ignored.

        Returns:
            ``(batch, num_layers)`` long; row ``b`` sums to ``num_layers * avg_budget[b]``, entries
            in ``[0, seq_len[b]]``, non-increasing along the layers.
        """
        avg, seq, _ = check_allocate_args(avg_budget, seq_len, num_layers, lmba, needs_lmba=False)
        # The targets themselves are the weights: with floor 0 the continuous target of apportion
        # is then exactly the PyramidKV formula, and exact whenever the formula is.
        return apportion(self.targets(avg, num_layers), num_layers * avg, lower=0, upper=seq[:, None])

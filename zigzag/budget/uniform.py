"""Uniform budgets: every layer keeps the same number of tokens (the SnapKV / kvpress default)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from zigzag.budget.base import BudgetAllocator, check_allocate_args

__all__ = ["Uniform"]


@dataclass(frozen=True)
class Uniform(BudgetAllocator):
    """Every layer of row ``b`` keeps ``avg_budget[b]`` tokens.

    The baseline that per-layer allocators are compared with (ZigZagKV,
    https://arxiv.org/abs/2412.09036, compares against it as "uniform allocation").
    """

    name: ClassVar[str] = "uniform"
    needs_lmba: ClassVar[bool] = False

    def allocate(
        self,
        avg_budget: torch.Tensor | int | Sequence[int],
        seq_len: torch.Tensor | int | Sequence[int],
        num_layers: int,
        lmba: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return ``(batch, num_layers)`` long, every entry of row ``b`` equal to ``avg_budget[b]``.

        Args:
            avg_budget: ``(batch,)`` long, ``0 <= avg_budget <= seq_len``.
            seq_len: ``(batch,)`` long, unpadded length of each row.
            num_layers: number of layers, ``>= 1``.
            lmba: ignored.
        """
        avg, _, _ = check_allocate_args(avg_budget, seq_len, num_layers, lmba, needs_lmba=False)
        return avg[:, None].expand(avg.shape[0], num_layers).clone()

"""SimLayerKV budgets: lazy layers, whose last query looks only at the sinks and the recent tokens,
keep only that many tokens; the other layers share what this frees."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from zigzag.budget.apportion import apportion
from zigzag.budget.base import BudgetAllocator, check_allocate_args

__all__ = ["SimLayerKV", "sink_and_recent_mass"]


def sink_and_recent_mass(
    attention: torch.Tensor, valid: torch.Tensor | None, n_initial: int, n_recent: int
) -> torch.Tensor:
    """The attention mass on a row's first ``n_initial`` and last ``n_recent`` valid tokens.

    Args:
        attention: ``(batch, heads, seq)`` softmax attention of the last queries, averaged over them.
        valid: ``(batch, seq)`` bool, False on (left) padding; None: every token is valid.
        n_initial, n_recent: tokens counted at each end (a token in both counts once).

    Returns:
        ``(batch,)`` float64: the mass, averaged over the query heads, in ``[0, 1]``.
    """
    batch, _, seq = attention.shape
    valid = torch.ones(batch, seq, dtype=torch.bool, device=attention.device) if valid is None else valid.to(attention.device, torch.bool)
    rank = valid.long().cumsum(dim=-1) - 1  # 0 at a row's first valid token
    count = valid.sum(dim=-1, keepdim=True)
    counted = valid & ((rank < n_initial) | (rank >= count - n_recent))
    return (attention.double().mean(dim=1) * counted).sum(dim=-1)


@dataclass(frozen=True)
class SimLayerKV(BudgetAllocator):
    """Lazy layers keep ``n_initial + n_recent`` tokens; every other layer shares the rest evenly.

    Paper: https://arxiv.org/abs/2410.13846 ("SimLayerKV: A Simple Framework for Layer-Level KV Cache
    Reduction", Zhang et al., 2024). A layer is *lazy* when the attention of the prompt's last
    ``window`` queries (1, as in the paper's decoding variant), averaged over them and the query heads,
    puts more than ``threshold`` of its mass on the first ``n_initial`` and the last ``n_recent``
    tokens: such a layer models no long-range dependency and loses little when it keeps only those.

    The paper keeps the full cache in the other layers, so its ratio is an outcome. zigzag meets the
    requested ratio exactly: with ``s = n_initial + n_recent``, lazy layers are capped at ``s``, the
    others at the row's length, and the total ``L * avg_budget`` is split evenly under these caps
    (:func:`~zigzag.budget.apportion`). When the budget is smaller than ``s`` every layer keeps the
    average; when nearly every layer is lazy and the others, full, cannot take the rest, the lazy
    layers' cap rises to the least that fits. Which tokens a layer keeps is the scorer's choice: with ``streaming_llm`` a lazy layer
    holds exactly its sinks and recent tokens, as in the paper; an attention scorer picks what the
    layer attends to, which in a lazy layer is mostly those.

    Parameters
    ----------
    threshold:
        Mass above which a layer is lazy, in ``[0, 1]``. The paper tunes it per model; 0.9 is zigzag's
        default, to be chosen on development data for another model.
    n_initial:
        Leading tokens counted (attention sinks), ``>= 0``; the paper's 4.
    n_recent:
        Trailing tokens counted, ``>= 0``; the paper's 1024.
    window:
        Last queries whose attention is measured, ``>= 1``; the paper's 1.
    """

    threshold: float = 0.9
    n_initial: int = 4
    n_recent: int = 1024
    window: int = 1

    name: ClassVar[str] = "simlayerkv"
    needs_lmba: ClassVar[bool] = True
    options: ClassVar[dict[str, tuple[str, type]]] = {
        "threshold": ("threshold", float),
        "sink": ("n_initial", int),
        "recent": ("n_recent", int),
        "window": ("window", int),
    }

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be a number in [0, 1] (attention mass); got {self.threshold!r}")
        for arg, least in (("n_initial", 0), ("n_recent", 0), ("window", 1)):
            value = getattr(self, arg)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{arg} must be an int >= {least}; got {value!r}")

    def measure(self, attention: torch.Tensor, valid: torch.Tensor | None = None, kv_heads: int | None = None) -> torch.Tensor:
        """One layer's sink-and-recent mass, ``(batch, heads, seq) -> (batch,)`` float64
        (:func:`sink_and_recent_mass`); stack the ``L`` layers along dim 1 for :meth:`allocate`."""
        return sink_and_recent_mass(attention, valid, self.n_initial, self.n_recent)

    def allocate(
        self,
        avg_budget: torch.Tensor | int | Sequence[int],
        seq_len: torch.Tensor | int | Sequence[int],
        num_layers: int,
        lmba: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return SimLayerKV budgets.

        Args:
            avg_budget: ``(batch,)`` long, ``0 <= avg_budget <= seq_len``.
            seq_len: ``(batch,)`` long, unpadded length of each row.
            num_layers: ``L >= 1``.
            lmba: ``(batch, L)`` float, each layer's sink-and-recent mass (:meth:`measure`).

        Returns:
            ``(batch, L)`` long; row ``b`` sums to ``L * avg_budget[b]``, every entry in
            ``[0, seq_len[b]]``; lazy layers hold at most ``n_initial + n_recent`` unless the total
            needs more of them.
        """
        avg, seq, mass = check_allocate_args(avg_budget, seq_len, num_layers, lmba, needs_lmba=True)
        lazy = mass > self.threshold  # (batch, L)
        total = num_layers * avg
        n_lazy = lazy.sum(dim=1)
        # Lazy layers hold n_initial + n_recent, or the least more that lets the busy layers, full,
        # reach the total (when nearly every layer is lazy).
        short = (total - (num_layers - n_lazy) * seq).clamp(min=0)
        needed = (short + n_lazy - 1) // n_lazy.clamp(min=1)
        small = torch.maximum(torch.full_like(avg, self.n_initial + self.n_recent), needed).clamp(max=seq)
        caps = torch.where(lazy, small[:, None], seq[:, None])
        weights = torch.ones(avg.shape[0], num_layers, dtype=torch.float64, device=avg.device)
        return apportion(weights, total, lower=0, upper=caps)

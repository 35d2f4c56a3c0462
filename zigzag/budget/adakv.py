"""AdaKV: split each layer's budget across its KV heads by their scores (Feng et al., arXiv 2407.11550).

Layers keep uniform budgets ``B``; inside a layer, each of its ``H`` KV heads first keeps its own
``floor(alpha * B)`` best tokens, and the remaining ``H * B - H * floor(alpha * B)`` slots go to the
best-scoring tokens of the whole layer, whichever head they belong to. Heads that attend to a handful
of tokens give their share to heads that spread wide.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from zigzag.budget.base import BudgetAllocator
from zigzag.budget.uniform import Uniform


def adakv_head_budgets(scores: torch.Tensor, valid: torch.Tensor, layer_budget: torch.Tensor, alpha: float = 0.2) -> torch.Tensor:
    """Per-head token counts for one layer.

    Args:
        scores: ``(batch, kv_heads, seq)`` float, higher = keep; must be comparable across heads.
        valid: ``(batch, seq)`` bool, False on padding (never counted).
        layer_budget: ``(batch,)`` long, tokens per head under a uniform split (``<=`` valid tokens).
        alpha: share of ``layer_budget`` every head keeps for itself, in ``[0, 1]``.

    Returns:
        ``(batch, kv_heads)`` long: row ``b`` sums to ``kv_heads * layer_budget[b]``, each entry lies in
        ``[floor(alpha * layer_budget[b]), valid tokens of the row]``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (share each head keeps for itself); got {alpha}")
    batch, heads, seq = scores.shape
    budget = layer_budget.to(scores.device).long()
    lengths = valid.sum(-1).to(scores.device)
    if bool((budget > lengths).any()):
        raise ValueError("layer_budget must not exceed a row's valid tokens")
    floor = (alpha * budget.double()).floor().long()  # (batch,)
    s = scores.float().masked_fill(~valid[:, None, :].to(scores.device), float("-inf"))
    order = s.argsort(dim=-1, descending=True, stable=True)  # (batch, heads, seq)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(seq, device=s.device).expand_as(order))
    guaranteed = rank < floor[:, None, None]
    # The rest of the layer's slots: best remaining tokens across all heads (ties: lower head, lower position).
    rest = s.masked_fill(guaranteed, float("-inf")).reshape(batch, heads * seq)
    extra = heads * (budget - floor)  # (batch,)
    width = int(extra.max()) if extra.numel() else 0
    counts = floor[:, None].expand(batch, heads).clone()
    if width:
        top = rest.topk(width, dim=-1, sorted=True).indices  # (batch, width)
        take = torch.arange(width, device=s.device)[None, :] < extra[:, None]
        head_of = torch.div(top, seq, rounding_mode="floor")
        counts += torch.zeros(batch, heads, dtype=torch.long, device=s.device).scatter_add_(1, head_of, take.long())
    return counts


@dataclass(frozen=True)
class AdaKV(BudgetAllocator):
    """Uniform layer budgets, split across each layer's KV heads by :func:`adakv_head_budgets`.

    Parameters
    ----------
    alpha:
        Share of the uniform per-head budget each head keeps for itself (AdaKV's safeguard, 0.2).
    """

    alpha: float = 0.2

    name: ClassVar[str] = "adakv"
    granularity: ClassVar[str] = "split"
    options: ClassVar[dict[str, tuple[str, type]]] = {"alpha": ("alpha", float)}
    needs_lmba: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be a float in [0, 1]; got {self.alpha!r}")

    def allocate(
        self,
        avg_budget: torch.Tensor | int | Sequence[int],
        seq_len: torch.Tensor | int | Sequence[int],
        num_layers: int,
        lmba: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Layer budgets: uniform (``(batch, num_layers)`` long); heads are split by :meth:`split_heads`."""
        return Uniform().allocate(avg_budget, seq_len, num_layers, lmba)

    def split_heads(self, scores: torch.Tensor, valid: torch.Tensor, layer_budget: torch.Tensor) -> torch.Tensor:
        """``(batch, kv_heads)`` per-head budgets of one layer; see :func:`adakv_head_budgets`."""
        return adakv_head_budgets(scores, valid, layer_budget, self.alpha)

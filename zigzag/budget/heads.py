"""ZigZag over layers x KV heads: Eq. 6 of ZigZagKV applied jointly to every (layer, KV head) pair.

ZigZagKV (https://arxiv.org/abs/2412.09036) measures one uncertainty per layer (LMBA, averaged over
heads) and gives every head of a layer the same budget. Here each KV head has its own LMBA and its
own budget: with ``L`` layers and ``H`` KV heads, the ``L * H`` pairs share ``L * H * B_avg`` tokens
by the same rule, ``budget = B_bound + (B_avg - B_bound) * L * H * u`` with
``u = LMBA / sum(LMBA)`` over all pairs of the row, capped at the row's length and integerized
exactly by :func:`~zigzag.budget.apportion`. A head whose attention is spread over many tokens keeps
more, wherever it sits; a head that looks at a handful of tokens gives its share away.

LMBA of a KV head (:meth:`ZigZagHeads.measure`): the query heads of a GQA group read the same
keys, so what the KV head must keep is what the *group* attends to. The default ``group="mass"``
averages the group's attention mass over its query heads, then counts the tokens holding ``tau`` of
it. ``group="mean"`` averages the query heads' own LMBA instead (the paper's per-layer average,
restricted to the group); it is smaller when the query heads look at different tokens.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from zigzag.budget.apportion import apportion
from zigzag.budget.base import BudgetAllocator, check_allocate_args, lmba_values
from zigzag.budget.zigzag import (
    ZIGZAG_OPTIONS,
    check_tau,
    check_variant_options,
    lmba_per_head,
    variant_cap,
    zigzag_bound,
)

__all__ = ["ZigZagHeads", "layer_mean_budgets", "zigzag_head_budgets"]

GROUP_MODES = ("mass", "mean")


def _check_head_lmba(lmba: torch.Tensor, batch: int, num_layers: int, device: torch.device) -> torch.Tensor:
    if not isinstance(lmba, torch.Tensor):
        raise TypeError(f"lmba must be a torch.Tensor of shape (batch, num_layers, kv_heads); got {type(lmba).__name__}")
    if lmba.dim() != 3 or tuple(lmba.shape[:2]) != (batch, num_layers) or lmba.shape[2] < 1:
        raise ValueError(
            f"lmba must have shape (batch, num_layers, kv_heads) = ({batch}, {num_layers}, >= 1); got {tuple(lmba.shape)}"
        )
    return lmba_values(lmba, device)


def zigzag_head_budgets(
    avg_budget: torch.Tensor | int | Sequence[int],
    seq_len: torch.Tensor | int | Sequence[int],
    lmba: torch.Tensor,
    bound_fraction: float = 0.2,
    *,
    skip_layers: int = 0,
    gamma: float = 1.0,
    max_multiple: float | None = None,
) -> torch.Tensor:
    """Eq. 6 of ZigZagKV over layers x KV heads jointly, with an exact integer total.

    Args:
        avg_budget: ``(batch,)`` long, ``0 <= avg_budget <= seq_len``: average tokens per (layer, head).
        seq_len: ``(batch,)`` long, unpadded length of each row (the cap of every head).
        lmba: ``(batch, L, H)`` float ``>= 0``: each (layer, KV head)'s LMBA.
        bound_fraction: ``B_bound = floor(bound_fraction * B_avg)``, the floor of every head.
        skip_layers: the first ``skip_layers`` layers keep ``B_avg`` in every head and take no part.
        gamma: Eq. 6 weights are ``LMBA ** gamma`` (1 = the paper).
        max_multiple: optional cap ``floor(max_multiple * B_avg)`` per head (``>= 1``).

    Returns:
        ``(batch, L, H)`` long. Row ``b`` sums to exactly ``L * H * avg_budget[b]``; every entry lies
        in ``[B_bound[b], seq_len[b]]`` (and under the cap); equal LMBA gives exactly ``B_avg``
        everywhere; among the pairs that take part, a larger LMBA never gets fewer tokens, and
        permuting them permutes the budgets.
    """
    if isinstance(bound_fraction, bool) or not isinstance(bound_fraction, numbers.Real) or not 0.0 <= bound_fraction <= 1.0:
        raise ValueError(f"bound_fraction must be a float in [0, 1]; got {bound_fraction!r}")
    check_variant_options(skip_layers, gamma, max_multiple)
    if not isinstance(lmba, torch.Tensor) or lmba.dim() != 3:
        raise ValueError(f"lmba must be a (batch, num_layers, kv_heads) tensor; got {getattr(lmba, 'shape', type(lmba).__name__)}")
    num_layers = lmba.shape[1]
    avg, seq, _ = check_allocate_args(avg_budget, seq_len, num_layers, None, needs_lmba=False)
    lm = _check_head_lmba(lmba, avg.shape[0], num_layers, avg.device)
    batch, _, heads = lm.shape
    out = avg[:, None, None].expand(batch, num_layers, heads).clone()
    skip = min(skip_layers, num_layers)
    if skip == num_layers:
        return out
    flat = lm[:, skip:].reshape(batch, (num_layers - skip) * heads)
    weights = flat if gamma == 1.0 else flat.pow(gamma)
    cap = variant_cap(avg, seq, max_multiple)
    total = (num_layers - skip) * heads * avg
    alloc = apportion(weights, total, lower=zigzag_bound(avg, bound_fraction)[:, None], upper=cap[:, None])
    out[:, skip:] = alloc.reshape(batch, num_layers - skip, heads)
    return out


def layer_mean_budgets(head_budgets: torch.Tensor) -> torch.Tensor:
    """Per-layer report of head-wise budgets: ``(batch, L, H)`` long -> ``(batch, L)`` long.

    Entry ``[b, l]`` is the mean over the layer's KV heads, ``sum_h head_budgets[b, l, h] / H``,
    rounded down or up so that each row still sums to ``sum(head_budgets[b]) / H`` (an integer for
    every allocator here: ``L * B_avg``): the remaining units go to the layers with the largest
    remainders (ties: the lower layer). So ``cache.budgets`` keeps its meaning (tokens kept per KV
    head in each layer, on average) and its exact row totals.
    """
    if head_budgets.dim() != 3:
        raise ValueError(f"head_budgets must be (batch, L, H); got shape {tuple(head_budgets.shape)}")
    heads = head_budgets.shape[2]
    sums = head_budgets.long().sum(dim=-1)  # (batch, L)
    base, rem = torch.div(sums, heads, rounding_mode="floor"), sums % heads
    extra = sums.sum(dim=-1) // heads - base.sum(dim=-1)  # (batch,) units still to give
    # Largest remainder first, the lower layer on ties: a stable descending sort of the remainders.
    order = torch.argsort(rem, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return base + (rank < extra[:, None]).long()


@dataclass(frozen=True)
class ZigZagHeads(BudgetAllocator):
    """ZigZagKV budgets per (layer, KV head): :func:`zigzag_head_budgets` on per-KV-head LMBA.

    A head-wise allocator (``granularity = "head"``): the pipeline measures LMBA with
    :meth:`measure`, stacks it to ``(batch, L, H)`` and :meth:`allocate` returns
    ``(batch, L, H)`` budgets; layer ``l`` keeps ``budgets[:, l, h]`` tokens in KV head ``h``.
    ``cache.budgets`` reports the per-layer mean (:func:`layer_mean_budgets`); the per-head counts
    are ``(cache.kept_positions[l] >= 0).sum(-1)``.

    Parameters
    ----------
    tau, bound_fraction, window:
        As for :class:`~zigzag.budget.ZigZag` (0.9, 0.2, 64); the bound applies to every head.
    group:
        ``"mass"`` (LMBA of the GQA group's mean attention mass) or ``"mean"`` (mean of the group's
        query-head LMBA); see the module docstring.
    skip_layers, gamma, max_multiple:
        The design variants of :class:`~zigzag.budget.ZigZag`; ``max_multiple`` caps each head.
    """

    tau: float = 0.9
    bound_fraction: float = 0.2
    window: int = 64
    group: str = "mass"
    skip_layers: int = 0
    gamma: float = 1.0
    max_multiple: float | None = None

    name: ClassVar[str] = "zigzag_heads"
    needs_lmba: ClassVar[bool] = True
    granularity: ClassVar[str] = "head"
    options: ClassVar[dict[str, tuple[str, type]]] = ZIGZAG_OPTIONS

    def __post_init__(self) -> None:
        check_tau(self.tau)
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be a positive int (last queries observed for LMBA); got {self.window!r}")
        if isinstance(self.bound_fraction, bool) or not isinstance(self.bound_fraction, (int, float)) or not 0.0 <= self.bound_fraction <= 1.0:
            raise ValueError(f"bound_fraction must be a float in [0, 1]; got {self.bound_fraction!r}")
        if self.group not in GROUP_MODES:
            raise ValueError(f"group must be one of {GROUP_MODES}; got {self.group!r}")
        check_variant_options(self.skip_layers, self.gamma, self.max_multiple)

    def measure(self, attention: torch.Tensor, valid: torch.Tensor | None, kv_heads: int) -> torch.Tensor:
        """One layer's per-KV-head LMBA: ``(batch, heads, seq)`` query-head mass -> ``(batch, kv_heads)`` float64.

        Query head ``h`` belongs to KV head ``h // (heads // kv_heads)`` (GQA).
        """
        batch, heads, seq = attention.shape
        if kv_heads < 1 or heads % kv_heads:
            raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
        groups = heads // kv_heads
        if self.group == "mass":
            grouped = attention.reshape(batch, kv_heads, groups, seq).mean(dim=2)
            return lmba_per_head(grouped, valid, self.tau, check_values=False).to(torch.float64)
        per_query = lmba_per_head(attention, valid, self.tau, check_values=False).to(torch.float64)
        return per_query.reshape(batch, kv_heads, groups).mean(dim=-1)

    def allocate(
        self,
        avg_budget: torch.Tensor | int | Sequence[int],
        seq_len: torch.Tensor | int | Sequence[int],
        num_layers: int,
        lmba: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(batch, num_layers, kv_heads)`` long budgets from ``lmba (batch, num_layers, kv_heads)``."""
        if lmba is None:
            raise ValueError("lmba is required by this allocator (needs_lmba=True); got None")
        if isinstance(lmba, torch.Tensor) and lmba.dim() == 3 and lmba.shape[1] != num_layers:
            raise ValueError(f"lmba has {lmba.shape[1]} layers but num_layers is {num_layers}")
        return zigzag_head_budgets(
            avg_budget, seq_len, lmba, self.bound_fraction,
            skip_layers=self.skip_layers, gamma=self.gamma, max_multiple=self.max_multiple,
        )

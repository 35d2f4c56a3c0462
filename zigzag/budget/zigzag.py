"""ZigZagKV budgets: layers whose attention is spread over more tokens get more of the cache.

Paper: https://arxiv.org/abs/2412.09036 ("ZigZagKV: Dynamic KV Cache Compression for Long-context
Modeling based on Layer Uncertainty", Zhong et al., COLING 2025).

A layer's uncertainty is its LMBA (minimum budget for attention): the smallest number of tokens
holding a fraction ``tau`` of a head's attention mass, averaged over the heads (:func:`lmba`).
Budgets follow Eq. 6 of the paper (:class:`ZigZag`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, cast

import torch

from zigzag.budget.apportion import apportion
from zigzag.budget.base import BudgetAllocator, check_allocate_args

__all__ = ["LMBA_REL_TOL", "ZIGZAG_OPTIONS", "ZigZag", "check_variant_options", "lmba", "lmba_per_head", "variant_cap"]

ZIGZAG_OPTIONS: dict[str, tuple[str, type]] = {
    "skip": ("skip_layers", int),
    "gamma": ("gamma", float),
    "cap": ("max_multiple", float),
    "tau": ("tau", float),
    "bound": ("bound_fraction", float),
}
"""Name suffixes of the ZigZag allocators: ``zigzag+skip2`` is ``ZigZag(skip_layers=2)``, ``+cap2`` is
``max_multiple=2.0``, ``+gamma0.5`` is ``gamma=0.5``."""

LMBA_REL_TOL = 1.0e-9
"""Relative slack on "reaches ``tau`` of the mass": a prefix counts as reaching it when its mass is
``>= tau * total * (1 - LMBA_REL_TOL)``. Sums of float64 masses in different orders differ by far
less than this, so LMBA does not depend on summation order, and ``tau = 0.9`` of 10 equal masses is 9
tokens (``0.9 * 10`` in binary floating point is a hair above 9)."""


def check_tau(tau: float) -> None:
    """Raise unless ``tau`` (a fraction of the attention mass) is a number in ``(0, 1]``."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"tau must be a float in (0, 1]; got {type(tau).__name__}")
    if not (0.0 < tau <= 1.0):
        raise ValueError(f"tau must lie in (0, 1] (fraction of the attention mass); got {tau}")


def lmba_per_head(
    attention: torch.Tensor, valid: torch.Tensor | None = None, tau: float = 0.9, *, check_values: bool = True
) -> torch.Tensor:
    """LMBA of each head: the fewest tokens holding a fraction ``tau`` of the head's attention mass.

    ZigZagKV, https://arxiv.org/abs/2412.09036, Section 3 (layer uncertainty). Per row and head, sort
    the token masses in decreasing order; the LMBA is the smallest ``k`` such that the ``k`` largest
    masses sum to at least ``tau`` of the head's total mass (with the relative slack
    :data:`LMBA_REL_TOL`). Vectorized: one sort, one cumulative sum, one count.

    Definitions at the edges:

    * ``tau == 1``: the number of tokens with nonzero mass (a tail of masses too small to change a
      floating-point sum still counts).
    * a head with zero total mass (all masked, or ``seq == 0``): 0.
    * masked positions (``valid`` False) count as zero mass, whatever ``attention`` holds there.

    Args:
        attention: ``(batch, heads, seq)`` real, ``>= 0``: the attention mass each token receives from
            the observation window, per query head (e.g. softmax probabilities averaged over the
            window's queries). Must be the real mass: scores with protected tokens lifted or padded
            make every layer look alike.
        valid: ``(batch, seq)`` bool, False on padding; None means all valid.
        tau: fraction of the mass, in ``(0, 1]`` (the paper uses 0.9).
        check_values: verify that ``attention`` is finite and ``>= 0``. The check reads the result
            back from the accelerator (a sync); :meth:`ZigZag.measure` skips it for the softmax mass
            it is handed during the prefill.

    Returns:
        ``(batch, heads)`` long, in ``[0, seq]``.
    """
    check_tau(tau)
    if not isinstance(attention, torch.Tensor):
        raise TypeError(f"attention must be a torch.Tensor (batch, heads, seq); got {type(attention).__name__}")
    if attention.dim() != 3:
        raise ValueError(f"attention must have shape (batch, heads, seq); got shape {tuple(attention.shape)}")
    if not attention.is_floating_point():
        raise ValueError(f"attention must be a floating-point tensor; got dtype {attention.dtype}")
    batch, heads, seq = attention.shape
    if valid is not None:
        if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool:
            raise ValueError(f"valid must be a bool tensor of shape ({batch}, {seq}) or None; got {valid!r:.80}")
        if tuple(valid.shape) != (batch, seq):
            raise ValueError(f"valid must have shape (batch, seq) = ({batch}, {seq}); got {tuple(valid.shape)}")
        attention = attention.masked_fill(~valid.to(attention.device)[:, None, :], 0.0)
    if check_values and not bool(torch.isfinite(attention).all()):
        raise ValueError("attention must be finite; got inf or nan")
    if check_values and bool((attention < 0).any()):
        raise ValueError(f"attention must be >= 0 (attention mass); got a minimum of {attention.min().item()}")
    if seq == 0:
        return torch.zeros(batch, heads, dtype=torch.long, device=attention.device)
    if tau == 1.0:
        return (attention > 0).sum(dim=-1)
    # Sorting in the input dtype and then widening gives the same order (widening is exact); the
    # cumulative sum runs in float64 so that long sequences do not drift.
    cum = torch.sort(attention, dim=-1, descending=True).values.to(torch.float64).cumsum_(dim=-1)
    total = cum[..., -1:]
    # Taking the total from the same cumulative sum guarantees the last prefix reaches it.
    short = cum < total * (tau * (1.0 - LMBA_REL_TOL))
    count = short.sum(dim=-1) + 1
    return torch.where(total[..., 0] > 0, count, torch.zeros_like(count))


def lmba(attention: torch.Tensor, valid: torch.Tensor | None = None, tau: float = 0.9, *, check_values: bool = True) -> torch.Tensor:
    """Layer uncertainty of ZigZagKV: :func:`lmba_per_head` averaged over the heads.

    Paper: https://arxiv.org/abs/2412.09036.

    Args:
        attention: ``(batch, heads, seq)`` real attention mass per query head, ``>= 0``.
        valid: ``(batch, seq)`` bool or None.
        tau: fraction of the mass, in ``(0, 1]``.
        check_values: as in :func:`lmba_per_head`.

    Returns:
        ``(batch,)`` float64, the mean over heads of the per-head counts.
    """
    per_head = lmba_per_head(attention, valid, tau, check_values=check_values)
    if per_head.shape[1] == 0:
        raise ValueError("attention must have at least one head; got heads=0")
    return per_head.to(torch.float64).mean(dim=-1)


def check_variant_options(skip_layers: int, gamma: float, max_multiple: float | None) -> None:
    """Validate the design-variant options shared by :class:`ZigZag` and ``ZigZagHeads``."""
    if isinstance(skip_layers, bool) or not isinstance(skip_layers, int) or skip_layers < 0:
        raise ValueError(f"skip_layers must be a non-negative int; got {skip_layers!r}")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not (0.0 <= gamma <= 16.0):
        raise ValueError(f"gamma must be a number in [0, 16] (exponent on LMBA); got {gamma!r}")
    if max_multiple is not None and (
        isinstance(max_multiple, bool) or not isinstance(max_multiple, (int, float)) or not (1.0 <= max_multiple < float("inf"))
    ):
        raise ValueError(f"max_multiple must be None or a finite number >= 1 (cap in units of B_avg); got {max_multiple!r}")


def zigzag_bound(avg_budget: torch.Tensor, bound_fraction: float) -> torch.Tensor:
    """``B_bound = floor(bound_fraction * avg_budget)``, ``<= avg_budget``: ``(batch,)`` long -> ``(batch,)`` long."""
    # The relative 1e-12 keeps products such as 0.3 * 10 (2.9999999999999996 in binary) at the
    # integer the user meant; the clamp keeps B_bound <= B_avg whatever the slack does.
    product = avg_budget.to(torch.float64) * bound_fraction
    raw = torch.floor(product * (1.0 + 1.0e-12)).long()
    return torch.minimum(raw, avg_budget)


def variant_cap(avg: torch.Tensor, seq: torch.Tensor, max_multiple: float | None) -> torch.Tensor:
    """Per-row cap of one layer (or head): ``min(seq_len, floor(max_multiple * B_avg))``, ``>= B_avg``."""
    if max_multiple is None:
        return seq
    raw = torch.floor(avg.to(torch.float64) * float(max_multiple) * (1.0 + 1.0e-12)).long()
    return torch.minimum(torch.maximum(raw, avg), seq)


@dataclass(frozen=True)
class ZigZag(BudgetAllocator):
    """ZigZagKV per-layer budgets from layer uncertainty (Zhong et al., COLING 2025, Eq. 6).

    Paper: https://arxiv.org/abs/2412.09036.

    For a row with average budget ``B_avg`` over ``L`` layers and LMBA values ``LMBA_l``:
    ``u_l = LMBA_l / sum_l LMBA_l`` and ``budget_l = B_bound + (B_avg - B_bound) * L * u_l`` with
    ``B_bound = floor(bound_fraction * B_avg)`` (a token count, so rounded down; the paper writes
    ``0.2 B_avg``). The continuous budgets sum to ``L * B_avg``; they are integerized by
    :func:`~zigzag.budget.apportion` with weights ``u``, floor ``B_bound`` and cap ``seq_len``: a
    layer above the row's length is cut to it and what it frees goes to the other layers in
    proportion to ``u``; rounding is by largest remainder. Hence, per row:

    * the sum is exactly ``L * B_avg``, every budget lies in ``[B_bound, seq_len]``;
    * equal LMBA gives exactly uniform budgets; a larger LMBA never gets fewer tokens;
    * permuting the layers' LMBA permutes the budgets (exactly when the LMBA are distinct);
    * a row whose LMBA are all 0 gets uniform budgets.

    Parameters
    ----------
    tau:
        Fraction of the attention mass for LMBA (:meth:`measure`), in ``(0, 1]``; the paper uses 0.9.
    bound_fraction:
        ``B_bound / B_avg``, in ``[0, 1]``; the paper uses 0.2. 1 gives uniform budgets.
    window:
        Observation window: LMBA is measured on the attention of the last ``window`` queries of the
        context (as SnapKV observes them), on the real softmax mass, with nothing padded or protected.
    skip_layers:
        Design variant (not in the paper; 0 = off): the first ``skip_layers`` layers keep exactly
        ``B_avg`` and take no part in the reallocation; Eq. 6 runs over the other layers with their
        total ``(L - skip_layers) * B_avg``. On SmolLM2, layer 0 attends almost uniformly (LMBA about
        half the context) and Eq. 6 would give it the whole context.
    gamma:
        Design variant (1 = the paper): Eq. 6 uses ``LMBA ** gamma`` in place of LMBA. ``gamma < 1``
        tempers the reallocation towards uniform (0 gives uniform budgets). Budgets follow the order
        of ``LMBA ** gamma`` in float64, so LMBAs whose powers underflow to the same value tie.
    max_multiple:
        Design variant (None = the paper): no layer keeps more than ``floor(max_multiple * B_avg)``
        tokens (``>= 1``); what the cap frees goes to the other layers as any cap's does.

    With the variants, the guarantees above hold among the layers that take part (all but the first
    ``skip_layers``), with the cap ``min(seq_len, floor(max_multiple * B_avg))``.
    """

    tau: float = 0.9
    bound_fraction: float = 0.2
    window: int = 64
    skip_layers: int = 0
    gamma: float = 1.0
    max_multiple: float | None = None

    name: ClassVar[str] = "zigzag"
    needs_lmba: ClassVar[bool] = True
    options: ClassVar[dict[str, tuple[str, type]]] = ZIGZAG_OPTIONS

    def __post_init__(self) -> None:
        check_tau(self.tau)
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be a positive int (last queries observed for LMBA); got {self.window!r}")
        if isinstance(self.bound_fraction, bool) or not isinstance(self.bound_fraction, (int, float)):
            raise TypeError(f"bound_fraction must be a float in [0, 1]; got {type(self.bound_fraction).__name__}")
        if not (0.0 <= self.bound_fraction <= 1.0):
            raise ValueError(
                f"bound_fraction must lie in [0, 1] (share of B_avg every layer keeps); got {self.bound_fraction}"
            )
        check_variant_options(self.skip_layers, self.gamma, self.max_multiple)

    def measure(self, attention: torch.Tensor, valid: torch.Tensor | None = None, kv_heads: int | None = None) -> torch.Tensor:
        """One layer's LMBA with this allocator's ``tau``: ``(batch, heads, seq) -> (batch,)`` float64
        (``kv_heads`` is not needed: the layer's LMBA averages over every query head).

        See :func:`lmba`. Stack the results of the ``L`` layers along dim 1 for :meth:`allocate`.
        ``attention`` is softmax mass (finite, ``>= 0``), so it is not read back to be checked: this
        runs inside the prefill, once per layer.
        """
        return lmba(attention, valid, self.tau, check_values=False)

    def bound(self, avg_budget: torch.Tensor) -> torch.Tensor:
        """``B_bound = floor(bound_fraction * avg_budget)``: ``(batch,)`` long -> ``(batch,)`` long."""
        return zigzag_bound(avg_budget, self.bound_fraction)

    def allocate(
        self,
        avg_budget: torch.Tensor | int | Sequence[int],
        seq_len: torch.Tensor | int | Sequence[int],
        num_layers: int,
        lmba: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return ZigZagKV budgets (Eq. 6 with an exact integer total).

        Args:
            avg_budget: ``(batch,)`` long, ``0 <= avg_budget <= seq_len``.
            seq_len: ``(batch,)`` long, unpadded length of each row (cap of every layer).
            num_layers: number of layers ``L >= 1``.
            lmba: ``(batch, num_layers)`` float, ``>= 0``: each layer's LMBA (:meth:`measure`).

        Returns:
            ``(batch, num_layers)`` long; row ``b`` sums to ``L * avg_budget[b]``, entries in
            ``[B_bound[b], seq_len[b]]``.
        """
        avg, seq, lm = check_allocate_args(avg_budget, seq_len, num_layers, lmba, needs_lmba=True)
        lm = cast(torch.Tensor, lm)
        skip = min(self.skip_layers, num_layers)
        out = avg[:, None].expand(avg.shape[0], num_layers).clone()
        if skip == num_layers:
            return out
        # apportion only uses ratios of the weights, so LMBA itself stands for u = LMBA / sum LMBA
        # (one division fewer, and no order-dependent sum before apportion's own).
        weights = lm[:, skip:] if self.gamma == 1.0 else lm[:, skip:].pow(self.gamma)
        cap = variant_cap(avg, seq, self.max_multiple)
        out[:, skip:] = apportion(weights, (num_layers - skip) * avg, lower=self.bound(avg)[:, None], upper=cap[:, None])
        return out

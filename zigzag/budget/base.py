"""The contract every budget allocator keeps: per-row average budget in, per-layer token budgets out.

An allocator never sees a model or a cache. The pipeline computes, for each row ``b`` of the batch,
``avg_budget[b] = int((1 - ratio) * T_b)`` from the row's unpadded length ``T_b`` and the
compression ratio, measures whatever per-layer statistic the allocator declares it needs
(``needs_lmba``), and calls :meth:`BudgetAllocator.allocate`. The budget of a layer applies to every
KV head of that layer.

Contract of ``allocate``, for every row ``b``:

* ``result[b].sum() == num_layers * avg_budget[b]`` exactly (the compression ratio is kept);
* ``0 <= result[b, l] <= seq_len[b]`` (a layer cannot keep more tokens than the row has).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

__all__ = ["BudgetAllocator", "check_allocate_args", "lmba_values"]


@runtime_checkable
class BudgetAllocator(Protocol):
    """A per-layer token budget allocator.

    Attributes read by the pipeline (class or instance attributes):
        name: registry name, e.g. ``"zigzag"``.
        needs_lmba: whether :meth:`allocate` needs the per-layer LMBA statistic
            (:func:`zigzag.budget.lmba`, measured with the allocator's own ``tau``).
    """

    name: str
    needs_lmba: bool

    def allocate(
        self,
        avg_budget: torch.Tensor,
        seq_len: torch.Tensor,
        num_layers: int,
        lmba: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return per-layer budgets.

        Args:
            avg_budget: ``(batch,)`` long, average tokens kept per layer, ``0 <= avg_budget <= seq_len``.
            seq_len: ``(batch,)`` long, unpadded length of each row (the cap of every layer).
            num_layers: number of attention layers ``L >= 1``.
            lmba: ``(batch, num_layers)`` float, ``>= 0``, or None when ``needs_lmba`` is False.

        Returns:
            ``(batch, num_layers)`` long; row ``b`` sums to ``num_layers * avg_budget[b]`` and lies in
            ``[0, seq_len[b]]``.
        """
        ...


def _as_long_vector(value: torch.Tensor | int | Sequence[int], arg: str) -> torch.Tensor:
    if isinstance(value, bool):
        raise TypeError(f"{arg} must be a (batch,) integer tensor; got a bool")
    if isinstance(value, torch.Tensor):
        t = value
    elif isinstance(value, numbers.Integral) or (isinstance(value, Sequence) and not isinstance(value, str)):
        t = torch.as_tensor(int(value) if isinstance(value, numbers.Integral) else value)
    else:
        raise TypeError(f"{arg} must be a (batch,) integer tensor; got {type(value).__name__}")
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise ValueError(f"{arg} must have an integer dtype (token counts); got {t.dtype}")
    if t.dim() == 0:
        t = t.reshape(1)
    if t.dim() != 1:
        raise ValueError(f"{arg} must have shape (batch,); got shape {tuple(t.shape)}")
    return t.long()


def check_allocate_args(
    avg_budget: torch.Tensor | int | Sequence[int],
    seq_len: torch.Tensor | int | Sequence[int],
    num_layers: int,
    lmba: torch.Tensor | None,
    needs_lmba: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Validate and normalize the arguments of :meth:`BudgetAllocator.allocate`.

    Ints and integer sequences are accepted for ``avg_budget`` / ``seq_len`` (a scalar is a batch of 1).

    Returns:
        ``(avg_budget, seq_len, lmba)``: ``(batch,)`` long, ``(batch,)`` long on ``avg_budget``'s
        device, and ``lmba`` as ``(batch, num_layers)`` float64 on that device (None if not needed).

    Raises:
        ValueError: on a wrong shape or dtype, ``num_layers < 1``, ``avg_budget`` outside
            ``[0, seq_len]``, a missing ``lmba`` when ``needs_lmba``, or a negative / non-finite ``lmba``.
    """
    avg = _as_long_vector(avg_budget, "avg_budget")
    seq = _as_long_vector(seq_len, "seq_len").to(avg.device)
    if isinstance(num_layers, bool) or not isinstance(num_layers, numbers.Integral):
        raise TypeError(f"num_layers must be an int; got {type(num_layers).__name__}")
    num_layers = int(num_layers)
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1; got {num_layers}")
    if seq.shape != avg.shape:
        raise ValueError(
            f"seq_len must have the shape of avg_budget ({avg.shape[0]},); got shape {tuple(seq.shape)}"
        )
    if bool((seq < 0).any()):
        raise ValueError(f"seq_len must be >= 0; got {seq.tolist()}")
    bad = (avg < 0) | (avg > seq)
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"avg_budget must lie in [0, seq_len] in every row; got avg_budget={avg[b].item()} with "
            f"seq_len={seq[b].item()} in row {b}"
        )
    if not needs_lmba:
        # The pipeline may pass lmba to every allocator; those that do not use it ignore it.
        return avg, seq, None
    if lmba is None:
        raise ValueError("lmba is required by this allocator (needs_lmba=True); got None")
    if not isinstance(lmba, torch.Tensor):
        raise TypeError(f"lmba must be a torch.Tensor of shape (batch, num_layers); got {type(lmba).__name__}")
    if tuple(lmba.shape) != (avg.shape[0], num_layers):
        raise ValueError(
            f"lmba must have shape (batch, num_layers) = ({avg.shape[0]}, {num_layers}); got {tuple(lmba.shape)}"
        )
    return avg, seq, lmba_values(lmba, avg.device)


def lmba_values(lmba: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``lmba`` (any shape) as float64 on ``device``, checked to be real, finite and ``>= 0``.

    Raises:
        ValueError: on a bool or complex dtype, inf / nan, or a negative entry.
    """
    if lmba.dtype == torch.bool or lmba.is_complex():
        raise ValueError(f"lmba must be real; got dtype {lmba.dtype}")
    lm = lmba.to(device=device, dtype=torch.float64)
    if not bool(torch.isfinite(lm).all()):
        raise ValueError("lmba must be finite; got inf or nan")
    if bool((lm < 0).any()):
        raise ValueError(f"lmba must be >= 0 (a token count); got a minimum of {lm.min().item()}")
    return lm

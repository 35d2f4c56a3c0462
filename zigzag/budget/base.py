"""The contract every budget allocator keeps: per-row average budget in, token budgets out.

An allocator never sees a model or a cache. The pipeline (:mod:`zigzag.pipeline.plan`) computes, for
each row ``b`` of the batch, ``avg_budget[b]`` (``floor((1 - ratio) * T_b)`` from the row's unpadded
length ``T_b``, exactly), measures the statistic the allocator declares it needs (``needs_lmba``),
calls :meth:`BudgetAllocator.allocate`, and checks what comes back.

Every member the pipeline reads is declared on :class:`BudgetAllocator`; subclass it to inherit the
defaults, or write a class of your own with the same members (``check_allocator`` says which one is
missing). ``granularity`` says what the budgets are:

* ``"layer"``: ``allocate`` returns ``(batch, num_layers)``; every KV head of a layer keeps as many.
* ``"head"``: ``allocate`` returns ``(batch, num_layers, kv_heads)``, and ``measure`` (when
  ``needs_lmba``) gives one LMBA per KV head, ``(batch, kv_heads)``.
* ``"split"``: ``allocate`` returns ``(batch, num_layers)``; inside each layer, ``split_heads`` then
  shares the layer's budget between its KV heads from that layer's scores (AdaKV).

Contract, checked by the pipeline for every row ``b`` (an error names the allocator):

* the total is exact: ``result[b].sum() == num_layers * avg_budget[b]`` (times ``kv_heads`` for
  ``"head"``), and each layer's ``split_heads`` sums to ``kv_heads`` times the layer's budget;
* ``0 <= budget <= seq_len[b]``: a layer (or head) cannot keep more tokens than the row has.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import ClassVar, Literal

import torch

__all__ = ["GRANULARITIES", "BudgetAllocator", "Granularity", "check_allocate_args", "check_allocator", "lmba_values"]

Granularity = Literal["layer", "head", "split"]
GRANULARITIES: tuple[str, ...] = ("layer", "head", "split")


class BudgetAllocator:
    """Base of budget allocators: the members the pipeline reads, with their defaults.

    Attributes (class or instance attributes):
        name: registry name, e.g. ``"zigzag"`` (registries are built from it).
        granularity: ``"layer"``, ``"head"`` or ``"split"`` (see the module docstring).
        needs_lmba: whether :meth:`allocate` needs each layer's LMBA, measured by :meth:`measure`.
        window: last queries of the context whose attention mass :meth:`measure` reads (only read when
            ``needs_lmba``); ZigZag observes 64, as SnapKV does.
        options: the name suffixes the registry parses (below).
        calibrated: whether the class is built from a profile measured offline (the registry then
            needs ``get_budget(name, profile=...)``); the pipeline never reads it.

    Subclasses implement :meth:`allocate`, plus :meth:`measure` when ``needs_lmba`` and
    :meth:`split_heads` when ``granularity == "split"``.
    """

    name: ClassVar[str] = ""
    granularity: ClassVar[Granularity] = "layer"
    needs_lmba: ClassVar[bool] = False
    window: int = 0
    calibrated: ClassVar[bool] = False
    options: ClassVar[dict[str, tuple[str, type]]] = {}
    """Name suffixes ``+<option><value>`` that :func:`zigzag.budget.get_budget` understands: option ->
    (constructor argument, type); e.g. ``{"skip": ("skip_layers", int)}`` makes ``"zigzag+skip2"``."""

    def measure(self, attention: torch.Tensor, valid: torch.Tensor | None, kv_heads: int) -> torch.Tensor:
        """One layer's LMBA from the window's attention mass.

        Args:
            attention: ``(batch, heads, seq)`` float, the softmax attention each token gets from the last
                ``window`` queries, averaged over them, per query head.
            valid: ``(batch, seq)`` bool, False on padding, or None.
            kv_heads: KV heads of the layer (query head ``h`` reads KV head ``h // (heads // kv_heads)``).

        Returns:
            ``(batch,)`` float for ``"layer"`` granularity, ``(batch, kv_heads)`` for ``"head"``.
        """
        raise NotImplementedError(f"budget {self.name!r} sets needs_lmba but does not implement measure()")

    def allocate(
        self,
        avg_budget: torch.Tensor,
        seq_len: torch.Tensor,
        num_layers: int,
        lmba: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return the budgets.

        Args:
            avg_budget: ``(batch,)`` long, average tokens kept per layer (and KV head), ``0 <= avg_budget <= seq_len``.
            seq_len: ``(batch,)`` long, tokens each layer of the row can keep (its unpadded length).
            num_layers: number of attention layers ``L >= 1``.
            lmba: ``(batch, L)`` float (``(batch, L, kv_heads)`` for ``"head"``), ``>= 0``; None unless
                ``needs_lmba``.

        Returns:
            ``(batch, L)`` long (``(batch, L, kv_heads)`` for ``"head"``); row ``b`` sums to
            ``L * avg_budget[b]`` (times ``kv_heads``) and lies in ``[0, seq_len[b]]``.
        """
        raise NotImplementedError(f"budget {self.name!r} does not implement allocate()")

    def split_heads(self, scores: torch.Tensor, valid: torch.Tensor, layer_budget: torch.Tensor) -> torch.Tensor:
        """Share one layer's budget between its KV heads (``"split"`` granularity only).

        Args:
            scores: ``(batch, kv_heads, seq)`` float32 scores of the layer (higher = keep; ``-inf`` on padding).
            valid: ``(batch, seq)`` bool, False on padding.
            layer_budget: ``(batch,)`` long, the layer's tokens per KV head.

        Returns:
            ``(batch, kv_heads)`` long, row ``b`` summing to ``kv_heads * layer_budget[b]``, each entry in
            ``[0, valid tokens of the row]``.
        """
        raise NotImplementedError(f"budget {self.name!r} has granularity 'split' but does not implement split_heads()")


_ALLOCATOR_MEMBERS = {"name": str, "granularity": str, "needs_lmba": bool}


def check_allocator(allocator: object) -> None:
    """Raise ``TypeError`` naming the first member of the allocator protocol that ``allocator`` lacks.

    Checks ``name``, ``granularity``, ``needs_lmba`` and ``allocate``; ``window`` and ``measure`` when
    ``needs_lmba``; ``split_heads`` when ``granularity == "split"``.
    """
    who = type(allocator).__name__
    for member, kind in _ALLOCATOR_MEMBERS.items():
        if not hasattr(allocator, member):
            raise TypeError(f"budget allocator {who} has no attribute {member!r} (see zigzag.budget.BudgetAllocator)")
        if not isinstance(getattr(allocator, member), kind):
            raise TypeError(f"budget allocator {who}.{member} must be a {kind.__name__}; got {getattr(allocator, member)!r}")
    if allocator.granularity not in GRANULARITIES:
        raise TypeError(f"budget allocator {who}.granularity must be one of {GRANULARITIES}; got {allocator.granularity!r}")
    needed = ["allocate"]
    if allocator.needs_lmba:
        needed += ["window", "measure"]
    if allocator.granularity == "split":
        needed.append("split_heads")
    for member in needed:
        if not hasattr(allocator, member):
            raise TypeError(f"budget allocator {who} has no attribute {member!r} (see zigzag.budget.BudgetAllocator)")
    if allocator.needs_lmba:
        window = allocator.window
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise TypeError(f"budget allocator {who}.window must be a positive int (queries observed for LMBA); got {window!r}")


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

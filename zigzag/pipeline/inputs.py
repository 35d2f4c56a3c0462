"""What a compression call is given, validated once: the context, the ratio and the methods.

Every check raises a ``ValueError`` or ``TypeError`` that names the argument, what is allowed and
what was received.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction

import torch

from zigzag.budget import BudgetAllocator, get_budget
from zigzag.merge import get_merge
from zigzag.scorers import Scorer, get_scorer

DEFAULT_SCORER = "expected_attention+pool25"
"""The default scorer: ExpectedAttention with its scores averaged over 25 neighbours, the best robust
choice measured on the RULER-style sets (benchmarks/RESULTS.md)."""
DEFAULT_BUDGET = "uniform"
"""The default budget: every layer keeps as many tokens (the most robust across ratios measured)."""


@dataclass(frozen=True)
class Context:
    """A validated, left-padded batch of context tokens on the model's device.

    Attributes:
        input_ids: ``(batch, seq)`` long.
        valid: ``(batch, seq)`` bool, False on left padding.
        positions: ``(batch, seq)`` long RoPE positions, 0 on padding.
        lengths: ``(batch,)`` long unpadded lengths.
        padded: whether some row has padding (read once here, so that no layer has to ask the device).
    """

    input_ids: torch.Tensor
    valid: torch.Tensor
    positions: torch.Tensor
    lengths: torch.Tensor
    padded: bool

    @property
    def seq(self) -> int:
        return self.input_ids.shape[1]


def as_context(inputs, device: torch.device) -> Context:
    """Validate a tokenizer output (or a tensor of ids) and put it on ``device``.

    Args:
        inputs: a mapping with ``input_ids`` and optionally ``attention_mask`` (0/1, left padding),
            each ``(batch, seq)`` or ``(seq,)``; or an integer tensor of ids.

    Raises:
        TypeError / ValueError: a wrong type, shape or dtype, an empty batch, a row of padding only,
            a mask that is not 0/1, or right padding.
    """
    if isinstance(inputs, torch.Tensor):
        input_ids, attention_mask = inputs, None
    elif isinstance(inputs, Mapping):
        if "input_ids" not in inputs:
            raise ValueError(f"inputs must contain 'input_ids'; got keys {sorted(inputs.keys())}")
        input_ids, attention_mask = inputs["input_ids"], inputs.get("attention_mask")
    else:
        raise TypeError(
            "inputs must be a tokenizer output (a mapping with 'input_ids' and optionally 'attention_mask') "
            f"or a LongTensor of ids; got {type(inputs).__name__}"
        )
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"input_ids must be an integer tensor; got {type(input_ids).__name__} {getattr(input_ids, 'dtype', '')}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(f"input_ids must be a non-empty (batch, seq) tensor; got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor; got {type(attention_mask).__name__}")
    if attention_mask.dim() == 1:
        attention_mask = attention_mask[None]
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
        )
    valid = attention_mask.to(device=device) != 0
    if attention_mask.dtype not in (torch.bool, torch.int32, torch.int64) or not bool(
        ((attention_mask == 0) | (attention_mask == 1)).all()
    ):
        raise ValueError("attention_mask must hold only 0 and 1 (a 4D or float mask is not supported here)")
    lengths = valid.sum(dim=-1)
    if bool((lengths == 0).any()):
        raise ValueError(f"every row needs at least one real token; rows {lengths.eq(0).nonzero().flatten().tolist()} are all padding")
    # Left padding only: once a row starts, it never pads again.
    if bool((valid[:, :-1] & ~valid[:, 1:]).any()):
        raise ValueError(
            "zigzag needs left padding (padding before the tokens): set tokenizer.padding_side = 'left'"
        )
    positions = (valid.long().cumsum(dim=-1) - 1).clamp(min=0)
    padded = bool((lengths < valid.shape[1]).any())
    return Context(input_ids.to(device=device, dtype=torch.long), valid, positions, lengths, padded)


def check_ratio(ratio) -> float:
    """``ratio`` (the fraction of the cache removed) as a float in ``[0, 1)``."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"ratio must be a float in [0, 1) (fraction of the cache removed); got {type(ratio).__name__}")
    if math.isnan(ratio) or not (0.0 <= float(ratio) < 1.0):
        raise ValueError(f"ratio must be in [0, 1) (fraction of the cache removed); got {ratio}")
    return float(ratio)


def kept_tokens(lengths: torch.Tensor, ratio: float) -> torch.Tensor:
    """``floor((1 - ratio) * T)`` tokens kept per layer of each row, without floating-point error.

    ``ratio`` is read as the decimal it prints as (``0.9`` is 9/10, not the binary float just above it),
    so 100 tokens at ratio 0.9 keep 10 and 5 tokens at ratio 0.8 keep 1, where ``int((1 - ratio) * T)``
    gives 9 and 0. Ratios with long expansions are read as the nearest fraction with a denominator up
    to 2**20 (``1/3`` for ``0.3333333333333333``).

    Args:
        lengths: ``(batch,)`` long, tokens of each row.
        ratio: fraction removed, in ``[0, 1)``.

    Returns:
        ``(batch,)`` long on the host.
    """
    fraction = Fraction(repr(float(ratio))).limit_denominator(1 << 20)
    keep, whole = fraction.denominator - fraction.numerator, fraction.denominator
    return torch.tensor([keep * int(t) // whole for t in lengths.tolist()], dtype=torch.long)


@dataclass(frozen=True)
class Keep:
    """How many tokens each layer keeps per KV head, on average over layers: a ratio or a token budget.

    Exactly one of the two is set (:func:`check_keep`).

    Attributes:
        ratio: fraction of the cache removed, in ``[0, 1)``: a row of ``T`` tokens keeps
            ``floor((1 - ratio) * T)`` (:func:`kept_tokens`).
        max_tokens: tokens kept per layer and KV head, ``>= 1``: a row of ``T`` tokens keeps
            ``min(max_tokens, T)``, so rows shorter than the budget keep everything.
    """

    ratio: float | None = None
    max_tokens: int | None = None

    def per_layer(self, lengths: torch.Tensor) -> torch.Tensor:
        """``(batch,)`` long on the host: the average tokens kept per layer by rows of ``lengths`` tokens."""
        if self.max_tokens is not None:
            return lengths.cpu().long().clamp(max=self.max_tokens)
        return kept_tokens(lengths, self.ratio)


def check_keep(ratio, max_tokens) -> Keep:
    """The :class:`Keep` rule of exactly one of ``ratio`` / ``max_tokens``, both checked."""
    if (ratio is None) == (max_tokens is None):
        raise ValueError(
            "give exactly one of ratio (fraction of the cache removed) and max_tokens (tokens kept per layer "
            f"and KV head); got ratio={ratio!r}, max_tokens={max_tokens!r}"
        )
    if max_tokens is None:
        return Keep(ratio=check_ratio(ratio))
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int (tokens kept per layer and KV head); got {max_tokens!r}")
    return Keep(max_tokens=max_tokens)


def resolve_methods(scorer, budget, merge) -> tuple[Scorer, BudgetAllocator, object | None]:
    """Names or objects -> the scorer, the budget allocator and the merge (or None), each checked
    against its protocol (a missing member raises ``TypeError`` naming it)."""
    return get_scorer(scorer), get_budget(budget), get_merge(merge)

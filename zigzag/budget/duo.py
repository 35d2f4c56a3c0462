"""DuoAttention budgets: streaming KV heads keep sinks + a recent window, retrieval heads keep the rest.

DuoAttention (https://arxiv.org/abs/2410.10819) gives a full cache to *retrieval* heads and a cache of
``n_sink`` attention sinks plus the ``recent`` last tokens to *streaming* heads. It learns which heads
stream; zigzag measures it offline instead (:func:`zigzag.calibrate.measure_head_patterns`): the
deviation of each (layer, KV head)'s attention output when that head only sees the sinks and the recent
window. The heads that deviate least become streaming heads.

Budgets, per row (``N = L * H`` KV heads, ``B`` the average budget, ``T`` the row's length,
``S = n_sink + recent``):

* streaming heads keep ``s = min(S, B)`` tokens;
* there are ``k = floor(N * (T - B) / (T - s))`` of them (none when ``s = T``): the most that leave
  the retrieval heads room, i.e. the fewest retrieval heads that can hold the rest without any of them
  exceeding ``T``. With ``B = s`` every head streams;
* the ``N - k`` retrieval heads split ``N * B - k * s`` evenly (within one token,
  :func:`~zigzag.budget.apportion`), each ``<= T``: a full cache, or as close to one as the budget
  allows.

The ``k`` heads with the smallest deviations stream (ties: the lower ``(layer, head)`` index streams
first). Pair it with the StreamingLLM scorer with the same sinks, ``StreamingLLM(n_sink=n_sink)``:
every head then keeps its sinks and its most recent tokens, so a streaming head holds exactly
``n_sink`` sinks and ``recent`` recent tokens and a retrieval head a (nearly) full cache — DuoAttention.
With another scorer the budgets stay the same and the scorer picks which tokens fill them.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from zigzag.budget.apportion import apportion
from zigzag.budget.base import BudgetAllocator, check_allocate_args

__all__ = ["DUO_OPTIONS", "DuoAttention", "duo_head_budgets", "read_duo_profile"]

DUO_OPTIONS: dict[str, tuple[str, type]] = {"sink": ("n_sink", int), "recent": ("recent", int)}
"""Name suffixes: ``duo+sink64`` is ``n_sink=64``, ``+recent512`` is ``recent=512``."""


def _as_head_table(weights: object) -> tuple[tuple[float, ...], ...]:
    """``(L, H)`` nested sequence (or a flat ``(L,)`` one: a single KV head per layer) -> tuple of
    float tuples, checked to be rectangular, non-empty, finite and ``>= 0``."""
    if isinstance(weights, torch.Tensor):
        weights = weights.tolist()
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or not weights:
        raise ValueError(f"weights must be a non-empty (num_layers, kv_heads) table of deviations; got {weights!r}")
    rows = [row if isinstance(row, Sequence) and not isinstance(row, (str, bytes)) else (row,) for row in weights]
    if len({len(row) for row in rows}) != 1 or not rows[0]:
        raise ValueError(f"weights must have the same number (>= 1) of KV heads in every layer; got {weights!r}")
    table = []
    for row in rows:
        values = []
        for w in row:
            if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w) or w < 0:
                raise ValueError(f"weights must be finite and >= 0; got {w!r} in {weights!r}")
            values.append(float(w))
        table.append(tuple(values))
    return tuple(table)


def read_duo_profile(path: str | os.PathLike[str]) -> dict:
    """The JSON profile written by :func:`zigzag.calibrate.calibrate_duo`; checks that its ``"layers"``
    is a rectangular ``(num_layers, kv_heads)`` table of finite values ``>= 0``."""
    with open(path, encoding="utf-8") as f:
        profile = json.load(f)
    layers = profile.get("layers") if isinstance(profile, dict) else None
    try:
        _as_head_table(layers)
    except ValueError as err:
        raise ValueError(f"{path} is not a DuoAttention profile: {err}") from None
    return profile


def _check_window(n_sink: object, recent: object) -> None:
    for arg, value, least in (("n_sink", n_sink, 0), ("recent", recent, 1)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            raise ValueError(f"{arg} must be an int >= {least}; got {value!r}")


def duo_head_budgets(
    deviations: torch.Tensor,
    avg_budget: torch.Tensor | int | Sequence[int],
    seq_len: torch.Tensor | int | Sequence[int],
    n_sink: int = 128,
    recent: int = 256,
) -> torch.Tensor:
    """Streaming / retrieval budgets of every (layer, KV head) (the rule of the module docstring).

    Args:
        deviations: ``(L, H)`` float ``>= 0``, each (layer, KV head)'s streaming deviation (the heads
            with the smallest become streaming heads).
        avg_budget: ``(batch,)`` long, ``0 <= avg_budget <= seq_len``: average tokens per (layer, head).
        seq_len: ``(batch,)`` long, unpadded length of each row (the cap of every head).
        n_sink, recent: a streaming head keeps ``min(n_sink + recent, avg_budget)`` tokens.

    Returns:
        ``(batch, L, H)`` long. Row ``b`` sums to exactly ``L * H * avg_budget[b]``; streaming heads hold
        ``s`` tokens, retrieval heads between ``s`` and ``seq_len[b]``, within one token of each other.
    """
    _check_window(n_sink, recent)
    if not isinstance(deviations, torch.Tensor) or deviations.dim() != 2 or 0 in deviations.shape:
        raise ValueError(
            f"deviations must be a (num_layers, kv_heads) tensor; got {getattr(deviations, 'shape', deviations)!r}"
        )
    num_layers, heads = deviations.shape
    avg, seq, _ = check_allocate_args(avg_budget, seq_len, num_layers, None, needs_lmba=False)
    n = num_layers * heads
    s = torch.clamp(avg, max=n_sink + recent)  # (batch,)
    room = seq - s
    # Integer arithmetic: floor(n * (T - B) / (T - s)) exactly; s == T only when B == T (nothing streams).
    streaming_count = torch.where(room > 0, (n * (seq - avg)) // room.clamp_min(1), 0).clamp(0, n)
    # Rank 0 is the smallest deviation; a stable sort makes the lower index win ties.
    order = torch.argsort(deviations.reshape(n).to(torch.float64), stable=True).to(avg.device)
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(n, device=avg.device))
    streaming = rank[None, :] < streaming_count[:, None]  # (batch, n)
    upper = torch.where(streaming, s[:, None], seq[:, None])
    # Streaming heads are pinned at s (lower == upper); the retrieval heads share the rest evenly.
    out = apportion((~streaming).to(torch.float64), n * avg, lower=s[:, None].expand(-1, n), upper=upper)
    return out.reshape(avg.shape[0], num_layers, heads)


@dataclass(frozen=True)
class DuoAttention(BudgetAllocator):
    """DuoAttention's retrieval and streaming heads as per-(layer, KV head) budgets.

    Paper: https://arxiv.org/abs/2410.10819 ("DuoAttention: Efficient Long-Context LLM Inference with
    Retrieval and Streaming Heads", Xiao et al., 2024). Budgets by :func:`duo_head_budgets`; pair with
    ``StreamingLLM(n_sink=n_sink)`` so that streaming heads hold exactly their sinks and recent window
    (see the module docstring).

    Parameters
    ----------
    weights:
        ``(num_layers, kv_heads)`` streaming deviations, finite and ``>= 0`` (nested sequences or a
        tensor; a flat sequence is one KV head per layer): the ``"layers"`` of a profile from
        :func:`zigzag.calibrate.measure_head_patterns`; :meth:`from_file` reads one. Only their order
        matters.
    n_sink, recent:
        Sink and recent tokens of a streaming head: 128 and 256, the sizes DuoAttention's released
        head patterns were trained with (``sink_size`` / ``recent_size`` of every pattern's
        ``config.json`` in https://github.com/mit-han-lab/duo-attention). Use the values the profile was
        measured with.

    ``granularity = "head"``: :meth:`allocate` returns ``(batch, num_layers, kv_heads)``; it needs no
    statistic of the prompt.
    """

    weights: tuple[tuple[float, ...], ...] | None = None
    n_sink: int = 128
    recent: int = 256

    name: ClassVar[str] = "duo"
    granularity: ClassVar[str] = "head"
    needs_lmba: ClassVar[bool] = False
    calibrated: ClassVar[bool] = True
    options: ClassVar[dict[str, tuple[str, type]]] = DUO_OPTIONS

    def __post_init__(self) -> None:
        if self.weights is None:
            raise ValueError(
                "duo budgets need calibrated head patterns: DuoAttention.from_file(path), or "
                "get_budget('duo', profile=path); write one with `python -m zigzag.calibrate duo`"
            )
        object.__setattr__(self, "weights", _as_head_table(self.weights))
        _check_window(self.n_sink, self.recent)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **options: int) -> DuoAttention:
        """The allocator for the profile at ``path`` (:func:`read_duo_profile`); ``n_sink`` and
        ``recent`` default to those the profile was measured with."""
        profile = read_duo_profile(path)
        config = profile.get("config") if isinstance(profile.get("config"), dict) else {}
        for field in ("n_sink", "recent"):
            if field not in options and field in config:
                options[field] = config[field]
        return cls(weights=profile["layers"], **options)

    @property
    def kv_heads(self) -> int:
        """KV heads per layer of the profile."""
        assert self.weights is not None  # __post_init__ guarantees it
        return len(self.weights[0])

    def allocate(
        self,
        avg_budget: torch.Tensor | int | Sequence[int],
        seq_len: torch.Tensor | int | Sequence[int],
        num_layers: int,
        lmba: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return ``(batch, num_layers, kv_heads)`` long budgets; row ``b`` sums to
        ``num_layers * kv_heads * avg_budget[b]``.

        Args:
            avg_budget: ``(batch,)`` long, ``0 <= avg_budget <= seq_len``.
            seq_len: ``(batch,)`` long, unpadded length of each row (cap of every head).
            num_layers: must equal the profile's number of layers.
            lmba: ignored.

        Raises:
            ValueError: the profile was measured on a model with another number of layers.
        """
        check_allocate_args(avg_budget, seq_len, num_layers, lmba, needs_lmba=False)
        assert self.weights is not None
        if len(self.weights) != num_layers:
            raise ValueError(f"the duo profile has {len(self.weights)} layers, the model {num_layers}")
        deviations = torch.tensor(self.weights, dtype=torch.float64)
        return duo_head_budgets(deviations, avg_budget, seq_len, self.n_sink, self.recent)

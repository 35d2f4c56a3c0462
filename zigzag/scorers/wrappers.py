"""Scorer wrappers aimed at retrieval under query-agnostic compression (design variants, not papers).

* :class:`Protected` keeps the first and/or the last tokens of the context whatever their scores: the
  chat header and the task instruction at the start ("Some special magic numbers are hidden within
  the following text..."), and the most recent tokens before the question. Name suffixes
  ``+first<n>`` and ``+last<n>``.
* :class:`HeadShared` makes every KV head of a layer keep the same tokens, chosen from the heads'
  scores together. A needle then survives in every head, including whichever one retrieves it at
  answer time. Name suffixes ``+shared`` (mean of the heads' normalized scores) and ``+sharedmax``
  (their maximum: a token any head ranks high is kept).

Both pass their inner scorer's needs through, so they compose with :class:`SpanPooled` and with
each other: ``expected_attention+pool5+shared+first64`` pools, then shares, then protects.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zigzag.scorers.base import LayerView, Scorer, ScorerWrapper
from zigzag.scorers.window import raise_protected


@dataclass
class Protected(ScorerWrapper):
    """Lift the first ``first`` and the last ``last`` valid tokens of each row above all others.

    Positions count valid tokens only (``layer.positions``), so left padding does not move the
    protected span. Protected tokens keep their inner order among themselves (see
    :func:`~zigzag.scorers.window.raise_protected`): when a budget is smaller than the protected
    span, the inner scorer still decides among them.

    Args:
        inner: the scorer whose scores are lifted.
        first: leading valid tokens kept (the prompt's header and instruction), ``>= 0``.
        last: trailing valid tokens kept (recency), ``>= 0``.
    """

    inner: Scorer
    first: int = 64
    last: int = 0

    def __post_init__(self) -> None:
        for arg in ("first", "last"):
            value = getattr(self, arg)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{arg} must be a non-negative int (tokens protected); got {value!r}")

    @property
    def name(self) -> str:
        return self.inner.name + (f"+first{self.first}" if self.first else "") + (f"+last{self.last}" if self.last else "")

    def score(self, layer: LayerView) -> torch.Tensor:
        """``(batch, kv_heads, seq)``: the inner scores, protected tokens lifted."""
        scores = self.inner.score(layer).float()
        device = scores.device
        valid = layer.valid.to(device=device, dtype=torch.bool)
        positions = layer.positions.to(device)
        last = positions.masked_fill(~valid, -1).amax(dim=-1, keepdim=True)  # (batch, 1)
        protected = valid & ((positions < self.first) | (positions > last - self.last))
        return raise_protected(scores, protected, valid)


@dataclass
class HeadShared(ScorerWrapper):
    """The same scores in every KV head of a layer, so that all heads keep the same tokens.

    Each head's scores are first made comparable across heads by their rank: a token's normalized
    score is the fraction of the row's valid tokens it beats in that head, in ``[0, 1]`` (ties share
    their mean rank). ``reduce="mean"`` averages these over the heads; ``reduce="max"`` takes the
    best one. Ranks are indifferent to each head's scale, and to tokens a scorer lifts to protect
    them (sinks stay on top in every head).

    Args:
        inner: the scorer whose per-head scores are combined.
        reduce: ``"mean"`` or ``"max"``.
    """

    inner: Scorer
    reduce: str = "mean"

    def __post_init__(self) -> None:
        if self.reduce not in ("mean", "max"):
            raise ValueError(f"reduce must be 'mean' or 'max'; got {self.reduce!r}")

    @property
    def name(self) -> str:
        return self.inner.name + ("+shared" if self.reduce == "mean" else "+sharedmax")

    def score(self, layer: LayerView) -> torch.Tensor:
        """``(batch, kv_heads, seq)``: one score per token, repeated over the KV heads."""
        scores = self.inner.score(layer).float()
        batch, kv_heads, seq = scores.shape
        valid = layer.valid.to(device=scores.device, dtype=torch.bool)[:, None, :].expand_as(scores)
        s = scores.masked_fill(~valid, float("-inf"))
        # Mean rank of each value among its row's valid values: (#less + (#equal - 1) / 2) / (n - 1).
        ordered = s.sort(dim=-1).values
        less = torch.searchsorted(ordered, s.contiguous(), right=False)
        equal = torch.searchsorted(ordered, s.contiguous(), right=True) - less
        pad = (~valid).sum(dim=-1, keepdim=True)  # the -inf of padding sort first; they are not beaten
        n = (seq - pad).clamp(min=2).to(torch.float32)
        rank = ((less - pad).to(torch.float32) + (equal - 1).to(torch.float32) / 2) / (n - 1)
        rank = rank.masked_fill(~valid, 0.0)
        shared = rank.mean(dim=1) if self.reduce == "mean" else rank.amax(dim=1)
        return shared[:, None, :].expand(batch, kv_heads, seq).contiguous()

"""Span pooling: smooth any scorer's scores along the sequence so that spans survive together.

Scorers that rank single tokens tear multi-token facts apart: SmolLM2 writes a 7-digit number as 7
tokens, and keeping 5 of them is as bad as keeping none (on SmolLM2's needle prompts, most (layer,
head) pairs lose at least one digit at ratio 0.5). SnapKV pools its attention scores for this reason
(arXiv 2404.14469, Sec. 4.2); :class:`SpanPooled` applies the same 1-D average pooling to any scorer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from zigzag.scorers.base import LayerView, Scorer, ScorerWrapper


@dataclass
class SpanPooled(ScorerWrapper):
    """Average-pool another scorer's scores over ``kernel_size`` neighbouring tokens.

    Args:
        inner: the scorer whose scores are pooled (its needs are passed through).
        kernel_size: odd window, in tokens; 1 leaves the scores unchanged.
        mode: ``"mean"`` (average pooling, SnapKV's) or ``"max"``: every token takes the best score
            within ``kernel_size // 2`` tokens of it, so the neighbours of a high-scoring token
            (the rest of its span) rank with it instead of being diluted. Name suffix ``+pool<k>``
            for ``"mean"``, ``+maxpool<k>`` for ``"max"``.

    Padding (the pipeline's ``-inf`` comes later) is excluded: pooling reads only valid tokens, so a
    left-padded row pools like the same row without padding.
    """

    inner: Scorer
    kernel_size: int = 5
    mode: str = "mean"

    def __post_init__(self) -> None:
        if not isinstance(self.kernel_size, int) or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int; got {self.kernel_size!r}")
        if self.mode not in ("mean", "max"):
            raise ValueError(f"mode must be 'mean' or 'max'; got {self.mode!r}")

    @property
    def name(self) -> str:
        return f"{self.inner.name}+{'max' if self.mode == 'max' else ''}pool{self.kernel_size}"

    def score(self, layer: LayerView) -> torch.Tensor:
        """``(batch, kv_heads, seq)``: the inner scores, averaged over valid neighbours."""
        scores = self.inner.score(layer).float()
        if self.kernel_size == 1:
            return scores
        batch, kv_heads, seq = scores.shape
        valid = layer.valid[:, None, :].expand(batch, kv_heads, seq).float().reshape(batch * kv_heads, 1, seq)
        pad = self.kernel_size // 2
        if self.mode == "max":  # max_pool1d pads with -inf, so padding and the edges never win
            flat = scores.reshape(batch * kv_heads, 1, seq).masked_fill(valid == 0, float("-inf"))
            pooled = F.max_pool1d(flat, self.kernel_size, stride=1, padding=pad).reshape(batch, kv_heads, seq)
            return torch.where(layer.valid[:, None, :].to(scores.device), pooled, scores)
        flat = scores.reshape(batch * kv_heads, 1, seq).masked_fill(valid == 0, 0.0)
        total = F.avg_pool1d(flat, self.kernel_size, stride=1, padding=pad, count_include_pad=True)
        count = F.avg_pool1d(valid, self.kernel_size, stride=1, padding=pad, count_include_pad=True)
        return (total / count.clamp(min=1e-9)).reshape(batch, kv_heads, seq)

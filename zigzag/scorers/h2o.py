"""H2O: keep the heavy hitters, the tokens that accumulate the most attention, and the recent tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from zigzag.scorers.base import LayerView, Scorer
from zigzag.scorers.observed import ALL_QUERIES, _check_window_and_block, _received_attention
from zigzag.scorers.window import group_mean, raise_protected


@dataclass
class H2O(Scorer):
    """Score each token by the attention it accumulates from every query; the recent tokens are kept.

    Paper: https://arxiv.org/abs/2306.14048 ("H2O: Heavy-Hitter Oracle for Efficient Generative
    Inference of Large Language Models", Zhang et al., 2023).

    1. Accumulated attention (the paper's heavy-hitter statistic): the softmax attention each key
       receives, *summed* over the valid queries that see it, not normalized, so early tokens, which
       more queries see, are favoured as in the paper. Averaged over the query heads of each KV group.
       The blocked computation is :class:`~zigzag.scorers.observed.ObservedAttention`'s (same
       ``window`` and ``block_size``).
    2. The last ``floor(recent_ratio * n)`` valid tokens of a row of ``n`` are lifted above every other
       token (:func:`~zigzag.scorers.window.raise_protected`, keeping their order): the paper keeps
       the recent tokens beside the heavy hitters. Its default budget is 20% of the prompt, half heavy
       hitters and half recent tokens (``heavy_ratio = recent_ratio = 0.1`` in the authors'
       ``h2o_hf`` experiments), so 10% of the prompt is the recent window. ``floor`` is the authors'
       ``int(recent_ratio * length)``; the count is of the row's valid tokens, so padding does not
       move it.

    H2O evicts greedily while generating, token by token; after a prefill the same statistic is the
    attention of all the prompt's queries, which is what is scored here.

    Parameters
    ----------
    recent_ratio:
        Share of the row's valid tokens at its end that is always kept, in ``[0, 1]``; 0 keeps none.
    window:
        Last queries read; None reads every query passed (see ``ObservedAttention``).
    block_size:
        Queries processed together; memory is ``O(heads * block_size * seq)``.
    """

    recent_ratio: float = 0.1
    window: int | None = None
    block_size: int = 256

    name: ClassVar[str] = "h2o"
    needs_query_stats: ClassVar[bool] = False
    query_stats_skip: ClassVar[int] = 0

    def __post_init__(self) -> None:
        ratio = self.recent_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
            raise ValueError(f"recent_ratio must be a float in [0, 1] (share of recent tokens kept); got {ratio!r}")
        _check_window_and_block(self.window, self.block_size)

    @property
    def query_window(self) -> int:
        """Last queries the pipeline must pass: ``window``, or :data:`ALL_QUERIES` for every one."""
        return ALL_QUERIES if self.window is None else self.window

    def score(self, layer: LayerView) -> torch.Tensor:
        """Return H2O scores.

        Args:
            layer: the layer; reads ``keys: (batch, kv_heads, seq, head_dim)``, ``valid: (batch, seq)``,
                ``scaling`` and ``window_queries: (batch, heads, w, head_dim)`` (the last ``w`` tokens).

        Returns:
            ``(batch, kv_heads, seq)`` float32; higher means keep.
        """
        sums, _ = _received_attention(layer, self.window, self.block_size, type(self).__name__)
        mass = group_mean(sums, layer.kv_heads)  # (batch, kv_heads, seq)
        valid = layer.valid.to(device=mass.device, dtype=torch.bool)
        # float64 as the authors' Python int(ratio * length), so that e.g. 0.1 * 30 keeps 3 tokens.
        n_recent = (valid.sum(dim=-1, keepdim=True).to(torch.float64) * float(self.recent_ratio)).floor()
        from_end = valid.flip(-1).cumsum(-1).flip(-1)  # 1 at the row's last valid token, 2 before it, ...
        recent = valid & (from_end <= n_recent)
        return raise_protected(mass, recent, valid)

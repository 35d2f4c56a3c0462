"""ObservedAttention: rank tokens by the attention every query of the context gives them.

The attention of all the context's queries is a ``(seq x seq)`` matrix; it is never built. The
queries go in blocks of ``block_size``: a block whose last query sits at sequence index ``e - 1`` is
the last ``block_size`` queries of the keys ``[:e]``, which is what
:func:`~zigzag.scorers.window.window_mass_sum` (:func:`~zigzag.scorers.window_attention` summed over
its queries) computes. Memory is ``O(heads * block_size * seq)``. :class:`~zigzag.scorers.h2o.H2O`
shares this machinery (:func:`_received_attention`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from zigzag.scorers.base import LayerView, Scorer
from zigzag.scorers.window import group_mean, last_queries, window_mass_sum

ALL_QUERIES = 2**31 - 1
"""``query_window`` of a scorer that reads every query of the context: the pipeline passes the last
``min(query_window, seq)`` queries, so this asks for all of them."""


def _check_window_and_block(window: int | None, block_size: int) -> None:
    """Raise ``ValueError`` unless ``window`` is None or an int ``>= 1`` and ``block_size`` an int ``>= 1``."""
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be None (every query) or an int >= 1 (last queries read); got {window!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1 (queries per block of the computation); got {block_size!r}")


def _received_attention(
    layer: LayerView, window: int | None, block_size: int, who: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention each key receives, summed over the queries read, and how many queries see it.

    The queries read are the last ``w`` tokens of the sequence: ``w = min(window, seq)`` when
    ``window`` is an int, every query ``layer.window_queries`` holds when it is None. Query ``i`` (at
    sequence index ``t = seq - w + i``) attends causally to the valid keys ``j <= t`` with a float32
    softmax; a query on padding sees no valid key and adds nothing.

    Args:
        layer: reads ``keys: (batch, kv_heads, seq, head_dim)``, ``valid: (batch, seq)``, ``scaling``,
            ``padded`` and ``window_queries: (batch, heads, >= w, head_dim)``.
        window: last queries read, or None for all that were passed.
        block_size: queries per block; the largest intermediate is ``(batch, heads, block_size, seq)``.
        who: the scorer's name, for error messages.

    Returns:
        ``(sums, seen)``: ``sums`` ``(batch, heads, seq)`` float32, the attention each key receives
        summed over the valid queries read; ``seen`` ``(batch, seq)`` float32, the number of those
        queries that can see each key (``j <= t``), at least 1 so that it divides safely.
    """
    seq = layer.seq
    if window is None:
        if layer.window_queries is None:
            raise ValueError(f"{who} needs LayerView.window_queries (query_window > 0); got None")
        w = layer.window_queries.shape[2]
        if w > seq:
            raise ValueError(f"{who}: window_queries holds {w} queries for a sequence of {seq} tokens")
    else:
        w = min(window, seq)
    queries = last_queries(layer, w, who)  # (batch, heads, w, head_dim)
    keys = layer.keys
    valid = layer.valid.to(device=keys.device, dtype=torch.bool)
    batch, heads = queries.shape[:2]

    sums = torch.zeros(batch, heads, seq, dtype=torch.float32, device=keys.device)
    start = seq - w  # sequence index of the first query read
    for end in range(seq, start, -block_size):
        first = max(end - block_size, start)
        # The block's queries are the last (end - first) tokens of keys[:end]: bottom-right causal alignment.
        block = queries[:, :, first - start : end - start]
        sums[..., :end] += window_mass_sum(block, keys[:, :, :end], valid[:, :end], layer.scaling, layer.padded)

    # Key j is seen by the valid queries at sequence indices >= max(j, start); left padding holds no
    # such query for a valid key, so the count does not depend on the padding.
    seen = torch.zeros(batch, seq, dtype=torch.float32, device=keys.device)
    if w > 0:
        seen[:, start:] = valid[:, start:].to(torch.float32).flip(-1).cumsum(-1).flip(-1)
        seen[:, :start] = seen[:, start : start + 1]  # every query read sees the keys before the first one
    return sums, seen.clamp(min=1.0)


@dataclass
class ObservedAttention(Scorer):
    """Score each token by the mean attention it receives from the queries that can see it.

    Related to H2O (https://arxiv.org/abs/2306.14048, "H2O: Heavy-Hitter Oracle for Efficient
    Generative Inference of Large Language Models", Zhang et al., 2023); the definition is kvpress's
    ``ObservedAttentionPress``: the attention of every query of the context, after the prefill's
    softmax, summed per key and divided by the number of queries that can see the key (``seq - j``
    for key ``j`` when every query is read), then averaged over the query heads of each KV group. The
    divisor undoes the causal mask's advantage of early tokens, which more queries can attend to.

    Queries are read from ``LayerView.window_queries``, the post-RoPE queries of the last tokens:

    * ``window=None`` (default) asks the pipeline for every query (``query_window`` is
      :data:`ALL_QUERIES`) and uses all it was given. When the pipeline passes fewer than ``seq`` (a
      chunked prefill keeps the queries of the last tokens only), only those count: key ``j`` is then
      averaged over the queries read that see it.
    * ``window=n`` reads the last ``min(n, seq)`` queries only.

    Queries on left padding count for nothing, in the sums and in the divisor, so a padded row scores
    like the same row alone. Scores are attention in ``[0, 1]``, float32; nothing is protected.

    Parameters
    ----------
    window:
        Last queries read; None reads every query passed.
    block_size:
        Queries processed together; memory is ``O(heads * block_size * seq)``. 256 lets CUDA use the
        window-mass kernel (at most 256 queries per call), which writes no logits at all.
    """

    window: int | None = None
    block_size: int = 256

    name: ClassVar[str] = "observed_attention"
    needs_query_stats: ClassVar[bool] = False
    query_stats_skip: ClassVar[int] = 0

    def __post_init__(self) -> None:
        _check_window_and_block(self.window, self.block_size)

    @property
    def query_window(self) -> int:
        """Last queries the pipeline must pass: ``window``, or :data:`ALL_QUERIES` for every one."""
        return ALL_QUERIES if self.window is None else self.window

    def score(self, layer: LayerView) -> torch.Tensor:
        """Return the mean attention each token receives.

        Args:
            layer: the layer; reads ``keys: (batch, kv_heads, seq, head_dim)``, ``valid: (batch, seq)``,
                ``scaling`` and ``window_queries: (batch, heads, w, head_dim)`` (the last ``w`` tokens).

        Returns:
            ``(batch, kv_heads, seq)`` float32; higher means keep.
        """
        sums, seen = _received_attention(layer, self.window, self.block_size, type(self).__name__)
        return group_mean(sums / seen[:, None, :], layer.kv_heads)

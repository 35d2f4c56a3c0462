"""StreamingLLM: keep the attention sinks and the most recent tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from zigzag.scorers.base import LayerView, Scorer


@dataclass
class StreamingLLM(Scorer):
    """Keep the first ``n_sink`` tokens (attention sinks) and the most recent ones.

    Paper: https://arxiv.org/abs/2309.17453 ("Efficient Streaming Language Models with Attention
    Sinks", Xiao et al., 2023).

    The score of a token is its RoPE position (``layer.positions``, 0 at the first real token of a
    left-padded row), so later tokens rank higher. Sinks (valid tokens at positions ``< n_sink``)
    score ``row_max + n_sink - position``, where ``row_max`` is the largest position of the row: every
    sink ranks above every other token, and among sinks position 0 ranks first. All scores are exact
    integers in float32 (positions below 2**24).

    Parameters
    ----------
    n_sink:
        Number of leading tokens always kept. 0 gives pure recency (a sliding window).
    """

    n_sink: int = 4

    name: ClassVar[str] = "streaming_llm"
    query_window: ClassVar[int] = 0
    needs_query_stats: ClassVar[bool] = False
    query_stats_skip: ClassVar[int] = 0

    def __post_init__(self) -> None:
        if self.n_sink < 0:
            raise ValueError(f"n_sink must be >= 0 (number of sink tokens kept); got {self.n_sink}")

    def score(self, layer: LayerView) -> torch.Tensor:
        """Return position-based scores.

        Args:
            layer: the layer; reads ``positions: (batch, seq)``, ``valid: (batch, seq)`` and the
                shape of ``keys``.

        Returns:
            ``(batch, kv_heads, seq)`` float32, the same for every kv head; higher means keep.
        """
        valid = layer.valid.to(device=layer.keys.device, dtype=torch.bool)
        positions = layer.positions.to(device=layer.keys.device, dtype=torch.float32)  # (batch, seq)
        row_max = positions.masked_fill(~valid, 0.0).amax(dim=-1, keepdim=True)  # (batch, 1)
        sink = valid & (positions < self.n_sink)
        scores = torch.where(sink, row_max + self.n_sink - positions, positions)
        return scores[:, None, :].expand(layer.batch, layer.kv_heads, layer.seq).contiguous()

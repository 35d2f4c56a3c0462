"""LagKV: score each chunk of the cache against the min/max statistics of the chunk that follows it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from zigzag.scorers.base import LayerView, Scorer
from zigzag.scorers.window import raise_protected

_RANGE_EPS = 1e-6
"""Floor of a reference channel's ``max - min``: a channel constant over the reference chunk would
divide by zero (the paper leaves it undefined); normalized keys then stay finite."""


@dataclass
class LagKV(Scorer):
    """Score each token by how much its key and value vary across channels, relative to the next chunk.

    Paper: https://arxiv.org/abs/2504.04704 ("LagKV: Lag-Relative Information of the KV Cache Tells
    Which Tokens Are Important", Liang et al., 2025).

    Per row, the valid tokens are counted from the first one (left padding does not move anything):
    the first ``n_sink`` are attention sinks, the rest is cut into chunks of ``lag_size``. Chunk ``p``
    is scored against the *next* chunk ``p + 1`` (its lag reference), per KV head:

    1. ``min``/``max`` over the reference chunk's tokens, per channel, for keys and values;
    2. the chunk's keys and values normalized by them, ``(x - min) / (max - min)``;
    3. the standard deviation of each normalized key (value) over its channels, turned into a
       distribution over the chunk's tokens by a softmax;
    4. ``score = softmax(std(K^)) + softmax(std(V^))`` (the paper's sum of the key and value scores).

    The paper keeps the top tokens of every chunk (the same fraction of each); with ``chunk_ranks``
    (default) the score becomes the token's rank inside its chunk divided by ``lag_size``, in
    ``[0, 1)``, so that one budget over the whole row keeps (within one token) the same share of every
    chunk. The last full chunk has no reference: it and the partial chunk after it (``lag_size`` to
    ``2 * lag_size - 1`` tokens) are kept, like the sinks; a row shorter than ``n_sink + 2 * lag_size``
    is all kept. Kept tokens are lifted above every scored one (sinks first, then by recency, which
    decides among them only when the budget is smaller than they are).

    Memory ``O(seq * head_dim)``.

    Parameters
    ----------
    n_sink:
        Leading valid tokens always kept (the authors' code defaults to 16, ``sink_size``).
    lag_size:
        Chunk length ``L`` (128, the lag size of the authors' prefill-compression example and kvpress).
    chunk_ranks:
        Rank the tokens inside their chunk (as the paper's per-chunk selection and kvpress's default
        ``cross_scoring=False`` do); False keeps the raw sum of softmaxes, comparable across chunks
        only loosely (each chunk's scores sum to 2).
    """

    n_sink: int = 16
    lag_size: int = 128
    chunk_ranks: bool = True

    name: ClassVar[str] = "lagkv"
    query_window: ClassVar[int] = 0
    needs_query_stats: ClassVar[bool] = False
    query_stats_skip: ClassVar[int] = 0

    def __post_init__(self) -> None:
        if isinstance(self.n_sink, bool) or not isinstance(self.n_sink, int) or self.n_sink < 0:
            raise ValueError(f"n_sink must be a non-negative int (sink tokens kept); got {self.n_sink!r}")
        if isinstance(self.lag_size, bool) or not isinstance(self.lag_size, int) or self.lag_size < 2:
            raise ValueError(
                f"lag_size must be an int >= 2 (a chunk's min/max and softmax need 2 tokens); got {self.lag_size!r}"
            )
        if type(self.chunk_ranks) is not bool:
            raise TypeError(f"chunk_ranks must be a bool; got {self.chunk_ranks!r}")

    def score(self, layer: LayerView) -> torch.Tensor:
        """Return LagKV scores.

        Args:
            layer: the layer; reads ``keys``/``values: (batch, kv_heads, seq, head_dim)`` and
                ``valid: (batch, seq)``.

        Returns:
            ``(batch, kv_heads, seq)`` float32; higher means keep.
        """
        keys, values = layer.keys, layer.values
        batch, kv_heads, seq, head_dim = keys.shape
        device = keys.device
        valid = layer.valid.to(device=device, dtype=torch.bool)
        lag = self.lag_size

        # Valid tokens first, in their order: slot t of the compacted row is its t-th valid token.
        order = torch.sort((~valid).to(torch.int8), dim=-1, stable=True).indices  # (batch, seq)
        count = valid.sum(dim=-1)  # (batch,)
        slot = torch.arange(seq, device=device)
        # Full chunks after the sinks, and how many of them have a full reference chunk after them.
        scored_chunks = ((count - self.n_sink).clamp(min=0) // lag - 1).clamp(min=0)  # (batch,)
        width = max(0, (seq - self.n_sink) // lag - 1)  # chunks any row of this length can score

        compact = torch.zeros(batch, kv_heads, seq, dtype=torch.float32, device=device)
        if width > 0:
            span = slice(self.n_sink, self.n_sink + (width + 1) * lag)
            idx = order[:, None, span, None].expand(batch, kv_heads, -1, head_dim)
            key_score = self._chunk_scores(keys.gather(2, idx), width)  # (batch, kv_heads, width, lag)
            chunk_score = key_score + self._chunk_scores(values.gather(2, idx), width)
            if self.chunk_ranks:
                # Ties (equal scores) rank by position, deterministically.
                ranks = chunk_score.argsort(dim=-1, stable=True).argsort(dim=-1, stable=True)
                chunk_score = ranks.to(torch.float32) / lag
            compact[:, :, self.n_sink : self.n_sink + width * lag] = chunk_score.reshape(batch, kv_heads, width * lag)

        scored = (slot >= self.n_sink) & (slot < self.n_sink + scored_chunks[:, None] * lag)  # (batch, seq)
        # Kept slots: sinks above the rest (slot order reversed), then the tail by recency.
        kept_order = torch.where(slot < self.n_sink, count[:, None] + self.n_sink - slot, slot).to(torch.float32)
        compact = torch.where(scored[:, None, :], compact, kept_order[:, None, :])

        # Back to the row's own token order.
        scores = torch.empty_like(compact).scatter_(2, order[:, None, :].expand(batch, kv_heads, seq), compact)
        protected = torch.empty_like(scored).scatter_(1, order, ~scored)
        return raise_protected(scores, protected & valid, valid)

    def _chunk_scores(self, x: torch.Tensor, width: int) -> torch.Tensor:
        """``softmax(std(x^))`` of chunks ``0 .. width - 1`` of ``x`` against their next chunk.

        Args:
            x: ``(batch, kv_heads, (width + 1) * lag_size, head_dim)`` keys or values of the chunks.

        Returns:
            ``(batch, kv_heads, width, lag_size)`` float32, each chunk's scores summing to 1.
        """
        batch, kv_heads, _, head_dim = x.shape
        chunks = x.to(torch.float32).view(batch, kv_heads, width + 1, self.lag_size, head_dim)
        target, reference = chunks[:, :, :-1], chunks[:, :, 1:]
        low = reference.amin(dim=3, keepdim=True)  # (batch, kv_heads, width, 1, head_dim)
        high = reference.amax(dim=3, keepdim=True)
        normalized = (target - low) / (high - low).clamp(min=_RANGE_EPS)
        spread = normalized.std(dim=-1, correction=1 if head_dim > 1 else 0)  # (batch, kv_heads, width, lag_size)
        return torch.softmax(spread, dim=-1)

"""What compression while generating keeps between its events: recent queries and the tail's validity.

A :class:`DecodingState` is shared by a :class:`~zigzag.cache.ZigZagCache` and its layers. The layers'
attention interception (:mod:`zigzag.cache.attention`, :mod:`zigzag.cache.varlen`) hands it the queries
it sees, so scorers that read queries can use the most recent ones without any hook on the model, and
the model's mask of the appended tokens, which says which of them are real (a continuation fed with
padding holds some that are not). The cache calls :meth:`DecodingState.maybe_compress` before each
forward pass builds its mask; the event itself (scoring, budgets, the new layers) is the pipeline's,
given as ``compress`` (:mod:`zigzag.pipeline.decoding`), so that this package imports no pipeline code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class DecodingState:
    """State of compression while generating, for one cache.

    Attributes:
        interval: an event runs once this many tokens were appended since the last one.
        window: recent queries kept per layer (0: none are recorded).
        compress: the event: ``compress(cache)`` replaces every layer of ``cache`` by a compressed one.
        num_layers, heads: the model's layers and query heads.
        queries: per layer, ``(batch, heads, <= window, head_dim)`` the latest queries (after RoPE), or None.
        query_columns: per layer, ``(<= window,)`` long, the cache column of each of those queries.
        tail_valid: ``(batch, n)`` bool, which appended tokens the model's last mask showed as real, or None.
        left_padding: ``(batch,)`` long, padding columns before each row's prompt (RoPE position =
            column - left padding).
        events: one dict per event (see :func:`zigzag.pipeline.decoding.compress_event`).
    """

    interval: int
    window: int
    compress: Callable[[object], None]
    num_layers: int
    heads: int
    queries: list[torch.Tensor | None] = field(default_factory=list)
    query_columns: list[torch.Tensor | None] = field(default_factory=list)
    tail_valid: torch.Tensor | None = None
    left_padding: torch.Tensor | None = None
    events: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.queries = [None] * self.num_layers
        self.query_columns = [None] * self.num_layers

    def maybe_compress(self, cache) -> None:
        """Run the event when ``interval`` tokens were appended to the layers since the last one."""
        if cache.layers[0].appended >= self.interval:
            self.compress(cache)
            self.tail_valid = None

    def record_queries(self, layer_idx: int, query: torch.Tensor, end_column: int) -> None:
        """Keep the last ``window`` queries of a layer: ``query (batch, heads, q, head_dim)`` whose last
        row is the token at cache column ``end_column - 1``."""
        if self.window == 0:
            return
        q = query.detach()
        if q.shape[1] != self.heads:  # one token's GQA groups packed as rows: (batch, kv_heads, groups, d)
            q = q.reshape(q.shape[0], self.heads, -1, q.shape[-1])
        columns = torch.arange(end_column - q.shape[-2], end_column, device=q.device)
        old = self.queries[layer_idx]
        if old is not None and old.shape[0] == q.shape[0] and q.shape[-2] < self.window:
            q = torch.cat([old, q], dim=-2)
            columns = torch.cat([self.query_columns[layer_idx], columns])
        self.queries[layer_idx] = q[..., -self.window :, :]
        self.query_columns[layer_idx] = columns[-self.window :]

    def record_tail(self, tail_mask: torch.Tensor) -> None:
        """Note which appended tokens are real, from the model's mask of them,
        ``(batch or 1, 1, q, n)`` bool (True = attend) or additive float: the last query row sees them all."""
        last = tail_mask[:, 0, -1, :]
        self.tail_valid = last if last.dtype == torch.bool else last > torch.finfo(last.dtype).min / 2

    def tail_validity(self, batch: int, appended: int, device: torch.device) -> torch.Tensor:
        """``(batch, appended)`` bool: real appended tokens (those no mask showed are taken as real)."""
        valid = torch.ones(batch, appended, dtype=torch.bool, device=device)
        if self.tail_valid is not None:
            seen = self.tail_valid[:, :appended].to(device)
            valid[:, : seen.shape[-1]] = seen.expand(batch, -1)
        return valid

    def select_rows(self, rows: torch.Tensor) -> None:
        """Follow the cache's batch rows (beam search reorders, repeats and drops them)."""
        for i, q in enumerate(self.queries):
            if q is not None:
                self.queries[i] = q.index_select(0, rows.to(q.device))
        if self.left_padding is not None:
            self.left_padding = self.left_padding.index_select(0, rows.to(self.left_padding.device))
        if self.tail_valid is not None and self.tail_valid.shape[0] > 1:
            self.tail_valid = self.tail_valid.index_select(0, rows.to(self.tail_valid.device))


def note_queries(layer, query: torch.Tensor) -> None:
    """Give the layer's decoding state (if any) the queries of this attention call (after RoPE)."""
    slot = getattr(layer, "decoding", None)
    if slot is not None:
        state, index = slot
        state.record_queries(index, query, layer.get_seq_length())


def note_tail(layer, tail_mask: torch.Tensor) -> None:
    """Give the decoding state (if any) the model's mask of the appended tokens, once per forward pass."""
    slot = getattr(layer, "decoding", None)
    if slot is not None and slot[1] == 0:
        slot[0].record_tail(tail_mask)


__all__ = ["DecodingState", "note_queries", "note_tail"]

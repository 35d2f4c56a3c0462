"""The compressed cache itself: a `DynamicCache` of compressed layers, with the budgets that made it."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache

from zigzag.cache.decoding import DecodingState
from zigzag.cache.layer import CompressedLayerBase


class ZigZagCache(DynamicCache):
    """The compressed cache :func:`zigzag.compress_cache` returns; pass it to ``model.generate``.

    Each layer is a :class:`~zigzag.cache.CompressedLayer` or a :class:`~zigzag.cache.VarlenLayer`, whose
    storage is, for layer ``l`` keeping ``n[b, h]`` tokens in row ``b`` and KV head ``h``:

    * dense (every head of a row keeps as many): keys and values ``(batch, kv_heads, max n, head_dim)``,
      the index ``kept_positions (batch, kv_heads, max n)`` long, empty slots (-1) first;
    * varlen (head-wise budgets): ``prefix_keys`` / ``prefix_values`` ``(sum n, head_dim)``, ``positions
      (sum n,)`` int32, ``offsets (batch * kv_heads + 1,)`` long;

    then the tokens appended since compression, ``(batch, kv_heads, appended, head_dim)``. The cache's
    length is the uncompressed one plus what was appended, so positions continue from the context.

    Attributes:
        budgets: ``(batch, num_layers)`` long, tokens kept per KV head in each layer and row.
        lmba: ``(batch, num_layers)`` float, ZigZag's layer uncertainty (LMBA) when it was measured, else None.
        original_length: columns of the compressed ``input_ids`` (padding included); after an event of
            compression while generating, the columns the layers' prefixes stand for.
        decoding: the state of compression while generating (:class:`zigzag.Decoding`), or None.
        events: one dict per compression while generating (empty without it): ``step`` (tokens appended
            since the prompt), ``held_before`` / ``held_after`` (per row, tokens per KV head on average
            over layers), ``budgets`` (the event's budgets, as ``budgets`` above).

    Example:
        >>> cache = compress_cache(model, ctx, ratio=0.75, scorer="snapkv", budget="zigzag")  # doctest: +SKIP
        >>> [p.shape for p in cache.kept_positions][:2]  # doctest: +SKIP
        [torch.Size([1, 3, 611]), torch.Size([1, 3, 140])]
        >>> cache.nbytes() / full_cache_bytes  # doctest: +SKIP
        0.26
        >>> out = model.generate(input_ids=torch.cat([ctx.input_ids, question], -1), past_key_values=cache,
        ...                      max_new_tokens=32)  # doctest: +SKIP

    Feed it only tokens that follow the context (``generate`` slices them off a full prompt itself);
    ``generate``'s prompt-lookup and assisted decoding re-feed the whole prompt and are refused.
    """

    def __init__(
        self,
        layers: list[CompressedLayerBase],
        *,
        budgets: torch.Tensor,
        lmba: torch.Tensor | None = None,
    ) -> None:
        Cache.__init__(self, layers=layers)
        self.budgets = budgets
        self.lmba = lmba
        self.decoding: DecodingState | None = None

    def attach_decoding(self, state: DecodingState) -> None:
        """Compress while generating: ``state`` runs its events before the masks of a forward pass are built."""
        self.decoding = state
        for i, layer in enumerate(self.layers):
            layer.decoding = (state, i)

    @property
    def events(self) -> list[dict]:
        return [] if self.decoding is None else self.decoding.events

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        # transformers asks for the mask sizes once per forward pass, before any layer runs: the one
        # moment an event can change the layers without invalidating a mask already built.
        if self.decoding is not None and layer_idx == 0:
            self.decoding.maybe_compress(self)
        return super().get_mask_sizes(query_length, layer_idx)

    def _rows_changed(self, rows: torch.Tensor) -> None:
        if self.decoding is not None:
            self.decoding.select_rows(rows)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._rows_changed(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        batch = self.layers[0].batch
        super().batch_repeat_interleave(repeats)
        self._rows_changed(torch.arange(batch).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        batch = self.layers[0].batch
        super().batch_select_indices(indices)
        self._rows_changed(torch.arange(batch)[indices.cpu()])

    @property
    def original_length(self) -> int:
        return self.layers[0].original_length

    @property
    def kept_positions(self) -> list[torch.Tensor]:
        """Per layer ``(batch, kv_heads, kept)`` long: ``input_ids`` columns kept, ascending; -1 = empty slot.

        ``kept`` is the widest head's budget. A varlen layer (:class:`~zigzag.cache.varlen.VarlenLayer`, head-wise
        budgets) stores no such padded index: it rebuilds this one from its flat index on each access."""
        return [layer.kept_positions for layer in self.layers]

    def nbytes(self) -> int:
        """Bytes held by the cache on its device(s), index included."""
        return sum(layer.nbytes() for layer in self.layers)


__all__ = ["ZigZagCache"]

"""What every compressed layer shares: its logical length, its mask sizes, crop and batch selection.

A compressed layer holds a prefix that stands for ``original_length`` columns of ``input_ids`` (however
few slots it keeps), followed by the tokens appended since. :class:`CompressedLayerBase` turns that
into transformers' layer API once; the two storage layouts subclass it:

* :class:`zigzag.cache.dense.CompressedLayer`: ``(batch, kv_heads, widest, head_dim)`` with masked
  empty slots, appended tokens concatenated after the prefix;
* :class:`zigzag.cache.varlen.VarlenLayer`: the kept slots stored flat, appended tokens in a dense tail.

Each supplies how many tokens were appended, how to drop the last ``n`` of them, how to keep or repeat
batch rows, and its memory; the rest is here.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from transformers.cache_utils import DynamicLayer

from zigzag.cache.attention import MASK_LOOKBACK
from zigzag.cache.refeed import check_positions, positions_from


class CompressedLayerBase(DynamicLayer):
    """A layer whose compressed prefix stands for ``original_length`` tokens, then ``appended`` tokens.

    Positions continue from the uncompressed length: :meth:`get_seq_length` is ``original_length +
    appended``, so ``model.generate`` feeds the next tokens at the right RoPE positions. The mask sizes
    make transformers build the mask of the appended tokens only (:mod:`zigzag.cache.attention`).
    New tokens must follow the context: fed where it already is, they raise (:mod:`zigzag.cache.refeed`).

    Args:
        original_length: the uncompressed length (columns of ``input_ids``, padding included).
        dtype, device: of the stored keys and values.
    """

    batch: int
    """Batch rows held (an attribute or a property of the subclass)."""
    kept_positions: torch.Tensor
    """``(batch, kv_heads, prefix_length)`` long: the ``input_ids`` column of each kept slot, ascending;
    ``-1`` marks an empty slot (empty slots come first)."""

    def __init__(self, original_length: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.dtype, self.device = dtype, device
        self.is_initialized = True
        self.original_length = int(original_length)

    # ------------------------------------------------------------------------------------ per layout

    @property
    @abstractmethod
    def appended(self) -> int:
        """Tokens appended after compression."""

    @property
    @abstractmethod
    def prefix_length(self) -> int:
        """Slots of the widest ``(row, kv head)`` of the compressed prefix."""

    @abstractmethod
    def _drop_appended(self, count: int) -> None:
        """Forget the last ``count`` appended tokens (``0 < count <= appended``)."""

    @abstractmethod
    def _select_rows(self, rows: torch.Tensor) -> None:
        """Keep (or repeat) batch rows ``rows (new_batch,)`` long, in that order."""

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes held on the layer's device: keys, values, index and bias."""

    # ------------------------------------------------------------------------------------ cache API

    def _check_new_positions(self, new: int, kwargs: dict) -> None:
        """Refuse ``new > 1`` tokens fed where the compressed context already is, when transformers passed
        their positions to ``update`` (:mod:`zigzag.cache.refeed`). Callers skip one-token steps."""
        check_positions(positions_from(kwargs), self.appended, new)

    def get_seq_length(self) -> int:
        """The logical length: original tokens plus appended ones (what RoPE positions continue from)."""
        return self.original_length + self.appended

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Ask transformers for the mask of the appended tokens (and MASK_LOOKBACK columns before them)."""
        return MASK_LOOKBACK + self.appended + query_length, self.original_length - MASK_LOOKBACK

    def crop(self, tokens_to_remove: int) -> None:
        """Drop appended tokens, as transformers' ``DynamicLayer.crop`` does.

        ``tokens_to_remove < 0`` removes that many from the end; ``> 0`` (the legacy form, an absolute
        length) keeps the first ``tokens_to_remove`` tokens and is a no-op at or beyond the current
        length; ``0`` does nothing. Only appended tokens can go: the compressed prefix stands for the
        whole context, which no crop can shorten (ValueError)."""
        length = self.get_seq_length()
        count = -tokens_to_remove if tokens_to_remove <= 0 else max(length - tokens_to_remove, 0)
        if count == 0:
            return
        if count > self.appended:
            raise ValueError(
                f"cannot crop {count} tokens: only the {self.appended} tokens appended after "
                "compression can be removed from a compressed layer"
            )
        self._drop_appended(count)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_rows(torch.arange(self.batch, device=self.device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(torch.arange(self.batch, device=self.device)[indices])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(beam_idx)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise NotImplementedError("a compressed layer is built initialized; it cannot be initialized again")

    def reset(self) -> None:
        raise NotImplementedError("a compressed cache cannot be reset; compress the context again instead")

    def offload(self):
        raise NotImplementedError("offloading a compressed layer is not supported")


__all__ = ["CompressedLayerBase"]

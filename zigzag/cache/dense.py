"""The dense compressed layer: every KV head of a layer padded to the layer's widest budget.

A :class:`CompressedLayer` stores ``(batch, kv_heads, kept, head_dim)`` keys and values, ``kept`` the
widest row's budget of that layer: layers hold different lengths, with nothing padded back to the
context. Rows (or heads) that kept fewer tokens leave empty slots, marked ``-1`` in
:attr:`CompressedLayer.kept_positions` and never attended. Tokens generated after compression are
concatenated after the prefix, as in a plain `DynamicCache`.

With head-wise budgets (some row's KV heads keep different counts) :func:`zigzag.pipeline.select.build_layer`
builds a :class:`zigzag.cache.varlen.VarlenLayer` instead, which stores exactly the kept slots, flat.
Lengths, mask sizes, crop and batch selection are shared by both (:mod:`zigzag.cache.layer`);
:mod:`zigzag.cache.attention` supplies the rest of each layer's mask.
"""

from __future__ import annotations

import torch

from zigzag.cache.attention import RaggedKeys
from zigzag.cache.layer import CompressedLayerBase


class CompressedLayer(CompressedLayerBase):
    """One layer's compressed keys and values, followed by the tokens appended since.

    Args:
        keys: ``(batch, kv_heads, kept, head_dim)`` kept keys (post-RoPE); empty slots hold zeros.
        values: ``(batch, kv_heads, kept, head_dim)`` kept values.
        kept_positions: ``(batch, kv_heads, kept)`` long: the column of ``input_ids`` each slot came
            from, ascending along ``kept``; ``-1`` marks an empty slot (they come first).
        original_length: the uncompressed length (columns of ``input_ids``, padding included).
        prefix_bias: ``(batch, kv_heads, kept)`` float added to the attention logits of the kept slots
            (``log(count)`` of merged survivors, :mod:`zigzag.merge`), or None.
    """

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        kept_positions: torch.Tensor,
        original_length: int,
        prefix_bias: torch.Tensor | None = None,
        *,
        row_budgets: torch.Tensor | None = None,
    ) -> None:
        if keys.shape != values.shape or keys.shape[:3] != kept_positions.shape:
            raise ValueError(
                f"keys {tuple(keys.shape)}, values {tuple(values.shape)} and kept_positions "
                f"{tuple(kept_positions.shape)} must agree on (batch, kv_heads, kept)"
            )
        super().__init__(original_length, keys.dtype, keys.device)
        self.keys, self.values = keys, values
        self.kept_positions = kept_positions
        self.prefix_bias = prefix_bias
        self._set_slots(kept_positions, row_budgets)

    def _set_slots(self, kept_positions: torch.Tensor, row_budgets: torch.Tensor | None = None) -> None:
        """Which slots are real, decided once here, never during attention.

        ``row_budgets``: ``(batch,)`` host tensor, the tokens every KV head of each row keeps, when the
        caller knows them (layer-wise budgets, empty slots first): the layout then follows without
        reading ``kept_positions`` back from the accelerator, which would stall the prefill."""
        slot_valid = kept_positions >= 0  # (batch, kv_heads, kept)
        width = kept_positions.shape[-1]
        if row_budgets is not None:
            self.prefix_full = int(row_budgets.min()) >= width if row_budgets.numel() else True  # a host tensor: no sync
            self.slot_valid = slot_valid[:, :1]  # every head of a row keeps as many: one layout serves all
            return
        self.prefix_full = bool(slot_valid.all())
        if slot_valid.shape[1] > 1 and bool((slot_valid == slot_valid[:, :1]).all()):
            slot_valid = slot_valid[:, :1]  # all heads share a layout: one row of the mask serves all
        self.slot_valid = slot_valid

    @property
    def prefix_length(self) -> int:
        """Slots of the compressed prefix (the widest row's budget)."""
        return self.kept_positions.shape[-1]

    @property
    def appended(self) -> int:
        """Tokens appended after compression."""
        return self.keys.shape[-2] - self.prefix_length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``(batch, kv_heads, new, head_dim)`` and return all keys (as RaggedKeys) and values."""
        if key_states.shape[-2] > 1:  # a decoding step is never checked (a device sync)
            self._check_new_positions(key_states.shape[-2], kwargs)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return RaggedKeys.wrap(self.keys, self.slot_valid, self.prefix_full, self.prefix_bias, self), self.values

    @property
    def batch(self) -> int:
        return self.keys.shape[0]

    def _drop_appended(self, count: int) -> None:
        self.keys = self.keys[..., : self.keys.shape[-2] - count, :]
        self.values = self.values[..., : self.values.shape[-2] - count, :]

    def _select_rows(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.keys.device).long()
        select = lambda t: t.index_select(0, rows.to(t.device))
        self.keys = select(self.keys)
        self.values = select(self.values)
        self.kept_positions = select(self.kept_positions)
        if self.prefix_bias is not None:
            self.prefix_bias = select(self.prefix_bias)
        self._set_slots(self.kept_positions)

    def nbytes(self) -> int:
        """Bytes held by keys, values and the slot index."""
        bias = 0 if self.prefix_bias is None else self.prefix_bias.nbytes
        return self.keys.nbytes + self.values.nbytes + self.kept_positions.nbytes + self.slot_valid.nbytes + bias


__all__ = ["CompressedLayer"]

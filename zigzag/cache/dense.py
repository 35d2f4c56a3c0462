"""A `DynamicCache` whose layers hold different numbers of tokens, with nothing padded back.

Each layer stores exactly the tokens it kept: ``(batch, kv_heads, kept_l, head_dim)`` with ``kept_l``
the widest row's budget of layer ``l``; rows (or heads) that kept fewer tokens leave empty slots,
marked ``-1`` in :attr:`CompressedLayer.kept_positions` and never attended. Tokens generated after
compression are appended as in a plain `DynamicCache`.

With head-wise budgets (some row's KV heads keep different counts) :func:`zigzag.pipeline.select.build_layer`
builds a :class:`zigzag.cache.varlen.VarlenLayer` instead, which stores exactly the kept slots, flat.

Positions continue from the original, uncompressed length: the cache reports that length (plus what
was appended) as its sequence length, so `model.generate` feeds the next tokens at the right RoPE
positions, and it reports mask sizes that make transformers build the mask of the appended tokens
only. :mod:`zigzag.cache.attention` supplies the rest of each layer's mask.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from zigzag.cache.attention import MASK_LOOKBACK, RaggedKeys


class CompressedLayer(DynamicLayer):
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
        super().__init__()
        if keys.shape != values.shape or keys.shape[:3] != kept_positions.shape:
            raise ValueError(
                f"keys {tuple(keys.shape)}, values {tuple(values.shape)} and kept_positions "
                f"{tuple(kept_positions.shape)} must agree on (batch, kv_heads, kept)"
            )
        self.dtype, self.device = keys.dtype, keys.device
        self.keys, self.values = keys, values
        self.is_initialized = True
        self.kept_positions = kept_positions
        self.original_length = int(original_length)
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
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return RaggedKeys.wrap(self.keys, self.slot_valid, self.prefix_full, self.prefix_bias), self.values

    def get_seq_length(self) -> int:
        """The logical length: original tokens plus appended ones (what RoPE positions continue from)."""
        return self.original_length + self.appended

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Ask transformers for the mask of the appended tokens (and MASK_LOOKBACK columns before them)."""
        return MASK_LOOKBACK + self.appended + query_length, self.original_length - MASK_LOOKBACK

    def crop(self, tokens_to_remove: int) -> None:
        """Drop appended tokens (``tokens_to_remove < 0`` removes that many from the end)."""
        if tokens_to_remove > 0:
            tokens_to_remove = tokens_to_remove - self.get_seq_length()
        if tokens_to_remove == 0:
            return
        if -tokens_to_remove > self.appended:
            raise ValueError(
                f"cannot crop {-tokens_to_remove} tokens: only the {self.appended} tokens appended after "
                "compression can be removed from a compressed layer"
            )
        self.keys = self.keys[..., :tokens_to_remove, :]
        self.values = self.values[..., :tokens_to_remove, :]

    def _select_batch(self, select) -> None:
        self.keys = select(self.keys)
        self.values = select(self.values)
        self.kept_positions = select(self.kept_positions)
        if self.prefix_bias is not None:
            self.prefix_bias = select(self.prefix_bias)
        self._set_slots(self.kept_positions)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_batch(lambda t: t[indices, ...])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def reset(self) -> None:
        raise NotImplementedError("a compressed cache cannot be reset; compress the context again instead")

    def nbytes(self) -> int:
        """Bytes held by keys, values and the slot index."""
        bias = 0 if self.prefix_bias is None else self.prefix_bias.nbytes
        return self.keys.nbytes + self.values.nbytes + self.kept_positions.nbytes + self.slot_valid.nbytes + bias


class ZigZagCache(DynamicCache):
    """The compressed cache :func:`zigzag.compress_cache` returns; pass it to ``model.generate``.

    Attributes:
        budgets: ``(batch, num_layers)`` long, tokens kept per KV head in each layer and row.
        lmba: ``(batch, num_layers)`` float, ZigZag's layer uncertainty (LMBA) when it was measured, else None.
        original_length: columns of the compressed ``input_ids`` (padding included).

    Example:
        >>> cache = compress_cache(model, ctx, ratio=0.75, scorer="snapkv", budget="zigzag")  # doctest: +SKIP
        >>> [p.shape for p in cache.kept_positions][:2]  # doctest: +SKIP
        [torch.Size([1, 3, 611]), torch.Size([1, 3, 140])]
    """

    def __init__(
        self,
        layers: list[CompressedLayer],
        *,
        budgets: torch.Tensor,
        lmba: torch.Tensor | None = None,
    ) -> None:
        Cache.__init__(self, layers=layers)
        self.budgets = budgets
        self.lmba = lmba

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


def random_cache(
    batch: int,
    kv_heads: int,
    head_dim: int,
    budgets: torch.Tensor,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cuda",
    layout: str = "auto",
    original_length: int | None = None,
    seed: int = 0,
) -> ZigZagCache:
    """A compressed cache of random keys and values with given per-head budgets, for benchmarks.

    Args:
        batch, kv_heads, head_dim: the cache's shape (Llama-3.1-8B: ``kv_heads=8, head_dim=128``).
        budgets: ``(batch, num_layers, kv_heads)`` long, tokens kept by each row, layer and KV head.
        dtype, device: of the keys and values.
        layout: ``"varlen"`` (every layer a :class:`~zigzag.cache.varlen.VarlenLayer`: memory = the sum of the
            budgets), ``"dense"`` (every layer a :class:`CompressedLayer` ``(batch, kv_heads, widest,
            head_dim)``, shorter heads padded with masked empty slots), or ``"auto"`` (what
            :func:`zigzag.pipeline.select.build_layer` would choose: varlen for a layer whose heads differ in some row).
        original_length: the uncompressed context length (positions continue from it); default: the
            largest budget. Slot ``j`` of a head that keeps ``n`` tokens holds position
            ``original_length - n + j`` (its last ``n`` tokens).
        seed: random seed of the keys and values.

    Returns:
        A :class:`ZigZagCache` with ``num_layers`` layers; ``cache.budgets`` is ``(batch, num_layers)``,
        the mean budget per head (floored). Continue with ``model(input_ids=..., attention_mask=ones(batch,
        original_length + new), position_ids=..., past_key_values=cache)`` or ``model.generate``.
    """
    from zigzag.cache.varlen import VarlenLayer  # here: zigzag.cache.varlen imports this module

    if layout not in ("auto", "varlen", "dense"):
        raise ValueError(f"layout must be 'auto', 'varlen' or 'dense'; got {layout!r}")
    budgets = torch.as_tensor(budgets, dtype=torch.long).cpu()
    if budgets.dim() != 3 or budgets.shape[0] != batch or budgets.shape[2] != kv_heads:
        raise ValueError(f"budgets must be (batch={batch}, num_layers, kv_heads={kv_heads}); got {tuple(budgets.shape)}")
    if bool((budgets < 0).any()):
        raise ValueError("budgets must be non-negative")
    length = int(budgets.max()) if original_length is None else int(original_length)
    if length < int(budgets.max()):
        raise ValueError(f"original_length {length} is below the largest budget {int(budgets.max())}")
    gen = torch.Generator(device=device).manual_seed(seed)
    layers = []
    for layer in range(budgets.shape[1]):
        lengths = budgets[:, layer].to(device)  # (batch, kv_heads)
        counts = budgets[:, layer]
        varlen = layout == "varlen" or (layout == "auto" and kv_heads > 1 and bool((counts != counts[:, :1]).any()))
        if varlen:
            total = int(counts.sum())
            keys = torch.randn(total, head_dim, generator=gen, device=device, dtype=dtype)
            values = torch.randn(total, head_dim, generator=gen, device=device, dtype=dtype)
            flat = lengths.flatten()
            seg = torch.repeat_interleave(torch.arange(flat.numel(), device=device), flat, output_size=total)
            start = torch.cumsum(flat, 0) - flat
            positions = length - flat[seg] + torch.arange(total, device=device) - start[seg]
            layers.append(VarlenLayer(keys, values, positions, lengths, length))
        else:
            width = int(counts.max())
            column = torch.arange(width, device=device)
            used = column >= (width - lengths)[..., None]  # (batch, kv_heads, width): empty slots first
            kept = torch.where(used, length - width + column, -1)
            keys = torch.randn(batch, kv_heads, width, head_dim, generator=gen, device=device, dtype=dtype)
            values = torch.randn(batch, kv_heads, width, head_dim, generator=gen, device=device, dtype=dtype)
            zero = used[..., None].to(dtype)
            layers.append(CompressedLayer(keys * zero, values * zero, kept, original_length=length))
    return ZigZagCache(layers, budgets=budgets.sum(-1) // kv_heads)

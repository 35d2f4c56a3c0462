"""A compressed cache of fixed shapes: every layer preallocated to its budget plus room for new tokens.

A :class:`~zigzag.ZigZagCache` grows as tokens are appended (a dense layer concatenates, a varlen layer
doubles its tail), so a decoding step over it has new shapes at every step and cannot be captured as
a CUDA graph. :class:`StaticZigZagCache` holds the same tokens in buffers whose shapes never change:

    keys, values: (batch, kv_heads, slots, head_dim),  slots = widest head's budget + headroom
    bias:         (batch, kv_heads, slots) float32: 0 (or log(count) for a merged survivor) where a
                  slot holds a token, -inf where it is empty or not yet written
    write_at:     (1,) long on the device, the next slot to write (the same for every row and head)

Layer ``l`` keeps its own width: with ZigZag budgets the layers still hold different numbers of
tokens, and only the headroom for the tokens to come is added. Head-wise budgets are padded to the
layer's widest head (the empty slots of the others are masked by ``bias``): a static layout costs
that memory, where :class:`~zigzag.cache.VarlenLayer` holds exactly the sum of the budgets.

Appending writes the new tokens at ``write_at`` in place and advances it on the device, so a
decoding step reads no host state: :class:`~zigzag.static.StaticDecoder` runs such steps as one CUDA
graph. The order of slots does not matter to attention (each slot's key carries its RoPE position),
so a kept prefix with its empty slots first (a dense layer) or last (a varlen layer, left-aligned
here) are both fine.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from zigzag.cache import CompressedLayer, VarlenLayer, ZigZagCache
from zigzag.cache.varlen import get_backend


class StaticLayer(CacheLayerMixin):
    """One layer's compressed prefix and headroom in fixed buffers (see the module docstring).

    Args:
        keys, values: ``(batch, kv_heads, slots, head_dim)`` buffers, the prefix in the first
            ``prefix_slots`` slots.
        bias: ``(batch, kv_heads, slots)`` float32, ``-inf`` on every slot that holds no token.
        prefix_slots: slots taken by the compressed prefix (the widest head's budget); new tokens go
            after them.
        original_length: columns of the compressed context (what positions continue from).
    """

    is_compileable = True
    is_sliding = False

    def __init__(
        self, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, prefix_slots: int, original_length: int
    ) -> None:
        super().__init__()
        if keys.shape != values.shape or keys.shape[:3] != bias.shape or bias.dtype != torch.float32:
            raise ValueError(
                f"keys {tuple(keys.shape)}, values {tuple(values.shape)} and float32 bias {tuple(bias.shape)} "
                "must agree on (batch, kv_heads, slots)"
            )
        self.keys, self.values, self.bias = keys, values, bias
        self.prefix_slots = int(prefix_slots)
        self.original_length = int(original_length)
        self.write_at = torch.full((1,), self.prefix_slots, dtype=torch.long, device=keys.device)
        self.is_initialized = True
        self.dtype, self.device = keys.dtype, keys.device
        self._kernel_prefix = None  # the varlen kernel's view of these buffers, built on first use
        self._padding: torch.Tensor | None = None  # (batch, 1, new) bias of the next tokens (expect_padding)
        self.use_kernel = False  # decoding steps through the varlen Triton kernel (choose_backend)

    @property
    def slots(self) -> int:
        return self.keys.shape[2]

    @property
    def headroom(self) -> int:
        """Slots after the prefix, for tokens appended after compression."""
        return self.slots - self.prefix_slots

    def mark_static(self) -> None:
        """Tell torch.compile that these buffers keep their addresses (they are written in place)."""
        for t in (self.keys, self.values, self.bias, self.write_at):
            torch._dynamo.mark_static_address(t)

    # ------------------------------------------------------------------------------------ writing

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write ``(batch, kv_heads, new, head_dim)`` at ``write_at`` and advance it; return the buffers.

        Nothing is checked on the host (a decoding step must not sync): the caller keeps the count of
        appended tokens within :attr:`headroom` (:class:`~zigzag.static.StaticDecoder` does). The new
        slots become visible (bias 0), except padding announced by :meth:`expect_padding`."""
        new = key_states.shape[2]
        at = self.write_at if new == 1 else self.write_at + torch.arange(new, device=self.device)
        self.keys.index_copy_(2, at, key_states)
        self.values.index_copy_(2, at, value_states)
        padding, self._padding = self._padding, None
        if padding is None:
            self.bias.index_fill_(2, at, 0.0)
        else:
            if padding.shape[-1] != new:
                raise ValueError(f"padding was announced for {padding.shape[-1]} tokens; {new} came")
            self.bias.index_copy_(2, at, padding.expand(-1, self.keys.shape[1], -1))
        self.write_at.add_(new)
        return self.keys, self.values

    def expect_padding(self, valid: torch.Tensor) -> None:
        """The next :meth:`update` writes tokens of which ``valid (batch, new)`` bool are real: the others
        stay hidden (bias ``-inf``), before any attention reads them."""
        zero = torch.zeros(valid.shape, dtype=torch.float32, device=self.device)
        self._padding = zero.masked_fill(~valid.to(self.device), float("-inf"))[:, None, :]

    def rewind(self, count: int) -> None:
        """Forget the last ``count`` written tokens (their slots are hidden and written again next)."""
        self.write_at.sub_(count)
        at = self.write_at + torch.arange(count, device=self.device)
        self.bias.index_fill_(2, at, float("-inf"))

    # ------------------------------------------------------------------------------------ attention

    def causal_bias(self, new: int) -> torch.Tensor:
        """``(batch, kv_heads, new, slots)`` float32: the bias each of the ``new`` tokens just written
        sees (the tokens after it hidden), for a forward pass of several tokens."""
        slot = torch.arange(self.slots, device=self.device)
        last_visible = self.write_at - new + torch.arange(new, device=self.device)  # (new,)
        future = slot[None, :] > last_visible[:, None]
        return self.bias[:, :, None, :].masked_fill(future, float("-inf"))

    def kernel_prefix(self):
        """The buffers as one flat varlen layout for :mod:`zigzag.kernels.varlen_triton`: segment
        ``row * kv_heads + head`` is that head's ``slots`` slots, built once (the buffers never move)."""
        if self._kernel_prefix is None:
            from zigzag.kernels import varlen_triton

            batch, kv_heads, slots, head_dim = self.keys.shape
            offsets = torch.arange(batch * kv_heads + 1, device=self.device) * slots
            self._kernel_prefix = varlen_triton.build_prefix(
                self.keys.view(-1, head_dim), self.values.view(-1, head_dim), offsets, self.bias.view(-1),
                kv_heads=kv_heads, width=slots,
            )  # fmt: skip
        return self._kernel_prefix

    # ------------------------------------------------------------------------------------ cache API

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise NotImplementedError("a static compressed layer is built initialized")

    def get_seq_length(self) -> int:
        raise NotImplementedError(
            "a static compressed layer keeps its length on the device; pass position_ids (StaticDecoder does)"
        )

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.slots, 0

    def get_max_length(self) -> int:
        return self.slots

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes + self.bias.nbytes + self.write_at.nbytes


class StaticZigZagCache(Cache):
    """A :class:`~zigzag.ZigZagCache` in fixed buffers, for decoding steps captured as CUDA graphs.

    Build it with :meth:`from_cache`; decode with :class:`~zigzag.static.StaticDecoder`. Under the
    model's own attention code it is not usable (its layers are padded): the decoder routes attention
    to :func:`zigzag.static.attention.static_attention`, which reads each layer's ``bias``.

    Attributes:
        budgets, lmba: those of the compressed cache it came from.
    """

    def __init__(self, layers: list[StaticLayer], *, budgets: torch.Tensor, lmba: torch.Tensor | None = None) -> None:
        super().__init__(layers=layers)
        self.budgets, self.lmba = budgets, lmba

    @classmethod
    @torch.no_grad()
    def from_cache(cls, cache: ZigZagCache, headroom: int, *, consume: bool = False) -> StaticZigZagCache:
        """Copy ``cache`` into fixed buffers with room for ``headroom`` more tokens per layer.

        Args:
            cache: a compressed cache right after :func:`zigzag.compress_cache` (nothing appended yet:
                feed the question through the decoder, which knows which of its tokens are padding).
            headroom: tokens that will be appended (question plus generated tokens).
            consume: release each layer of ``cache`` as soon as it is copied, so that the peak is the
                static cache plus one layer (``cache`` is unusable afterwards).
        """
        if isinstance(headroom, bool) or not isinstance(headroom, int) or headroom < 1:
            raise ValueError(f"headroom must be a positive int; got {headroom!r}")
        if not isinstance(cache, ZigZagCache):
            raise TypeError(f"expected a zigzag.ZigZagCache; got {type(cache).__name__}")
        if cache.decoding is not None:
            raise ValueError("a cache that compresses while generating changes its layers as it goes; it cannot be static")
        layers = []
        for i, layer in enumerate(cache.layers):
            if layer.appended:
                raise ValueError(
                    f"layer {i} holds {layer.appended} tokens appended after compression; convert the cache right "
                    "after compress_cache and feed those tokens through the StaticDecoder instead"
                )
            layers.append(static_layer(layer, headroom))
            if consume:
                cache.layers[i] = None
        return cls(layers, budgets=cache.budgets, lmba=cache.lmba)

    @property
    def original_length(self) -> int:
        return self.layers[0].original_length

    @property
    def headroom(self) -> int:
        return min(layer.headroom for layer in self.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length()

    def choose_backend(self) -> None:
        """Read the ``"varlen"`` kernel switch once, for the passes to come (a step must not read it:
        it is host work, and torch.compile cannot trace it)."""
        use = get_backend(self.layers[0].device) == "triton"
        for layer in self.layers:
            layer.use_kernel = use

    def mark_static(self) -> None:
        for layer in self.layers:
            layer.mark_static()

    def expect_padding(self, valid: torch.Tensor) -> None:
        for layer in self.layers:
            layer.expect_padding(valid)

    def rewind(self, count: int) -> None:
        for layer in self.layers:
            layer.rewind(count)

    def nbytes(self) -> int:
        """Bytes held on the device: buffers (headroom included) and bias."""
        return sum(layer.nbytes() for layer in self.layers)


def static_layer(layer: CompressedLayer | VarlenLayer, headroom: int) -> StaticLayer:
    """One compressed layer copied into fixed buffers of ``prefix + headroom`` slots per head."""
    if isinstance(layer, VarlenLayer):
        keys, values, bias = _from_varlen(layer, headroom)
    elif isinstance(layer, CompressedLayer):
        keys, values, bias = _from_dense(layer, headroom)
    else:
        raise TypeError(f"cannot make a {type(layer).__name__} static")
    return StaticLayer(keys, values, bias, layer.prefix_length, layer.original_length)


def _from_dense(layer: CompressedLayer, headroom: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, kv_heads, prefix, head_dim = layer.keys.shape
    keys = layer.keys.new_zeros(batch, kv_heads, prefix + headroom, head_dim)
    values = torch.zeros_like(keys)
    keys[:, :, :prefix] = layer.keys
    values[:, :, :prefix] = layer.values
    bias = torch.full((batch, kv_heads, prefix + headroom), float("-inf"), device=keys.device)
    kept = 0.0 if layer.prefix_bias is None else layer.prefix_bias.float()
    bias[:, :, :prefix] = torch.where(layer.kept_positions >= 0, kept, float("-inf"))
    return keys, values, bias


def _from_varlen(layer: VarlenLayer, headroom: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, kv_heads, head_dim, width = layer.batch, layer.kv_heads, layer.head_dim, layer.width
    slots = width + headroom
    total = layer.prefix_keys.shape[0]
    lengths = layer.head_lengths.flatten()
    segment = torch.repeat_interleave(torch.arange(batch * kv_heads, device=layer.device), lengths, output_size=total)
    rank = torch.arange(total, device=layer.device) - layer.offsets[segment]
    slot = segment * slots + rank  # left-aligned: each head's kept tokens first, in order
    keys = layer.prefix_keys.new_zeros(batch * kv_heads * slots, head_dim)
    values = torch.zeros_like(keys)
    keys[slot] = layer.prefix_keys
    values[slot] = layer.prefix_values
    bias = torch.full((batch * kv_heads * slots,), float("-inf"), device=keys.device)
    bias[slot] = 0.0 if layer.prefix_bias is None else layer.prefix_bias
    shape = (batch, kv_heads, slots)
    return keys.view(*shape, head_dim), values.view(*shape, head_dim), bias.view(shape)


__all__ = ["StaticLayer", "StaticZigZagCache", "static_layer"]

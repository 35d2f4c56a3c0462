"""Attention over a :class:`~zigzag.static.StaticZigZagCache`, as a transformers attention implementation.

transformers builds one mask per forward pass, sized for one layer; the layers of a static compressed
cache have different widths and mask their empty slots per head, so no model mask can serve them.
:func:`static_attention` is registered under :data:`ATTENTION_NAME` with transformers'
``AttentionInterface`` (its documented extension point) the first time a decoder needs it. For an
implementation it has no mask function for, transformers builds no mask at all; each layer's own
``bias`` masks instead. The decoder selects the implementation for its own forward passes only and
puts the model's back afterwards (:func:`attention_implementation`).

Two computations, the same result:

* a decoding step (one new token) on CUDA: the varlen Triton kernel (:mod:`zigzag.kernels.varlen_triton`)
  over the layer's buffers viewed as equal segments, with ``bias`` as its per-slot logit bias: split-KV,
  one launch, no host sync, capturable in a CUDA graph and traced by torch.compile as one operator;
* otherwise (several tokens, the CPU, or ``set_backend("varlen", "torch")``): SDPA over the grouped
  query heads with ``bias`` (and the causal order of the new tokens) as an additive mask.

Which one runs follows the ``"varlen"`` kernel switch, read by the decoder before each of its passes
(:meth:`~zigzag.static.StaticZigZagCache.choose_backend`), never inside a step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from zigzag.static.cache import StaticLayer, StaticZigZagCache

ATTENTION_NAME = "zigzag_static"
"""The name :func:`static_attention` is registered under in transformers' ``AttentionInterface``."""

CACHE_KWARG = "zigzag_static_cache"
"""The keyword under which the decoder passes its cache down to the attention (transformers forwards
a model's extra keyword arguments to every attention call)."""


def attend_static(layer: StaticLayer, query: torch.Tensor, scale: float) -> torch.Tensor:
    """Exact attention of ``query (batch, Hq, new, d)``, the tokens just written, over ``layer``.

    Returns ``(batch, Hq, new, d)`` in the query's dtype."""
    if query.shape[2] == 1 and layer.use_kernel:
        from zigzag.kernels import varlen_triton

        return varlen_triton.attend(layer.kernel_prefix(), query, scale, query.dtype, None, None, None, False, False)[0]
    return attend_reference(layer, query, scale)


def attend_reference(layer: StaticLayer, query: torch.Tensor, scale: float) -> torch.Tensor:
    """:func:`attend_static` in PyTorch: SDPA with the KV heads as heads and the query heads of each
    GQA group as extra query rows, so keys are never repeated."""
    batch, hq, new, head_dim = query.shape
    kv_heads = layer.keys.shape[1]
    group = hq // kv_heads
    grouped = query.reshape(batch, kv_heads, group * new, head_dim)  # row j * new + i: head j of the group, token i
    if new == 1:
        bias = layer.bias[:, :, None, :]  # broadcast over the group's rows
    else:
        bias = layer.causal_bias(new)[:, :, None].expand(-1, -1, group, -1, -1).reshape(batch, kv_heads, group * new, -1)
    out = F.scaled_dot_product_attention(grouped, layer.keys, layer.values, attn_mask=bias.to(query.dtype), scale=scale)
    return out.reshape(batch, hq, new, head_dim)


def static_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The attention implementation :data:`ATTENTION_NAME`: ``(batch, new, Hq, d)`` as transformers'
    SDPA implementation returns it, no weights. ``key`` / ``value`` are the layer's buffers (the model
    mask is None: the layer's ``bias`` masks)."""
    cache = kwargs.get(CACHE_KWARG)
    if not isinstance(cache, StaticZigZagCache):
        raise RuntimeError(  # noqa: TRY004 (a misuse of the implementation, not a bad argument type)
            f"the {ATTENTION_NAME!r} attention runs only inside zigzag.static.StaticDecoder, which passes its cache"
        )
    if dropout:
        raise ValueError("static decoding runs in eval mode; dropout must be 0")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = attend_static(cache.layers[module.layer_idx], query, scale)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register :func:`static_attention` with transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, static_attention)


@contextlib.contextmanager
def attention_implementation(model: nn.Module, name: str) -> Iterator[None]:
    """``model`` runs attention implementation ``name`` inside the block; its own one comes back after."""
    before = model.config._attn_implementation
    if before == name:
        yield
        return
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


__all__ = ["ATTENTION_NAME", "CACHE_KWARG", "attend_reference", "attend_static", "attention_implementation", "register", "static_attention"]

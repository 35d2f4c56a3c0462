"""An independent reference for compressed attention: the full, uncompressed cache with every evicted
position masked per layer and KV head, computed in float64 by a test-only attention function.

It shares no code with `zigzag.cache.attention` or `zigzag.cache`: it sees a plain `DynamicCache` holding
the whole prefill and a boolean keep-mask per layer, and builds the softmax itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

_NAME = "zigzag_test_masked_reference"
_KEEP: dict[int, torch.Tensor] = {}
_BIAS: dict[int, torch.Tensor] = {}


def _masked_reference_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    keep = _KEEP[module.layer_idx]  # (batch, kv_heads, prefix) over the first `prefix` cache columns
    groups = query.shape[1] // key.shape[1]
    k = key.double().repeat_interleave(groups, dim=1)
    v = value.double().repeat_interleave(groups, dim=1)
    scores = query.double() @ k.transpose(-1, -2) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask.double()
    evicted = ~keep.repeat_interleave(groups, dim=1)[:, :, None, :]  # (batch, heads, 1, prefix)
    prefix = keep.shape[-1]
    if module.layer_idx in _BIAS:  # (batch, kv_heads, prefix) added to the prefix logits
        scores[..., :prefix] += _BIAS[module.layer_idx].double().repeat_interleave(groups, dim=1)[:, :, None, :]
    scores[..., :prefix] = scores[..., :prefix].masked_fill(evicted, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = (probs @ v).to(query.dtype).transpose(1, 2).contiguous()
    return out, probs.to(query.dtype)


def keep_masks(kept_positions: list[torch.Tensor], prefix: int) -> list[torch.Tensor]:
    """Per layer ``(batch, kv_heads, prefix)`` bool from ``kept_positions`` (-1 = empty slot)."""
    masks = []
    for pos in kept_positions:
        keep = torch.zeros(*pos.shape[:2], prefix + 1, dtype=torch.bool, device=pos.device)
        keep.scatter_(-1, torch.where(pos >= 0, pos, prefix), True)
        masks.append(keep[..., :prefix])
    return masks


@contextlib.contextmanager
def masked_reference(model, keep: list[torch.Tensor], bias: list[torch.Tensor] | None = None) -> Iterator[None]:
    """Within the block, ``model`` attends through the float64 masked reference, then is restored.

    ``bias``: optional per layer ``(batch, kv_heads, prefix)`` added to the logits of the first
    ``prefix`` cache columns (the log(count) of merged survivors)."""
    AttentionInterface.register(_NAME, _masked_reference_attention)
    AttentionMaskInterface.register(_NAME, eager_mask)
    original = model.config._attn_implementation
    _KEEP.clear()
    _KEEP.update(enumerate(keep))
    _BIAS.clear()
    _BIAS.update(enumerate(bias or []))
    model.set_attn_implementation(_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(original)
        _KEEP.clear()
        _BIAS.clear()


@contextlib.contextmanager
def attention(model, name: str) -> Iterator[None]:
    """Within the block, ``model`` uses attention implementation ``name`` (e.g. "eager"), then is restored."""
    original = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(original)

"""Exact attention over a compressed layer under the model's own SDPA or eager attention.

transformers builds one attention mask per forward pass, sized for one layer. After compression every
layer holds a different number of cached tokens (and, in a batch, rows hold different numbers of real
ones), so that single mask cannot describe any layer but the one it was sized for. Rather than pad
every layer back to a common length (which would spend the memory we just freed), the compressed
cache hands attention its keys as :class:`RaggedKeys`: a tensor that knows which of its cached slots
are real. When the model's attention function reaches the one operation that combines keys with the
mask, ``RaggedKeys`` builds the layer's own mask there:

    layer mask = [ slots of the compressed prefix that hold a token | the model's mask for the tokens
                   appended after compression ]

The model's mask covers the appended tokens, because the cache reports
``get_mask_sizes() == (MASK_LOOKBACK + appended + query, original_length - MASK_LOOKBACK)``:
transformers then builds the usual causal-and-padding mask for the appended tokens, at their true
positions, plus ``MASK_LOOKBACK`` leading column(s) that are dropped here. That one extra column keeps
the mask's width different from the query length, which stops transformers' SDPA path from replacing
the mask by ``is_causal`` and then cutting the keys down to the query length (an optimisation meant
for an empty static cache that would silently drop the whole compressed prefix).

Nothing here patches transformers or the model. The interception is the standard
``__torch_function__`` protocol, active only on tensors that a compressed cache returned.
It covers the two places where stock attention meets the mask:

* SDPA: ``torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask, ...)``.
* eager: ``torch.matmul(q, k.transpose(2, 3))``, optionally scaled, then ``+ attention_mask``.

If a model's attention reaches the keys some other way, the mask shapes disagree and PyTorch raises,
so an unsupported path fails loudly instead of attending to empty slots. A mask that hides the last
new token in every row means the tokens were fed where the compressed context already is: that
raises too (:func:`zigzag.cache.refeed.check_mask`).

Layers with head-wise budgets store no padded prefix at all (:mod:`zigzag.cache.varlen`); their keys come as
:class:`zigzag.cache.varlen.VarlenKeys`, which intercept the same two places the same way but compute the
prefix's share of attention themselves and combine it with the appended tokens by log-sum-exp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zigzag.cache.decoding import note_queries, note_tail
from zigzag.cache.refeed import check_mask

# Shape-only operations that attention code applies to keys before using them (`repeat_kv`, GQA
# packing, transposes): their results are still the same keys, so they keep the slot information.
KEY_VIEW_OPS = {
    torch.Tensor.__getitem__,
    torch.Tensor.expand,
    torch.Tensor.expand_as,
    torch.Tensor.reshape,
    torch.Tensor.view,
    torch.Tensor.transpose,
    torch.Tensor.contiguous,
    torch.Tensor.to,
    torch.Tensor.unsqueeze,
    torch.Tensor.repeat_interleave,
    torch.repeat_interleave,
    torch.transpose,
    torch.reshape,
    torch.unsqueeze,
}
MATMUL_OPS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__}
SCALE_OPS = {
    torch.Tensor.__mul__,
    torch.Tensor.__rmul__,
    torch.Tensor.__truediv__,
    torch.Tensor.mul,
    torch.Tensor.div,
    torch.mul,
    torch.div,
}
ADD_OPS = {torch.Tensor.__add__, torch.Tensor.__radd__, torch.Tensor.add, torch.add}


MASK_LOOKBACK = 1
"""Leading columns of the model's mask that precede the appended tokens (see the module docstring)."""


def plain(x):
    return x.as_subclass(torch.Tensor) if isinstance(x, torch.Tensor) and type(x) is not torch.Tensor else x


def _ragged_arg(args):
    """The first RaggedKeys / _RaggedScores among (possibly nested) arguments."""
    for a in args:
        if isinstance(a, (RaggedKeys, _RaggedScores)):
            return a
        if isinstance(a, (list, tuple)):
            found = _ragged_arg(a)
            if found is not None:
                return found
    return None


def _heads_like(prefix_valid: torch.Tensor, heads: int) -> torch.Tensor:
    """``(batch, H, prefix)`` -> ``(batch, 1 or heads, 1, prefix)``; GQA groups are consecutive heads."""
    h = prefix_valid.shape[1]
    if h not in (1, heads):
        prefix_valid = prefix_valid.repeat_interleave(heads // h, dim=1)
    return prefix_valid[:, :, None, :]


def _tail_when_no_mask(q_rows: int, n_tail: int, causal: bool, device) -> torch.Tensor:
    """Mask of the appended tokens when the model passed none: all visible, or causal aligned to the end."""
    if not causal or q_rows == 1:
        return torch.ones(1, 1, 1, n_tail, dtype=torch.bool, device=device)
    i = torch.arange(q_rows, device=device)[:, None]
    j = torch.arange(n_tail, device=device)[None, :]
    return (j <= i + (n_tail - q_rows))[None, None]


def appended_mask(mask: torch.Tensor, n_tail: int, layer=None) -> torch.Tensor:
    """The model's mask ``(..., MASK_LOOKBACK + n_tail)`` without its MASK_LOOKBACK leading columns:
    the mask of the ``n_tail`` tokens appended after compression. ``layer``: the one attended, which
    drops this call's tokens again if :func:`~zigzag.cache.refeed.check_mask` refuses them."""
    if mask.shape[-1] != MASK_LOOKBACK + n_tail:
        raise RuntimeError(
            f"the model's attention mask has {mask.shape[-1]} columns, expected {MASK_LOOKBACK + n_tail} for "
            f"{n_tail} tokens appended after compression: was the cache used with an attention mask that "
            "does not cover the original context?"
        )
    check_mask(mask, layer)  # new tokens fed where the compressed context already is
    tail = mask[..., MASK_LOOKBACK:]
    if layer is not None:
        note_tail(layer, tail)
    return tail


def layer_mask(
    prefix_valid: torch.Tensor,
    tail_mask: torch.Tensor | None,
    *,
    heads: int,
    q_rows: int,
    n_tail: int,
    causal: bool,
    dtype: torch.dtype | None = None,
    prefix_bias: torch.Tensor | None = None,
    layer=None,
) -> torch.Tensor:
    """The full mask of one compressed layer.

    Args:
        prefix_valid: ``(batch, 1 or kv_heads, prefix)`` bool, True where a compressed slot holds a token.
        tail_mask: the model's mask, ``(batch, 1, q_rows, MASK_LOOKBACK + n_tail)``, bool (True = attend)
            or additive float; or None when the model relied on ``is_causal``.
        heads: head count of the attention call the mask is for.
        q_rows: query rows of that call.
        n_tail: appended tokens, including this call's queries.
        causal: what ``is_causal`` the model asked for (only read when ``tail_mask`` is None).
        dtype: None for a bool mask; a float dtype for an additive one (0 or the dtype's minimum).
        prefix_bias: ``(batch, 1 or kv_heads, prefix)`` float added to the logits of the compressed
            slots (``log(count)`` of merged survivors), or None. Forces an additive mask.
        layer: the :class:`~zigzag.cache.CompressedLayer` attended, or None; it drops this call's tokens
            again if :func:`~zigzag.cache.refeed.check_mask` refuses them.

    Returns:
        ``(batch, 1 or heads, q_rows or 1, prefix + n_tail)``, bool or ``dtype``.
    """
    prefix = _heads_like(prefix_valid, heads)
    if tail_mask is None:
        tail = _tail_when_no_mask(q_rows, n_tail, causal, prefix.device)
    else:
        tail = appended_mask(tail_mask, n_tail, layer)
    if dtype is None and tail.dtype != torch.bool:
        dtype = tail.dtype
    if dtype is None and prefix_bias is not None:
        dtype = torch.float32
    if dtype is not None:
        minimum = torch.finfo(dtype).min
        base = torch.zeros(prefix.shape, dtype=dtype, device=prefix.device)
        if prefix_bias is not None:
            base = base + _heads_like(prefix_bias, heads).to(dtype)
        prefix = base.masked_fill_(~prefix, minimum)
        if tail.dtype == torch.bool:
            tail = torch.zeros(tail.shape, dtype=dtype, device=tail.device).masked_fill_(~tail, minimum)
        tail = tail.to(dtype)
    batch = max(prefix.shape[0], tail.shape[0])
    h = max(prefix.shape[1], tail.shape[1])
    rows = max(prefix.shape[2], tail.shape[2])
    return torch.cat([prefix.expand(batch, h, rows, -1), tail.expand(batch, h, rows, -1)], dim=-1)


def _ragged_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    prefix_valid, prefix_full, prefix_bias, layer = key._prefix_valid, key._prefix_full, key._prefix_bias, key._layer
    query, key, value = plain(query), plain(key), plain(value)
    if layer is not None:
        note_queries(layer, query)
    if prefix_full and prefix_bias is None and attn_mask is None and query.shape[-2] == 1:
        # Decoding one token with every slot real and no padding: no mask at all, so that SDPA may
        # pick its fastest kernel (it cannot with an explicit mask).
        return F.scaled_dot_product_attention(
            query, key, value, dropout_p=dropout_p, is_causal=False, scale=scale, **kwargs
        )
    n_tail = key.shape[-2] - prefix_valid.shape[-1]
    mask = layer_mask(
        prefix_valid,
        plain(attn_mask),
        heads=query.shape[-3],
        q_rows=query.shape[-2],
        n_tail=n_tail,
        causal=bool(is_causal),
        dtype=query.dtype if prefix_bias is not None else None,
        prefix_bias=prefix_bias,
        layer=layer,
    )
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout_p, is_causal=False, scale=scale, **kwargs
    )


class RaggedKeys(torch.Tensor):
    """Keys of one compressed layer, ``(batch, kv_heads, prefix + appended, head_dim)``.

    ``_prefix_valid``: ``(batch, 1 or kv_heads, prefix)`` bool, True where a compressed slot holds a
    token (False: an empty slot of a row or head that kept fewer tokens than the layer's widest).
    ``_prefix_full``: a plain bool, True when every slot holds a token; known when the layer is built,
    so that attention never has to ask the device (a host sync per layer) to find out.
    ``_prefix_bias``: ``(batch, 1 or kv_heads, prefix)`` float added to the prefix logits, or None.
    ``_layer``: the :class:`~zigzag.cache.CompressedLayer` the keys came from, or None.
    """

    _prefix_valid: torch.Tensor
    _prefix_full: bool
    _prefix_bias: torch.Tensor | None
    _layer: object

    @staticmethod
    def wrap(
        keys: torch.Tensor,
        prefix_valid: torch.Tensor,
        prefix_full: bool,
        prefix_bias: torch.Tensor | None = None,
        layer=None,
    ) -> RaggedKeys:
        out = keys.as_subclass(RaggedKeys)
        out._prefix_valid = prefix_valid
        out._prefix_full = prefix_full
        out._prefix_bias = prefix_bias
        out._layer = layer
        return out

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return _ragged_sdpa(*args, **kwargs)
        source = _ragged_arg(args)
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if func in KEY_VIEW_OPS and isinstance(out, torch.Tensor):
            return RaggedKeys.wrap(out, source._prefix_valid, source._prefix_full, source._prefix_bias, source._layer)
        if func in MATMUL_OPS and isinstance(args[1], RaggedKeys):
            if source._layer is not None:
                note_queries(source._layer, plain(args[0]))
            return _RaggedScores.wrap(out, source._prefix_valid, source._prefix_bias, source._layer)
        return out


class _RaggedScores(torch.Tensor):
    """Eager attention logits ``(batch, heads, q, prefix + appended)`` still waiting for their mask."""

    _prefix_valid: torch.Tensor
    _prefix_bias: torch.Tensor | None
    _layer: object

    @staticmethod
    def wrap(scores: torch.Tensor, prefix_valid: torch.Tensor, prefix_bias: torch.Tensor | None, layer=None) -> _RaggedScores:
        out = scores.as_subclass(_RaggedScores)
        out._prefix_valid = prefix_valid
        out._prefix_bias = prefix_bias
        out._layer = layer
        return out

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        source = _ragged_arg(args)
        prefix_valid, prefix_bias, layer = source._prefix_valid, source._prefix_bias, source._layer
        if func in SCALE_OPS and not any(isinstance(a, torch.Tensor) and a.dim() > 0 for a in args[1:]):
            with torch._C.DisableTorchFunctionSubclass():
                return _RaggedScores.wrap(func(*args, **kwargs), prefix_valid, prefix_bias, layer)
        scores = next(plain(a) for a in args if isinstance(a, _RaggedScores))
        if func in ADD_OPS:
            other = next(plain(a) for a in args if not isinstance(a, _RaggedScores))
            return scores + _full_additive_mask(scores, prefix_valid, other, prefix_bias, layer)
        # Anything else (softmax, say) means the model added no mask: apply the layer's own first.
        masked = scores + _full_additive_mask(scores, prefix_valid, None, prefix_bias)
        args = tuple(masked if isinstance(a, _RaggedScores) else a for a in args)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def _full_additive_mask(scores: torch.Tensor, prefix_valid: torch.Tensor, tail, prefix_bias=None, layer=None) -> torch.Tensor:
    n_tail = scores.shape[-1] - prefix_valid.shape[-1]
    return layer_mask(
        prefix_valid,
        tail,
        heads=scores.shape[-3],
        q_rows=scores.shape[-2],
        n_tail=n_tail,
        causal=True,
        dtype=scores.dtype,
        prefix_bias=prefix_bias,
        layer=layer,
    )

"""Refusing new tokens fed at positions that the compressed context already covers.

A compressed cache stands for ``original_length`` columns of ``input_ids`` however few slots it keeps,
and takes only tokens that follow them. Re-feeding the context instead (a forward over the whole
prompt again, or ``model.generate`` with ``prompt_lookup_num_tokens`` or an assistant model, whose
first step feeds the whole prompt whatever the cache holds) would silently attend over the context
twice, once compressed and once not. transformers hands the cache no host-side trace of it: the
layer's ``get_mask_sizes`` gets the query length alone, and what reaches ``update`` depends on the
version (5.17: nothing; 5.25: the attention's keyword arguments, ``position_ids`` among them). Two
device-side traces remain, and each is checked where the version provides it:

* the positions (:func:`check_positions`): the last new token must sit after the context and the
  tokens appended since; a forward that re-feeds the prompt numbers it from 0, ignoring the cache;
* the mask (:func:`check_mask`): the 2D ``attention_mask`` must have ``original_length + appended +
  new`` columns; re-feeding passes one that is too short, which transformers pads with masked
  columns, so the last new token cannot see itself. (transformers 5.25's ``generate`` drops an
  all-ones mask, which is why the positions are checked as well.)

Reading either is a device sync, so only multi-token forwards are checked, once per tensor (the layers
of a forward pass share the same one): decoding steps, one token each, never are.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from zigzag.cache.layer import CompressedLayerBase

_checked: dict[str, weakref.ref] = {}
"""Per check, the last tensor it accepted."""


def _seen(kind: str, tensor: torch.Tensor) -> bool:
    last = _checked.get(kind)
    return last is not None and last() is tensor


def _refuse(trace: str) -> None:
    raise ValueError(
        f"tokens were fed at positions the compressed context already covers ({trace}). A compressed cache "
        "takes only the tokens that follow the context, with an attention_mask over the context, the tokens "
        "appended since and the new ones (model.generate slices a full prompt itself); it cannot take the "
        "prompt again, so model.generate with prompt_lookup_num_tokens or an assistant model, whose first "
        "step re-feeds the whole prompt, is not supported."
    )


def positions_from(kwargs: dict) -> torch.Tensor | None:
    """The ``position_ids`` among the keyword arguments of a layer's ``update``, if transformers passed them.

    transformers 5.25 passes the attention's own keyword arguments as ``kwargs=...``; 5.17 passes none."""
    found = kwargs.get("position_ids")
    if found is None and isinstance(kwargs.get("kwargs"), dict):
        found = kwargs["kwargs"].get("position_ids")
    return found if isinstance(found, torch.Tensor) else None


def check_positions(position_ids: torch.Tensor | None, appended: int, new: int) -> None:
    """Refuse ``new`` tokens whose positions leave no room for the compressed context.

    Args:
        position_ids: ``(batch or 1, new)`` (or ``(..., batch, new)``) RoPE positions of the new tokens, or None.
        appended: tokens the layer holds after its compressed prefix, before these.
        new: tokens fed now.

    A row whose context holds at least one token puts its last new token at position ``>= appended +
    new`` (padding only lowers positions by the row's own padding). When every row's last new token
    sits below that, the positions count nothing of the context: it is being fed again. Only the last
    token is read, so padding among the new tokens (positions 0) does not count.
    """
    if position_ids is None or new <= 1 or position_ids.shape[-1] != new or _seen("positions", position_ids):
        return
    if bool((position_ids[..., -1] < appended + new).all()):
        _refuse(f"the last of the {new} new tokens is at a position below {appended + new}, in every row")
    _checked["positions"] = weakref.ref(position_ids)


def check_mask(mask: torch.Tensor, layer: CompressedLayerBase | None = None) -> None:
    """Refuse a forward whose mask does not reach its last new token.

    Args:
        mask: the model's mask over the appended tokens, ``(batch or 1, 1 or heads, rows, MASK_LOOKBACK
            + appended)``, bool (True = attend) or additive float; its last column is the last new token.
        layer: the layer whose attention this is. Its ``update`` already appended the ``rows`` new tokens;
            they are dropped again before raising, so that the cache stays as it was.

    The longest row of a batch attends to its own last token, so a mask that hides it in every row was
    padded by transformers: the 2D ``attention_mask`` was shorter than the cache plus the new tokens."""
    if mask.shape[-2] <= 1 or _seen("mask", mask):
        return
    last = mask[..., -1, -1]
    seen = last if last.dtype == torch.bool else last > torch.finfo(last.dtype).min / 2
    if not bool(seen.any()):
        if layer is not None:
            layer._drop_appended(mask.shape[-2])
        _refuse("the attention_mask has fewer columns than the cache's length plus the new tokens")
    _checked["mask"] = weakref.ref(mask)


__all__ = ["check_mask", "check_positions", "positions_from"]

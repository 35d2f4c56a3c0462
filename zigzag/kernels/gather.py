"""Copy the keys and values of chosen tokens, per (row, KV head): the copy every compression ends with.

:func:`gather_split` is what :func:`zigzag.pipeline.select.gather_kept` and the layer-by-layer prefill
(:mod:`zigzag.pipeline.layerwise`) use. On CUDA a Triton kernel (:mod:`zigzag.kernels.gather_triton`)
does keys and values in one launch and writes the rank-major layout directly; elsewhere, or with ``set_backend("gather", "torch")`` (the ``"gather"``
switch of :mod:`zigzag.kernels`, ``ZIGZAG_GATHER_BACKEND``), :func:`gather_split_torch`
(``torch.gather``) does, and is the reference the kernel is tested against (the results are equal
bit for bit: both only copy).
"""

from __future__ import annotations

import torch

from zigzag.kernels.switch import kernel_switch

_SWITCH = kernel_switch("gather")


def gather_split_torch(
    keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor, width: int, extra: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference of :func:`gather_split`: ``torch.gather`` (after concatenating ``extra``), then a
    rank-major copy of the rest."""
    if extra is not None:
        keys, values = (torch.cat([s, e.permute(1, 2, 0, 3)], dim=2) for s, e in zip((keys, values), extra))
    full = index.clamp(min=0)[..., None].expand(-1, -1, -1, keys.shape[-1])
    empty = (index < 0)[..., None]
    out = []
    for states in (keys, values):
        taken = states.gather(2, full).masked_fill_(empty, 0)
        out.append((taken[:, :, :width].contiguous(), taken[:, :, width:].permute(2, 0, 1, 3).contiguous()))
    (k_top, k_rest), (v_top, v_rest) = out
    return k_top, v_top, k_rest, v_rest


def gather_split(
    keys: torch.Tensor,
    values: torch.Tensor,
    index: torch.Tensor,
    width: int | None = None,
    extra: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys and values at ``index``, the first ``width`` per (row, head) in one tensor, the others in another.

    Args:
        keys, values: ``(batch, kv_heads, seq, head_dim)``, same shape and dtype, any strides.
        index: ``(batch, kv_heads, n)`` long token indices into ``seq`` (any order; ``-1`` gives a row of
            zeros, an empty cache slot), any strides.
        width: how many of the ``n`` go to the first output; None: all of them.
        extra: optional second keys and values ``(m, batch, kv_heads, head_dim)`` (rank-major, e.g.
            just fetched from the host): index ``seq + j`` is their row ``j``, as if concatenated
            after ``keys`` and ``values`` (which the kernel does not need to do).

    Returns:
        ``(keys_top, values_top, keys_rest, values_rest)``: ``(batch, kv_heads, width, head_dim)``
        contiguous, then ``(n - width, batch, kv_heads, head_dim)`` contiguous, rank-major (the
        layer-by-layer prefill sends it to the host, where fetching the next best ``m`` of every head is
        then one contiguous block).
    """
    if keys.shape != values.shape or keys.dtype != values.dtype or keys.dim() != 4:
        raise ValueError(f"keys and values must be (batch, kv_heads, seq, head_dim) alike; got {keys.dtype} "
                         f"{tuple(keys.shape)} and {values.dtype} {tuple(values.shape)}")
    if index.dim() != 3 or index.shape[:2] != keys.shape[:2] or index.dtype != torch.long:
        raise ValueError(f"index must be (batch, kv_heads, n) = {tuple(keys.shape[:2])} + (n,) long; got {index.dtype} {tuple(index.shape)}")
    n = index.shape[-1]
    width = n if width is None else width
    if not 0 <= width <= n:
        raise ValueError(f"width must lie in [0, {n}]; got {width}")
    if extra is not None and (extra[0].shape != extra[1].shape or extra[0].shape[1:] != (*keys.shape[:2], keys.shape[-1])):
        raise ValueError(f"extra must be two (m, batch, kv_heads, head_dim) tensors; got {[tuple(e.shape) for e in extra]}")
    index = index if index.device == keys.device else index.to(keys.device)
    if _SWITCH.use_kernel(keys.device, keys.is_floating_point() and keys.shape[-1] <= 512 and keys.shape[0] * keys.shape[1] < 2**16):
        from zigzag.kernels import gather_triton  # imports triton: on first use only

        return gather_triton.gather_split(keys, values, index, width, extra)
    return gather_split_torch(keys, values, index, width, extra)

"""Attention of a window of last queries over the cache, and helpers shared by the scorers.

:func:`window_attention` is public: the scorers use it (SnapKV, TOVA) and the pipeline uses it to
measure ZigZag's LMBA on *real* attention mass, so it never pads, boosts or protects anything.
Memory is ``O(heads * window * seq)``; the full ``(seq x seq)`` attention matrix is never built.
"""

from __future__ import annotations

import torch

from zigzag.kernels.precision import tf32_matmuls_enabled
from zigzag.kernels.switch import kernel_switch
from zigzag.scorers.base import LayerView

_MASS_SWITCH = kernel_switch("mass")
"""The ``"mass"`` kernel switch (``zigzag.kernels.set_backend("mass", ...)``, ``ZIGZAG_MASS_BACKEND``):
:mod:`zigzag.kernels.mass_triton` or :func:`window_attention` summed, the reference."""


def window_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    valid: torch.Tensor,
    scaling: float,
    padded: bool = True,
) -> torch.Tensor:
    """Softmax attention of the last ``window`` queries over every cached key, in float32.

    The ``window`` queries are the *last* ``window`` tokens of the sequence: query ``i`` sits at
    sequence index ``seq - window + i`` and sees the keys ``j <= seq - window + i`` that are valid
    (bottom-right causal alignment). With ``window = 3``, ``seq = 6`` (``1`` = visible)::

        keys      0 1 2 3 4 5
        query 0:  1 1 1 1 0 0   (sequence index 3)
        query 1:  1 1 1 1 1 0   (sequence index 4)
        query 2:  1 1 1 1 1 1   (sequence index 5)

    Padded keys (``valid`` False) get probability 0. A query that sees no valid key at all (a query
    on left padding) gets an all-zero row instead of NaN; every other row sums to 1.

    GQA: query head ``h`` reads kv head ``h // (heads // kv_heads)``; e.g. with 6 query heads and 2 kv
    heads, query heads 0, 1, 2 read kv head 0 and 3, 4, 5 read kv head 1. Keys are not repeated.

    Args:
        queries: ``(batch, heads, window, head_dim)`` queries of the last ``window`` tokens, after
            RoPE, any float dtype. ``window <= seq``.
        keys: ``(batch, kv_heads, seq, head_dim)`` cached keys (after RoPE); ``heads`` must be a
            multiple of ``kv_heads``.
        valid: ``(batch, seq)`` bool, False on padding.
        scaling: softmax scale of the layer (``head_dim ** -0.5`` for Llama).
        padded: False when ``valid`` is all True (the caller knows it without a device sync): the
            padding mask, a pass over the whole ``(batch, heads, window, seq)`` logits, is skipped and
            only the last ``window`` columns get the causal mask. True: mask every column.

    Returns:
        ``(batch, heads, window, seq)`` float32 attention probabilities.

    Raises:
        ValueError: on inconsistent shapes.
    """
    if queries.dim() != 4 or keys.dim() != 4:
        raise ValueError(
            "queries must be (batch, heads, window, head_dim) and keys (batch, kv_heads, seq, head_dim); "
            f"got queries {tuple(queries.shape)} and keys {tuple(keys.shape)}"
        )
    batch, heads, window, head_dim = queries.shape
    kv_batch, kv_heads, seq, kv_head_dim = keys.shape
    if kv_batch != batch or kv_head_dim != head_dim:
        raise ValueError(
            f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} disagree on batch or head_dim"
        )
    if heads % kv_heads != 0:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    if window > seq:
        raise ValueError(f"window ({window}) must be <= seq ({seq}); pass the last min(window, seq) queries")
    if tuple(valid.shape) != (batch, seq):
        raise ValueError(f"valid must be (batch, seq) = {(batch, seq)}; got {tuple(valid.shape)}")
    groups = heads // kv_heads

    # Query heads of one kv group are adjacent, so (batch, heads, window, d) reshapes to
    # (batch, kv_heads, groups * window, d) and one matmul per kv head covers its whole group.
    q = queries.to(torch.float32).reshape(batch, kv_heads, groups * window, head_dim)
    k = keys.to(torch.float32)
    logits = torch.matmul(q, k.transpose(-1, -2)) * scaling  # (batch, kv_heads, groups * window, seq)
    logits = logits.view(batch, heads, window, seq)

    device = keys.device
    if not padded:
        # Only the window's own keys can be hidden (causally), and every query sees at least itself.
        tail = torch.ones(window, window, dtype=torch.bool, device=device).tril()
        logits[..., seq - window :].masked_fill_(~tail, float("-inf"))
        return torch.softmax(logits, dim=-1)
    q_index = torch.arange(seq - window, seq, device=device)  # sequence index of each window query
    k_index = torch.arange(seq, device=device)
    causal = k_index[None, :] <= q_index[:, None]  # (window, seq)
    visible = causal[None, None] & valid.to(device=device, dtype=torch.bool)[:, None, None, :]  # (batch, 1, window, seq)

    # In place: the logits are (batch, heads, window, seq) float32, the largest tensor of the step.
    probs = torch.softmax(logits.masked_fill_(~visible, float("-inf")), dim=-1)
    # Rows with no visible key are all -inf and softmax gives NaN there: make them zero.
    return probs.masked_fill_(~visible.any(dim=-1, keepdim=True), 0.0)


def window_mass_sum(
    queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, scaling: float, padded: bool = True
) -> torch.Tensor:
    """The attention mass the window's queries give each key: :func:`window_attention` summed over
    the window, ``(batch, heads, seq)`` float32 (arguments as there).

    A query that sees no valid key (on left padding) adds nothing, so dividing by the number of
    valid window queries gives their mean. On CUDA (the ``"mass"`` switch of :mod:`zigzag.kernels`) a Triton kernel
    computes it without writing the ``(batch, heads, window, seq)`` logits: half-precision products
    are exact in float32 either way, and float32 inputs are multiplied in TF32 exactly when
    PyTorch's matmuls are (:func:`zigzag.pipeline.hf.tf32_matmuls`).
    """
    batch, heads, window, head_dim = queries.shape
    kv_heads = keys.shape[1] if keys.dim() == 4 else 1
    supported = (
        keys.dim() == 4
        and keys.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and queries.dtype in (keys.dtype, torch.float32)
        and 0 < window <= min(keys.shape[2], 256)
        and head_dim <= 256
        and batch * kv_heads < 2**16
        and heads % kv_heads == 0
    )
    if not _MASS_SWITCH.use_kernel(keys.device, supported):
        return window_attention(queries, keys, valid, scaling, padded).sum(dim=2)
    from zigzag.kernels import mass_triton  # imports triton: on first use only

    precision = "tf32" if keys.is_cuda and tf32_matmuls_enabled() else "ieee"
    return mass_triton.window_mass_sum(queries, keys, valid.to(keys.device, torch.bool) if padded else None, scaling, precision)


def group_mean(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Average per-query-head values over the query heads of each KV group.

    Query head ``h`` belongs to kv head ``h // (heads // kv_heads)``.

    Args:
        x: ``(batch, heads, seq)``.
        kv_heads: number of kv heads; ``heads`` must be a multiple of it.

    Returns:
        ``(batch, kv_heads, seq)``, same dtype as ``x``.
    """
    batch, heads, seq = x.shape
    if kv_heads < 1 or heads % kv_heads != 0:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    return x.reshape(batch, kv_heads, heads // kv_heads, seq).mean(dim=2)


def raise_protected(scores: torch.Tensor, protected: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Lift protected tokens above every other valid token of the same (row, kv head).

    Protected tokens are shifted by one constant per (row, kv head), ``max(others) - min(protected) + 1``,
    so they keep their order among themselves and end up at least 1 above every unprotected valid
    token. Padding does not enter the shift, so a row's result does not depend on its padding or on
    the other rows. Where a (row, kv head) has no unprotected valid token, nothing is shifted.

    Args:
        scores: ``(batch, kv_heads, seq)`` float.
        protected: ``(batch, seq)`` bool, the tokens to lift (e.g. the observation window, sinks), or
            ``(batch, kv_heads, seq)`` when each KV head protects its own.
        valid: ``(batch, seq)`` bool, False on padding.

    Returns:
        ``(batch, kv_heads, seq)`` new tensor, same dtype as ``scores``.
    """
    protected = (protected & valid[:, None, :]) if protected.dim() == 3 else (protected & valid)[:, None, :]
    others = valid[:, None, :] & ~protected
    top_other = scores.masked_fill(~others, float("-inf")).amax(dim=-1, keepdim=True)
    low_protected = scores.masked_fill(~protected, float("inf")).amin(dim=-1, keepdim=True)
    shift = top_other - low_protected + 1.0
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift)).clamp(min=0.0)
    return torch.where(protected, scores + shift, scores)


def last_queries(layer: LayerView, w: int, who: str) -> torch.Tensor:
    """The last ``w`` window queries of ``layer``, ``(batch, heads, w, head_dim)``, checked."""
    queries = layer.window_queries
    if queries is None:
        raise ValueError(f"{who} needs LayerView.window_queries (query_window > 0); got None")
    if queries.dim() != 4 or queries.shape[2] < w:
        raise ValueError(
            f"{who} needs window_queries of shape (batch, heads, >= {w}, head_dim); got {tuple(queries.shape)}"
        )
    return queries[:, :, queries.shape[2] - w :]

"""What every merge returns, and the input checks and quota rule that both implementations share.

A merge folds each *evicted* token of a (batch row, KV head) into one *survivor* (kept token) of the
same row and head. Shapes used throughout ``zigzag.merge``::

    keys, values: (batch, kv_heads, seq, head_dim)   the full prefill cache of one layer
    kept:         (batch, kv_heads, n) long          ascending columns of seq; -1 = empty slot (first)
    valid:        (batch, seq) bool                  False on left padding

A position is *evicted* for (row, head) when it is valid and not in that row and head's ``kept``.
Padding is never evicted and never absorbs anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

QUOTA_SLACK = 1e-6
"""Subtracted before rounding up ``fraction * n_evicted`` so that e.g. 0.3 * 10 gives 3, not 4."""


@dataclass
class MergeResult:
    """Merged survivors of one layer.

    Attributes:
        values: ``(batch, kv_heads, n, head_dim)`` in the input dtype: the survivors' values after
            merging (keys never change, so none are returned). Empty slots (``kept == -1``) hold zeros.
        counts: ``(batch, kv_heads, n)`` float32: ``1 +`` the number of evicted tokens the slot
            absorbed (those with merge weight ``w > 0``); ``0`` on empty slots. A survivor that stands
            for ``c`` tokens whose attention logits were about equal would have received ``c`` times
            its own softmax weight before eviction; adding ``log(c)`` to its logit restores exactly
            that: ``exp(z + log c) = c * exp(z)``. This is the count kept by D2O
            (https://arxiv.org/abs/2406.13035) and KeepKV (https://arxiv.org/abs/2504.09936); the
            cache applies the bias only when the merge asks for it (``preserve_mass``).
    """

    values: torch.Tensor
    counts: torch.Tensor


def merge_quota(n_evicted: int, fraction: float) -> int:
    """How many evicted tokens of one (row, head) may merge: ``ceil(fraction * n_evicted)``.

    Computed in float64 with a slack of :data:`QUOTA_SLACK`; the chunked path applies the same
    formula elementwise (``torch.ceil(n.double() * fraction - QUOTA_SLACK)``).
    """
    return max(0, math.ceil(fraction * n_evicted - QUOTA_SLACK))


def check_merge_args(threshold: float, fraction: float) -> None:
    """Raise ``ValueError`` unless ``-1 <= threshold <= 1`` and ``0 < fraction <= 1``."""
    if not isinstance(threshold, (int, float)) or not -1.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be a cosine in [-1, 1]; got {threshold!r}")
    if not isinstance(fraction, (int, float)) or not 0.0 < float(fraction) <= 1.0:
        raise ValueError(
            f"fraction must be in (0, 1] (share of the evicted tokens that merge; 1 = all); got {fraction!r}"
        )


def check_inputs(keys: torch.Tensor, values: torch.Tensor, kept: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Validate the shapes, dtypes and devices of a merge call; return ``kept`` as int64.

    Raises:
        TypeError: an argument is not a tensor, or has the wrong dtype kind.
        ValueError: shapes or devices disagree.
    """
    for name, t in (("keys", keys), ("values", values), ("kept", kept), ("valid", valid)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if keys.dim() != 4 or keys.shape != values.shape:
        raise ValueError(
            "keys and values must both be (batch, kv_heads, seq, head_dim); "
            f"got keys {tuple(keys.shape)}, values {tuple(values.shape)}"
        )
    if not keys.is_floating_point() or not values.is_floating_point():
        raise TypeError(f"keys and values must be floating point; got {keys.dtype} and {values.dtype}")
    batch, kv_heads, seq, _ = keys.shape
    if kept.dim() != 3 or tuple(kept.shape[:2]) != (batch, kv_heads):
        raise ValueError(f"kept must be (batch, kv_heads, n) = ({batch}, {kv_heads}, n); got {tuple(kept.shape)}")
    if kept.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"kept must hold integer positions (-1 = empty slot); got {kept.dtype}")
    if tuple(valid.shape) != (batch, seq):
        raise ValueError(f"valid must be (batch, seq) = ({batch}, {seq}); got {tuple(valid.shape)}")
    if valid.dtype != torch.bool:
        raise TypeError(f"valid must be a bool mask (False on padding); got {valid.dtype}")
    devices = {t.device for t in (keys, values, kept, valid)}
    if len(devices) != 1:
        raise ValueError(f"keys, values, kept and valid must be on one device; got {sorted(map(str, devices))}")
    return kept.long()

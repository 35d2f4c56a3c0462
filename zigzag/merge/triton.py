"""Fused similarity search for CUDA: merge-on-evict with :mod:`zigzag.kernels.merge_triton`'s kernel.

Imported lazily by :class:`~zigzag.merge.cosine.CosineMerge` when the ``"merge"`` kernel switch
(:mod:`zigzag.kernels`) picks Triton. Only the ``seq x n`` search runs in the kernel; the quota,
threshold and accumulation reuse :mod:`zigzag.merge.chunked`, so both paths apply the same rule.
"""

from __future__ import annotations

import torch

from zigzag.kernels.merge_triton import KERNEL_DTYPES, cosine_best_match
from zigzag.merge.base import MergeResult
from zigzag.merge.chunked import Survivors, best_match_torch, merge_with


def best_match_triton(keys: torch.Tensor, surv: Survivors, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for :func:`zigzag.merge.chunked.best_match_torch` (``chunk_size`` is unused: nothing
    of size ``seq x n`` is ever stored). float64 inputs go to the PyTorch path."""
    if keys.dtype not in KERNEL_DTYPES:
        return best_match_torch(keys, surv, chunk_size)
    return cosine_best_match(keys, surv.keys, surv.inv_norm.float().contiguous(), surv.evicted)


def merge_triton(
    keys: torch.Tensor,
    values: torch.Tensor,
    kept: torch.Tensor,
    valid: torch.Tensor,
    threshold: float = 0.0,
    fraction: float = 1.0,
    chunk_size: int | None = None,
) -> MergeResult:
    """:func:`zigzag.merge.chunked.merge_chunked` with the fused search (same arguments and result)."""
    return merge_with(best_match_triton, keys, values, kept, valid, threshold, fraction, chunk_size)

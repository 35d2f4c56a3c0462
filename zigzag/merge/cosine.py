"""CosineMerge: fold each evicted token into the survivor whose key is most cosine-similar."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from zigzag.kernels.switch import kernel_switch
from zigzag.merge.base import MergeResult, check_merge_args
from zigzag.merge.chunked import merge_chunked

_SWITCH = kernel_switch("merge")


@dataclass(frozen=True)
class CosineMerge:
    """Merge-on-evict: each evicted token's value folds into the kept token with the most similar key.

    Within one (batch row, KV head), evicted token ``e`` picks the survivor ``s`` whose key has the
    largest cosine ``c`` with ``k_e`` (ties: lowest slot), and gets the weight
    ``w_e = max(c, 0) * |v_e| / (|v_e| + |v_s|)`` (``v_s`` the survivor's original value). Then
    ``v_s <- (v_s + sum_e w_e v_e) / (1 + sum_e w_e)``: a convex combination, so merged values stay
    inside the hull of the values they stand for. Keys never change: averaging rotated (RoPE) keys
    would give a key that matches no position. Merging with D2O-style similarity matching:
    https://arxiv.org/abs/2406.13035 (D2O), https://arxiv.org/abs/2504.09936 (KeepKV).

    Parameters
    ----------
    threshold:
        Minimum cosine for a token to merge, in ``[-1, 1]``. Default ``0.0``: every token with a
        positive cosine merges (tokens with ``c <= 0`` have ``w = 0`` anyway).
    fraction:
        Share ``(0, 1]`` of each (row, head)'s evicted tokens that may merge, the most similar first
        (``ceil(fraction * n_evicted)`` tokens, ties by position). Default ``1.0``: all of them.
    chunk_size:
        Positions per similarity block; peak extra memory is about ``batch * kv_heads * chunk_size * n``
        floats. ``None`` (default) picks the largest block with at most ``2**26`` similarities.
    preserve_mass:
        Read by the cache, not by :meth:`merge`: when True, attention adds ``log(counts)`` to the
        logit of each survivor so that it carries the attention mass of the tokens it absorbed (see
        :class:`~zigzag.merge.base.MergeResult`). Default False.

    The similarity search runs in a fused Triton kernel (:mod:`zigzag.kernels.merge_triton`) or the
    blocked PyTorch path (the reference), as the ``"merge"`` kernel switch chooses
    (``zigzag.kernels.set_backend("merge", ...)`` or ``ZIGZAG_MERGE_BACKEND``; ``"auto"``: the kernel
    for CUDA inputs in float16, bfloat16 or float32 when ``triton`` imports).
    """

    name: ClassVar[str] = "cosine"

    threshold: float = 0.0
    fraction: float = 1.0
    chunk_size: int | None = None
    preserve_mass: bool = False

    def __post_init__(self) -> None:
        check_merge_args(self.threshold, self.fraction)
        if self.chunk_size is not None and (
            isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1
        ):
            raise ValueError(f"chunk_size must be a positive int or None (auto); got {self.chunk_size!r}")

    def merge(self, keys: torch.Tensor, values: torch.Tensor, kept: torch.Tensor, valid: torch.Tensor) -> MergeResult:
        """Merge one layer's evicted tokens into its survivors.

        Args:
            keys: ``(batch, kv_heads, seq, head_dim)`` all prefill keys (never modified).
            values: ``(batch, kv_heads, seq, head_dim)`` all prefill values (never modified).
            kept: ``(batch, kv_heads, n)`` integer: kept columns of ``seq``, ascending; ``-1`` marks
                an empty slot (empty slots come first).
            valid: ``(batch, seq)`` bool, False on left padding (padding is never evicted or merged).

        Returns:
            :class:`MergeResult`: merged ``values (batch, kv_heads, n, head_dim)`` in ``values.dtype``
            (zeros on empty slots) and ``counts (batch, kv_heads, n)`` float32.
        """
        if _SWITCH.use_kernel(keys.device, keys.dtype in (torch.float16, torch.bfloat16, torch.float32)):
            from zigzag.merge.triton import merge_triton

            return merge_triton(keys, values, kept, valid, self.threshold, self.fraction, self.chunk_size)
        return merge_chunked(keys, values, kept, valid, self.threshold, self.fraction, self.chunk_size)

"""SnapKV: rank tokens by the attention they get from an observation window of last queries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from zigzag.scorers.base import LayerView, Scorer
from zigzag.scorers.window import group_mean, last_queries, raise_protected, window_mass_sum


@dataclass
class SnapKV(Scorer):
    """Score each token by the attention it receives from the last ``window`` queries.

    Paper: https://arxiv.org/abs/2404.14469 ("SnapKV: LLM Knows What You are Looking for Before
    Generation", Li et al., 2024).

    Steps, for each row:

    1. The last ``w = min(window, seq)`` queries (after RoPE) attend over all keys with the layer's
       ``scaling``, causal inside the window, padding masked, softmax in float32
       (:func:`~zigzag.scorers.window_attention`).
    2. Average over the *valid* window queries (queries on left padding are left out, so a padded
       row scores like the same row without padding), then over the query heads of each KV group.
    3. The tokens before the window (the prefix, ``seq - w`` tokens) are smoothed by 1-D average
       pooling (``kernel_size``, stride 1, zero padding ``kernel_size // 2``,
       ``count_include_pad=True``, as in the paper's code and kvpress). Zero padding counts, so the
       smoothing at the start of a left-padded row (whose padded keys have probability 0) matches
       the same row without padding. Pooling stops at the window: window tokens do not leak into
       the prefix.
    4. The window tokens keep their own (unpooled) average attention, lifted above every prefix
       token by one per-row shift (they are always kept first; among themselves they keep that
       order). Prefix scores stay raw attention mass in ``[0, 1]``.

    Parameters
    ----------
    window:
        Number of last queries observed (``w``); also the number of protected last tokens. If
        ``seq < window`` the window is the whole sequence.
    kernel_size:
        Width of the average pooling; odd, so that the length is unchanged. 1 disables pooling.
    """

    window: int = 64
    kernel_size: int = 5

    name: ClassVar[str] = "snapkv"
    needs_query_stats: ClassVar[bool] = False
    query_stats_skip: ClassVar[int] = 0

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be >= 1 (number of last queries observed); got {self.window}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(
                f"kernel_size must be a positive odd integer (pooling keeps the length); got {self.kernel_size}"
            )

    @property
    def query_window(self) -> int:
        """Number of last queries the pipeline must pass in ``LayerView.window_queries``."""
        return self.window

    def score(self, layer: LayerView) -> torch.Tensor:
        """Return SnapKV scores.

        Args:
            layer: the layer; reads ``keys: (batch, kv_heads, seq, head_dim)``, ``valid: (batch, seq)``,
                ``scaling`` and ``window_queries: (batch, heads, >= min(window, seq), head_dim)``
                (only the last ``min(window, seq)`` are used).

        Returns:
            ``(batch, kv_heads, seq)`` float32; higher means keep.
        """
        batch, kv_heads, seq = layer.batch, layer.kv_heads, layer.seq
        w = min(self.window, seq)
        queries = last_queries(layer, w, type(self).__name__)
        valid = layer.valid.to(device=layer.keys.device, dtype=torch.bool)

        # Queries on padding see no key and add nothing to the sum: dividing by the valid ones averages them.
        n_queries = valid[:, -w:].sum(dim=-1).clamp(min=1).to(torch.float32)  # (batch,)
        mass = window_mass_sum(queries, layer.keys, valid, layer.scaling, layer.padded) / n_queries[:, None, None]  # (batch, heads, seq)
        mass = group_mean(mass, kv_heads)  # (batch, kv_heads, seq)

        prefix = seq - w
        if prefix > 0 and self.kernel_size > 1:
            pooled = F.avg_pool1d(
                mass[..., :prefix].reshape(batch * kv_heads, 1, prefix),
                kernel_size=self.kernel_size,
                stride=1,
                padding=self.kernel_size // 2,
                count_include_pad=True,
            ).view(batch, kv_heads, prefix)
            mass = torch.cat([pooled, mass[..., prefix:]], dim=-1)

        in_window = torch.zeros(batch, seq, dtype=torch.bool, device=mass.device)
        in_window[:, prefix:] = True
        return raise_protected(mass, in_window, valid)


"""Knorm: keep the keys with the smallest L2 norm."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from zigzag.scorers.base import LayerView, Scorer


@dataclass
class Knorm(Scorer):
    """Score each token by minus the L2 norm of its cached key.

    Paper: https://arxiv.org/abs/2406.11430 ("A Simple and Effective L2 Norm-Based Strategy for KV
    Cache Compression", Devoto et al., 2024): keys with a *low* norm draw high attention.

    Knorm has no hyperparameters and needs no queries.
    """

    name: ClassVar[str] = "knorm"
    query_window: ClassVar[int] = 0
    needs_query_stats: ClassVar[bool] = False
    query_stats_skip: ClassVar[int] = 0

    def score(self, layer: LayerView) -> torch.Tensor:
        """Return ``-||k||``.

        Args:
            layer: the layer; reads ``keys: (batch, kv_heads, seq, head_dim)``.

        Returns:
            ``(batch, kv_heads, seq)`` float32; higher means keep.
        """
        return -torch.linalg.vector_norm(layer.keys, dim=-1, dtype=torch.float32)

"""KeyDiff: keep the keys least similar to the row's average key direction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from zigzag.scorers.base import LayerView, Scorer

_EPS = 1e-8
"""Smallest norm divided by (``torch.nn.functional.cosine_similarity``'s): a zero key gets cosine 0."""


@dataclass
class KeyDiff(Scorer):
    """Score each token by minus the cosine similarity of its key to the row's anchor key.

    Paper: https://arxiv.org/abs/2504.15364 ("KeyDiff: Key Similarity-Based KV Cache Eviction for
    Long-Context LLM Inference in Resource-Constrained Environments", Park et al., 2025): keys that
    are geometrically distinctive draw high attention, so the keys most similar to the others go first.

    Per (row, KV head), the anchor is the mean of the *normalized* cached keys over the row's valid
    tokens, ``a = mean_i k_i / ||k_i||`` (the paper's ``mu(K^)``, Sec. 3), and the score of token
    ``i`` is ``-cos(k_i, a)``, in ``[-1, 1]``. Padding enters neither the mean nor its count, so a
    padded row scores like itself alone. Keys as cached (after RoPE), as the paper and kvpress use them.

    KeyDiff has no hyperparameters and needs no queries.
    """

    name: ClassVar[str] = "keydiff"
    query_window: ClassVar[int] = 0
    needs_query_stats: ClassVar[bool] = False
    query_stats_skip: ClassVar[int] = 0

    def score(self, layer: LayerView) -> torch.Tensor:
        """Return ``-cos(k, anchor)``.

        Args:
            layer: the layer; reads ``keys: (batch, kv_heads, seq, head_dim)`` and ``valid: (batch, seq)``.

        Returns:
            ``(batch, kv_heads, seq)`` float32 in ``[-1, 1]``; higher means keep.
        """
        keys = layer.keys.to(torch.float32)
        valid = layer.valid.to(device=keys.device, dtype=torch.bool)[:, None, :, None]  # (batch, 1, seq, 1)
        norms = torch.linalg.vector_norm(keys, dim=-1, keepdim=True).clamp(min=_EPS)  # (batch, kv_heads, seq, 1)
        unit = (keys / norms).masked_fill(~valid, 0.0)
        count = valid.sum(dim=2, keepdim=True).clamp(min=1)  # (batch, 1, 1, 1)
        anchor = unit.sum(dim=2, keepdim=True) / count  # (batch, kv_heads, 1, head_dim)
        anchor_norm = torch.linalg.vector_norm(anchor, dim=-1).clamp(min=_EPS)  # (batch, kv_heads, 1)
        # cos(k, a) = (k / |k|) . a / |a|: 0 on padding, which the pipeline masks anyway.
        return -(unit * anchor).sum(dim=-1) / anchor_norm

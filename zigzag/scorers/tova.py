"""TOVA: rank tokens by the attention of the last query, averaged over all heads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from zigzag.scorers.base import LayerView, Scorer
from zigzag.scorers.window import last_queries, raise_protected, window_attention


@dataclass
class TOVA(Scorer):
    """Score each token by the attention the last query gives it, averaged over all query heads.

    Paper: https://arxiv.org/abs/2401.06104 ("Transformers are Multi-State RNNs", Oren et al., 2024),
    Token Omission Via Attention.

    SnapKV with a window of 1 and no pooling, except that the attention is averaged over *all*
    query heads, so every kv head gets the same score (TOVA evicts whole tokens). The last token
    is lifted above every other one (it is always kept). Other scores are attention mass in
    ``[0, 1]``, computed in float32 with the layer's ``scaling``, padded keys masked.

    TOVA has no hyperparameters.
    """

    name: ClassVar[str] = "tova"
    query_window: ClassVar[int] = 1
    needs_query_stats: ClassVar[bool] = False
    query_stats_skip: ClassVar[int] = 0

    def score(self, layer: LayerView) -> torch.Tensor:
        """Return TOVA scores.

        Args:
            layer: the layer; reads ``keys: (batch, kv_heads, seq, head_dim)``, ``valid: (batch, seq)``,
                ``scaling`` and the last of ``window_queries: (batch, heads, >= 1, head_dim)``.

        Returns:
            ``(batch, kv_heads, seq)`` float32, the same for every kv head; higher means keep.
        """
        batch, kv_heads, seq = layer.batch, layer.kv_heads, layer.seq
        queries = last_queries(layer, 1, type(self).__name__)  # (batch, heads, 1, head_dim)
        valid = layer.valid.to(device=layer.keys.device, dtype=torch.bool)
        probs = window_attention(queries, layer.keys, valid, layer.scaling, layer.padded)  # (batch, heads, 1, seq)
        mass = probs[:, :, 0].mean(dim=1, keepdim=True)  # (batch, 1, seq)
        last = torch.zeros(batch, seq, dtype=torch.bool, device=mass.device)
        last[:, -1] = True
        return raise_protected(mass, last, valid).expand(batch, kv_heads, seq).contiguous()

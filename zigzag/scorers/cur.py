"""CurDKV: keep the tokens whose key and value both carry high leverage (CUR decomposition)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from zigzag.scorers.base import LayerView, Scorer
from zigzag.scorers.leverage import leverage_scores
from zigzag.scorers.window import raise_protected

_TINY = 1e-30
"""Floor of the sums divided by: a window or row whose scores are all 0 stays 0 instead of NaN."""

_COMBINE = ("product", "mean", "key", "value")
_LEVERAGE = ("exact", "norm")


@dataclass
class CUR(Scorer):
    """Score each token by the leverage of its key times the leverage of its value (CurDKV).

    Paper: https://arxiv.org/abs/2509.15038 ("Value-Guided KV Compression for LLMs via Approximated
    CUR Decomposition", Sengupta, Chaudhary & Chakraborty, NeurIPS 2025). CUR selects the rows of a
    matrix with the highest leverage; keeping the tokens whose keys (the columns of ``Q K^T``) and
    values (the rows of ``V``) both have high leverage preserves the attention *output*
    ``softmax(Q K^T) V``, not just the attention weights.

    Per (row, KV head), over the row's valid tokens:

    1. ``lk`` and ``lv``, the leverage of each key and each value (``leverage="exact"``: the diagonal
       of ``K (K^T K)^+ K^T``, uncentred, :func:`~zigzag.scorers.leverage.leverage_scores`);
    2. with ``local_window`` > 0, each divided by its sum over its window of ``local_window``
       consecutive valid tokens (windows counted from the first valid token; the last may be
       shorter), the paper code's local approximation: tokens compete with their neighbours;
    3. combined (``combine="product"``, the paper's default, ``lk * lv``) and divided by its sum over
       the row, a distribution over the tokens (which puts the KV heads on one scale);
    4. the first ``n_sink`` tokens (positions ``< n_sink``) lifted above every other token.

    The paper approximates the leverage by the squared norms of Gaussian random projections of the
    keys and values, and its code's default skips the projection: ``leverage="norm"`` reproduces
    that (``||k||^2`` and ``||v||^2``), the default computes the leverage exactly (deterministic, and
    ``O(seq * head_dim^2)`` like the rest). Padding enters no sum, so a padded row scores like itself alone.

    Parameters
    ----------
    n_sink:
        Leading tokens always kept (``num_sinks`` 4 in the authors' code).
    local_window:
        Window of the local normalization, in tokens (16 in the authors' code); 0 turns it off.
    combine:
        ``"product"`` (``lk * lv``, the default), ``"mean"`` (``(lk + lv) / 2``), ``"key"`` or ``"value"``.
    leverage:
        ``"exact"`` (statistical leverage) or ``"norm"`` (squared L2 norm, the authors' approximation).
    """

    n_sink: int = 4
    local_window: int = 16
    combine: str = "product"
    leverage: str = "exact"

    name: ClassVar[str] = "cur"
    query_window: ClassVar[int] = 0
    needs_query_stats: ClassVar[bool] = False
    query_stats_skip: ClassVar[int] = 0

    def __post_init__(self) -> None:
        if isinstance(self.n_sink, bool) or not isinstance(self.n_sink, int) or self.n_sink < 0:
            raise ValueError(f"n_sink must be a non-negative int (sink tokens kept); got {self.n_sink!r}")
        window = self.local_window
        if isinstance(window, bool) or not isinstance(window, int) or window < 0 or window == 1:
            raise ValueError(
                f"local_window must be 0 (off) or an int >= 2 (a window of 1 makes every score 1); got {window!r}"
            )
        if self.combine not in _COMBINE:
            raise ValueError(f"combine must be one of {', '.join(map(repr, _COMBINE))}; got {self.combine!r}")
        if self.leverage not in _LEVERAGE:
            raise ValueError(f"leverage must be one of {', '.join(map(repr, _LEVERAGE))}; got {self.leverage!r}")

    def score(self, layer: LayerView) -> torch.Tensor:
        """Return CurDKV scores.

        Args:
            layer: the layer; reads ``keys``/``values: (batch, kv_heads, seq, head_dim)``,
                ``valid: (batch, seq)`` and ``positions: (batch, seq)``.

        Returns:
            ``(batch, kv_heads, seq)`` float32; higher means keep.
        """
        device = layer.keys.device
        valid = layer.valid.to(device=device, dtype=torch.bool)
        key_lev = self._leverage(layer.keys, valid) if self.combine != "value" else None
        value_lev = self._leverage(layer.values, valid) if self.combine != "key" else None
        if self.combine == "product":
            scores = key_lev * value_lev
        elif self.combine == "mean":
            scores = (key_lev + value_lev) / 2
        else:
            scores = key_lev if value_lev is None else value_lev
        scores = scores.masked_fill(~valid[:, None, :], 0.0)
        scores = scores / scores.sum(dim=-1, keepdim=True).clamp(min=_TINY)
        sinks = valid & (layer.positions.to(device) < self.n_sink)
        return raise_protected(scores, sinks, valid)

    def _leverage(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``(batch, kv_heads, seq)`` float32 leverage of ``x``'s rows, locally normalized, 0 on padding."""
        if self.leverage == "exact":
            lev = leverage_scores(x, valid, center=False)
        else:
            lev = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32).square()
        lev = lev.masked_fill(~valid[:, None, :], 0.0)
        if self.local_window == 0:
            return lev
        batch, kv_heads, seq = lev.shape
        # Window of each token among the row's valid tokens: padding does not shift the windows.
        window = ((valid.cumsum(dim=-1) - 1).clamp(min=0) // self.local_window)[:, None, :].expand(batch, kv_heads, seq)
        n_windows = seq // self.local_window + 1
        sums = torch.zeros(batch, kv_heads, n_windows, dtype=torch.float32, device=lev.device)
        sums.scatter_add_(2, window, lev)
        return lev / sums.gather(2, window).clamp(min=_TINY)

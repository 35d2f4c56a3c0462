"""Leverage scores: keep the keys that the rest of the row's keys explain least (statistical outliers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from zigzag.scorers.base import LayerView, Scorer

_CHUNK = 4096
"""Tokens per step of the float64 passes; bounds their extra memory at ``batch * heads * _CHUNK * head_dim``."""

_DATA_RTOL = torch.finfo(torch.float32).eps
"""Singular values below ``head_dim * _DATA_RTOL`` times the largest are float32 rounding noise of the
data (the keys reach the scorer in float32 or less): e.g. a key channel that is a sum of two others
once rounded. Whitening would blow such a direction up to a full unit of leverage."""

_GRAM_RTOL = 16 * torch.finfo(torch.float64).eps
"""Eigenvalues below ``max(n, head_dim) * _GRAM_RTOL`` times the largest are round-off of the float64
Gram matrix of ``n`` vectors (an exactly rank-deficient row, e.g. fewer tokens than ``head_dim``)."""


def leverage_scores(x: torch.Tensor, valid: torch.Tensor, center: bool = True) -> torch.Tensor:
    """Exact statistical leverage of every valid row of ``x``, per (row, head).

    For one (row, head), with ``X`` the ``(n, d)`` matrix of its ``n`` valid vectors (centred on their
    mean when ``center``), the leverage of vector ``i`` is the ``i``-th diagonal entry of the hat
    matrix ``X (X^T X)^+ X^T``: ``h_i = x_i^T (X^T X)^+ x_i``, in ``[0, 1]``, summing to the rank of
    ``X``. It is computed from the eigendecomposition ``X^T X = V diag(lam) V^T`` of the ``(d, d)``
    Gram matrix in float64, ``h_i = sum_j (x_i . v_j)^2 / lam_j`` over the directions above the rank
    tolerance (singular values above ``head_dim * eps(float32)`` times the largest, :data:`_DATA_RTOL`,
    and above the float64 round-off, :data:`_GRAM_RTOL`), so no ``(n, n)`` matrix is built: memory is
    ``O(seq * d)`` (float64 passes over ``_CHUNK`` tokens at a time) and time ``O(seq * d^2)``.

    Padding (``valid`` False) enters neither the mean nor the Gram matrix, so a row's scores do not
    depend on its padding; padded positions score 0.

    Args:
        x: ``(batch, heads, seq, d)`` keys or values, any float dtype.
        valid: ``(batch, seq)`` bool, False on padding.
        center: subtract the mean of the valid vectors first (the Compactor reference does); without
            it the leverage is that of the raw matrix (CUR's column/row leverage).

    Returns:
        ``(batch, heads, seq)`` float32 leverage scores, 0 on padding.
    """
    batch, heads, seq, d = x.shape
    device = x.device
    mask = valid.to(device=device, dtype=torch.bool)[:, None, :, None]  # (batch, 1, seq, 1)
    n = mask.sum(dim=2, dtype=torch.float64)  # (batch, 1, 1): valid tokens per row

    mean = torch.zeros(batch, heads, 1, d, dtype=torch.float64, device=device)
    if center:
        for start in range(0, seq, _CHUNK):
            part = _chunk(x, mask, start, None)
            mean += part.sum(dim=2, keepdim=True)
        mean /= n[..., None].clamp(min=1.0)

    gram = torch.zeros(batch, heads, d, d, dtype=torch.float64, device=device)
    for start in range(0, seq, _CHUNK):
        part = _chunk(x, mask, start, mean)
        gram += part.transpose(-1, -2) @ part
    lam, vec = torch.linalg.eigh(gram)  # ascending eigenvalues, (batch, heads, d) and (batch, heads, d, d)

    # Keep the directions above the rank tolerance; an all-zero X keeps none (its leverage is 0).
    top = lam[..., -1:].clamp(min=0.0)
    rtol = (d * _DATA_RTOL) ** 2 + _GRAM_RTOL * n.clamp(min=float(d))  # relative to the top eigenvalue, (batch, 1, 1)
    tol = rtol * top  # (batch, heads, 1)
    kept = (lam > tol) & (lam > 0)
    inv = torch.where(kept, 1.0 / torch.where(kept, lam, torch.ones_like(lam)), torch.zeros_like(lam))

    out = torch.empty(batch, heads, seq, dtype=torch.float32, device=device)
    for start in range(0, seq, _CHUNK):
        part = _chunk(x, mask, start, mean)
        proj = part @ vec  # (batch, heads, c, d): coordinates along the eigenvectors
        out[:, :, start : start + part.shape[2]] = (proj.square() * inv[:, :, None, :]).sum(dim=-1).to(torch.float32)
    return out.clamp_(min=0.0, max=1.0)


def _chunk(x: torch.Tensor, mask: torch.Tensor, start: int, mean: torch.Tensor | None) -> torch.Tensor:
    """Tokens ``start : start + _CHUNK`` of ``x`` in float64, minus ``mean``, zero on padding."""
    part = x[:, :, start : start + _CHUNK].to(torch.float64)
    if mean is not None:
        part = part - mean
    return part.masked_fill(~mask[:, :, start : start + _CHUNK], 0.0)


def unrotate_keys(layer: LayerView, who: str) -> torch.Tensor:
    """The keys of ``layer`` before RoPE, ``(batch, kv_heads, seq, head_dim)`` float32, undoing
    ``k_rot = k * cos + rotate_half(k) * sin`` at each token's position with ``layer.rope``."""
    if layer.rope is None:
        raise ValueError(f"{who} needs LayerView.rope to undo RoPE (needs_query_stats=True); got None")
    keys = layer.keys.to(torch.float32)
    cos, sin = layer.rope(layer.positions.to(device=keys.device, dtype=torch.long))
    if cos.shape[-1] != keys.shape[-1]:
        raise ValueError(
            f"rope must return cos/sin over the full head_dim ({keys.shape[-1]}); got {cos.shape[-1]} "
            "(partial rotary embeddings are not supported)"
        )
    cos = cos.to(device=keys.device, dtype=torch.float32)[:, None]  # (batch, 1, seq, d)
    sin = sin.to(device=keys.device, dtype=torch.float32)[:, None]
    half = keys.shape[-1] // 2
    # The rotation by -angle: k = k_rot * cos - rotate_half(k_rot) * sin.
    rotated_half = torch.cat([-keys[..., half:], keys[..., :half]], dim=-1)
    return keys * cos - rotated_half * sin


@dataclass
class LeverageScore(Scorer):
    """Score each token by the statistical leverage of its key among the row's keys (outliers are kept).

    Paper: https://arxiv.org/abs/2507.08143 ("Compactor: Calibrated Query-Agnostic KV Cache
    Compression with Approximate Leverage Scores", Chari & Van Durme, 2025), its leverage-score part.

    Per (row, KV head), with ``K`` the ``(n, head_dim)`` keys of the row's ``n`` valid tokens, centred
    on their mean (as the reference does), the score of token ``i`` is the ``i``-th diagonal entry of
    the hat matrix ``K (K^T K)^+ K^T``, in ``[0, 1]`` (:func:`leverage_scores`). A key with high
    leverage lies in a direction few other keys share: attention can single it out, and no other
    key stands in for it. The reference approximates the leverage with a right Gaussian sketch of
    the keys (to 48 columns) and a jittered Cholesky solve; this computes it exactly (float64 Gram
    eigendecomposition with a rank tolerance), which is cheap at ``head_dim <= 256`` and
    deterministic.

    Parameters
    ----------
    center:
        Centre the keys on their mean over the row's valid tokens first (the reference does).
    pre_rope:
        Score the keys before RoPE (the reference does), undone with ``layer.rope``; the pipeline
        passes ``rope`` only to scorers with ``needs_query_stats``, so this turns it on (and the
        pipeline then also gathers query statistics this scorer does not read). False (default):
        the cached keys, after RoPE, and nothing else is needed.
    """

    center: bool = True
    pre_rope: bool = False

    name: ClassVar[str] = "leverage"
    query_window: ClassVar[int] = 0
    query_stats_skip: ClassVar[int] = 0

    def __post_init__(self) -> None:
        for arg in ("center", "pre_rope"):
            if type(getattr(self, arg)) is not bool:
                raise TypeError(f"{arg} must be a bool; got {getattr(self, arg)!r}")

    @property
    def needs_query_stats(self) -> bool:
        """True exactly when ``pre_rope``: the pipeline hands ``rope`` only along with query statistics."""
        return self.pre_rope

    def score(self, layer: LayerView) -> torch.Tensor:
        """Return the leverage of each key.

        Args:
            layer: the layer; reads ``keys: (batch, kv_heads, seq, head_dim)`` and ``valid: (batch, seq)``
                (with ``pre_rope`` also ``positions: (batch, seq)`` and ``rope``).

        Returns:
            ``(batch, kv_heads, seq)`` float32 in ``[0, 1]``; higher means keep.
        """
        keys = unrotate_keys(layer, type(self).__name__) if self.pre_rope else layer.keys
        return leverage_scores(keys, layer.valid, center=self.center)

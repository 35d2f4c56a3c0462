"""Shared builders for the scorer tests: a standard RoPE and LayerViews built from per-row data.

Exposed as the ``kit`` fixture (a namespace of plain functions) so that no test imports a sibling
module by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from zigzag.scorers import LayerView

THETA = 10000.0


def rope_cos_sin(positions: torch.Tensor, head_dim: int, dtype: torch.dtype = torch.float32):
    """Standard RoPE (theta 10000, HF layout): positions (batch, n) -> cos, sin (batch, n, head_dim)."""
    inv_freq = 1.0 / THETA ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
    freqs = positions.to(torch.float64)[..., None] * inv_freq  # (batch, n, d/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x (..., n, d) rotated at positions (n,) (float64 math, result in x's dtype)."""
    cos, sin = rope_cos_sin(positions[None], x.shape[-1], torch.float64)
    x64 = x.to(torch.float64)
    return (x64 * cos[0] + rotate_half(x64) * sin[0]).to(x.dtype)


@dataclass
class Row:
    """One sequence without padding: pre-RoPE keys/queries, values, reconstruction scores."""

    k_pre: torch.Tensor  # (kv_heads, L, d)
    values: torch.Tensor  # (kv_heads, L, d)
    q_pre: torch.Tensor  # (heads, L, d)
    reconstruction: torch.Tensor  # (kv_heads, L) in [0, 1], what the pipeline would pass KVzip

    @property
    def length(self) -> int:
        return self.k_pre.shape[1]


def random_row(length: int, heads: int, kv_heads: int, head_dim: int) -> Row:
    q_bias = torch.randn(heads, 1, head_dim)  # queries with a non-zero mean, as in real models
    return Row(
        k_pre=torch.randn(kv_heads, length, head_dim),
        values=torch.randn(kv_heads, length, head_dim) * torch.rand(kv_heads, length, 1) * 2,
        q_pre=torch.randn(heads, length, head_dim) * 0.7 + q_bias,
        reconstruction=torch.rand(kv_heads, length),
    )


def build(
    rows: list[Row],
    seq: int | None = None,
    window: int = 0,
    stats_skip: int | None = None,
    dtype: torch.dtype = torch.float32,
    layer_idx: int = 0,
    reconstruction: bool = False,
) -> LayerView:
    """Left-pad the rows to ``seq`` (garbage on padding) and build the LayerView the pipeline would.

    ``window`` > 0 fills window_queries with the last min(window, seq) post-RoPE queries;
    ``stats_skip`` not None fills query_mean/query_cov (pre-RoPE, population covariance over the
    valid tokens after the first ``stats_skip``) and rope; ``reconstruction`` fills
    reconstruction_scores from the rows' (garbage on padding).
    """
    seq = max(r.length for r in rows) if seq is None else seq
    kv_heads, _, head_dim = rows[0].k_pre.shape
    heads = rows[0].q_pre.shape[0]
    batch = len(rows)
    keys = torch.randn(batch, kv_heads, seq, head_dim) * 10  # garbage on padding
    values = torch.randn(batch, kv_heads, seq, head_dim) * 10
    queries = torch.randn(batch, heads, seq, head_dim) * 10
    valid = torch.zeros(batch, seq, dtype=torch.bool)
    positions = torch.zeros(batch, seq, dtype=torch.long)
    mean = torch.zeros(batch, heads, head_dim)
    cov = torch.zeros(batch, heads, head_dim, head_dim)
    repeated = torch.rand(batch, kv_heads, seq) * 10  # garbage on padding
    for b, r in enumerate(rows):
        pad = seq - r.length
        pos = torch.arange(r.length)
        keys[b, :, pad:] = apply_rope(r.k_pre, pos)
        values[b, :, pad:] = r.values
        queries[b, :, pad:] = apply_rope(r.q_pre, pos)
        valid[b, pad:] = True
        positions[b, pad:] = pos
        repeated[b, :, pad:] = r.reconstruction
        if stats_skip is not None:
            q = r.q_pre[:, stats_skip:].to(torch.float64)
            if q.shape[1] > 0:
                m = q.mean(dim=1)
                c = q - m[:, None]
                mean[b] = m.float()
                cov[b] = (c.transpose(-1, -2) @ c / q.shape[1]).float()
    w = min(window, seq)
    return LayerView(
        keys=keys.to(dtype),
        values=values.to(dtype),
        valid=valid,
        positions=positions,
        scaling=head_dim**-0.5,
        layer_idx=layer_idx,
        num_layers=max(layer_idx + 1, 1),
        window_queries=queries[:, :, seq - w :].to(dtype) if window > 0 else None,
        query_mean=mean.to(dtype) if stats_skip is not None else None,
        query_cov=cov.to(dtype) if stats_skip is not None else None,
        rope=(lambda p: rope_cos_sin(p, head_dim)) if stats_skip is not None else None,
        reconstruction_scores=repeated if reconstruction else None,
        output_weight=output_weight(heads, kv_heads, head_dim).t().reshape(1, kv_heads, heads // kv_heads, head_dim, -1),
        mean_budget=torch.tensor([r.length // 2 for r in rows]),
    )


def output_weight(heads: int, kv_heads: int, head_dim: int, hidden: int = 24) -> torch.Tensor:
    """A fixed random output projection ``(hidden, heads * head_dim)`` for these shapes (the same for
    a batch and for each of its rows alone), as ``o_proj.weight`` holds it."""
    generator = torch.Generator().manual_seed(1000 * heads + 10 * kv_heads + head_dim)
    return torch.randn(hidden, heads * head_dim, generator=generator) * torch.rand(1, heads * head_dim, generator=generator)


def build_for(scorer, rows: list[Row], seq: int | None = None, **kwargs) -> LayerView:
    """``build`` with what ``scorer`` declares it needs."""
    return build(
        rows,
        seq=seq,
        window=scorer.query_window,
        stats_skip=scorer.query_stats_skip if scorer.needs_query_stats else None,
        reconstruction=getattr(scorer, "reconstruction", None) is not None,
        **kwargs,
    )


@pytest.fixture
def kit() -> SimpleNamespace:
    return SimpleNamespace(
        rope_cos_sin=rope_cos_sin,
        rotate_half=rotate_half,
        apply_rope=apply_rope,
        Row=Row,
        random_row=random_row,
        output_weight=output_weight,
        build=build,
        build_for=build_for,
    )

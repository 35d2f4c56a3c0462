"""What the prefill records about queries, and the scorer's view of one layer built from it.

A forward hook on each layer's query projection (:class:`QueryCapture`) keeps the pre-RoPE queries
of the last ``window`` tokens and, for scorers that ask, the mean and covariance of all queries.
:class:`WindowRope` rotates the window once it is read, and :func:`layer_view` assembles the
:class:`~zigzag.scorers.LayerView` a scorer reads, for both a whole context and the per-head slots
that chunked prefill leaves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from zigzag.budget import BudgetAllocator
from zigzag.kernels.moments import query_moments_half
from zigzag.kernels.precision import tf32_matmuls
from zigzag.pipeline.hf import rotate_half
from zigzag.scorers import LayerView, Scorer


def query_window_needed(scorer: Scorer, allocator: BudgetAllocator) -> int:
    """Last queries (after RoPE) that the scorer and, for LMBA, the allocator read."""
    return max(scorer.query_window, allocator.window if allocator.needs_lmba else 0)


def query_stats_skip(scorer: Scorer) -> int | None:
    """Sink tokens the scorer leaves out of the query statistics, or None when it reads none."""
    return scorer.query_stats_skip if scorer.needs_query_stats else None


@dataclass
class QueryCapture:
    """Per layer: pre-RoPE queries of the last ``window`` tokens and (optionally) query statistics.

    Attributes:
        window: last tokens whose queries are kept (0: none).
        stats_skip: first real tokens of each row left out of the statistics; None: no statistics.
        heads, head_dim: the model's query heads and head size.
        valid: ``(batch, seq)`` bool of the tokens this forward pass feeds, False on padding.
        padded: False when every token of every row is real (known without a sync).
        window_queries: per layer ``(batch, heads, window, head_dim)`` float32, pre-RoPE.
        mean / cov: per layer ``(batch, heads, head_dim)`` / ``(batch, heads, head_dim, head_dim)``.
    """

    window: int
    stats_skip: int | None
    heads: int
    head_dim: int
    valid: torch.Tensor
    padded: bool = True
    window_queries: dict[int, torch.Tensor] = field(default_factory=dict)
    mean: dict[int, torch.Tensor] = field(default_factory=dict)
    cov: dict[int, torch.Tensor] = field(default_factory=dict)

    def hook(self, layer_idx: int):
        """A forward hook for layer ``layer_idx``'s query projection (output ``(batch, seq, heads * head_dim)``)."""

        def on_queries(module, args, output):
            batch, seq = output.shape[:2]
            q = output.reshape(batch, seq, self.heads, self.head_dim)
            if self.window:
                self.window_queries[layer_idx] = q[:, seq - self.window :].transpose(1, 2).float()
            if self.stats_skip is not None:
                self._statistics(layer_idx, q)

        return on_queries

    def _statistics(self, layer_idx: int, q: torch.Tensor) -> None:
        half_cuda = q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
        if half_cuda and not self.padded:
            # The tokens that count are the columns after the sinks in every row: a view, and no
            # pass that multiplies the centred queries by a 0/1 mask.
            used = q[:, self.stats_skip :] if q.shape[1] > self.stats_skip else q
            self.mean[layer_idx], self.cov[layer_idx] = query_moments_half(used)
            return
        # Skip the first `stats_skip` real tokens of each row (attention sinks), and the padding.
        rank = self.valid.long().cumsum(dim=-1) - 1
        use = (self.valid & (rank >= self.stats_skip)).float()  # (batch, seq)
        use = torch.where(use.sum(-1, keepdim=True) > 0, use, self.valid.float())  # too short: use all
        count = use.sum(-1)[:, None, None]  # (batch, 1, 1)
        if half_cuda:
            self.mean[layer_idx], self.cov[layer_idx] = query_moments_half(q, use, count)
            return
        # One float32 copy of the queries, centred and masked in place (at 32k tokens and 32 heads each
        # extra copy is 512 MB of traffic per layer), and TF32 products, as for the scores they feed.
        with tf32_matmuls():
            centered = q.to(torch.float32, copy=True)  # a copy even for float32 models: q feeds attention
            mean = torch.einsum("bs,bshd->bhd", use, centered) / count
            centered.sub_(mean[:, None]).mul_(use[:, :, None, None])
            cov = torch.einsum("bshd,bshe->bhde", centered, centered) / count[..., None]
        self.mean[layer_idx], self.cov[layer_idx] = mean, cov

    def take(self, layer_idx: int, rope: WindowRope | None) -> LayerQueries:
        """Layer ``layer_idx``'s captured queries, the window rotated by ``rope``; the capture lets go of them."""
        window = self.window_queries.pop(layer_idx, None)
        if window is not None and rope is not None:
            window = rope.rotate(window)
        return LayerQueries(window, self.mean.pop(layer_idx, None), self.cov.pop(layer_idx, None))


@dataclass(frozen=True)
class WindowRope:
    """RoPE of the window's positions, computed once per forward pass and shared by every layer.

    ``cos`` / ``sin``: ``(batch, 1, window, head_dim)`` float32.
    """

    cos: torch.Tensor
    sin: torch.Tensor

    @classmethod
    def at(cls, rope, positions: torch.Tensor) -> WindowRope:
        """``rope`` (the model's rotary embedding, positions -> cos, sin) at ``positions (batch, window)``."""
        cos, sin = rope(positions)
        return cls(cos[:, None], sin[:, None])

    def rotate(self, queries: torch.Tensor) -> torch.Tensor:
        """``(batch, heads, window, head_dim)`` pre-RoPE queries -> after RoPE."""
        return queries * self.cos + rotate_half(queries) * self.sin

    def unrotate(self, queries: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`rotate`: queries after RoPE -> before (the rotation by ``-theta``)."""
        return queries * self.cos - rotate_half(queries) * self.sin


@dataclass(frozen=True)
class LayerQueries:
    """One layer's captured queries.

    Attributes:
        window: ``(batch, heads, w, head_dim)`` float32 after RoPE, or None.
        mean / cov: pre-RoPE statistics ``(batch, heads, head_dim)`` / ``(batch, heads, head_dim, head_dim)``, or None.
    """

    window: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    cov: torch.Tensor | None = None

    def last(self, count: int) -> torch.Tensor | None:
        """The last ``count`` window queries (all of them if fewer were kept), or None for ``count == 0``."""
        if self.window is None or count == 0:
            return None
        return self.window[:, :, max(self.window.shape[2] - count, 0) :]


def fold_heads(t: torch.Tensor | None, kv_heads: int) -> torch.Tensor | None:
    """``(batch, heads, ...)`` -> ``(batch * kv_heads, heads // kv_heads, ...)``: one KV head per row."""
    if t is None:
        return None
    return t.reshape(t.shape[0] * kv_heads, t.shape[1] // kv_heads, *t.shape[2:])


@dataclass(frozen=True)
class Slots:
    """What one layer holds when it is scored: keys, values and which of them are real tokens.

    Attributes:
        keys, values: ``(batch, kv_heads, slots, head_dim)``.
        columns: ``(batch, kv_heads, slots)`` long ``input_ids`` column of each slot (-1: empty), or
            None when slot ``j`` is column ``j`` in every head (a whole context).
        valid: ``(batch, slots)`` bool, or ``(batch, kv_heads, slots)`` when each KV head holds its own
            tokens (the slots an earlier chunk left).
        padded: False when ``valid`` is known to be all True.
    """

    keys: torch.Tensor
    values: torch.Tensor
    columns: torch.Tensor | None
    valid: torch.Tensor
    padded: bool = True

    @property
    def per_head(self) -> bool:
        return self.valid.dim() == 3


def layer_view(
    scorer: Scorer,
    slots: Slots,
    queries: LayerQueries,
    positions: torch.Tensor,
    *,
    scaling: float,
    layer_idx: int,
    num_layers: int,
    rope,
    reconstruction_scores: torch.Tensor | None = None,
    output_weight: torch.Tensor | None = None,
    mean_budget: torch.Tensor | None = None,
) -> LayerView:
    """The :class:`LayerView` that ``scorer`` reads for one layer.

    Args:
        positions: ``(batch, seq)`` RoPE positions of the context columns (``slots.columns`` index it).
        rope: the model's rotary embedding (given to scorers that read query statistics).
        output_weight: the weight of the layer's output projection, ``(hidden, heads * head_dim)``.
        mean_budget: ``(batch,)`` long, tokens per KV head kept on average (:attr:`LayerView.mean_budget`).

    When every KV head holds its own slots (``slots.per_head``), each ``(row, KV head)`` becomes a row
    of its own, ``(batch * kv_heads, 1, slots, head_dim)``, with that head's query group.
    """
    window = queries.last(scorer.query_window)
    rope = rope if scorer.needs_query_stats else None
    batch, kv_heads, _, head_dim = slots.keys.shape
    per_value = None if output_weight is None else values_to_output(output_weight, kv_heads, head_dim)
    if not slots.per_head:
        return LayerView(
            slots.keys, slots.values, slots.valid, positions[:, : slots.keys.shape[2]], scaling, layer_idx, num_layers,
            window, queries.mean, queries.cov, rope, padded=slots.padded, reconstruction_scores=reconstruction_scores,
            output_weight=per_value, mean_budget=mean_budget,
        )  # fmt: skip
    rows = batch * kv_heads
    flat = positions.gather(1, slots.columns.clamp(min=0).reshape(batch, -1)).reshape(rows, -1)
    if per_value is not None:  # row b * kv_heads + g reads KV head g's projection
        per_value = per_value.expand(batch, *per_value.shape[1:]).reshape(rows, 1, *per_value.shape[2:])
    return LayerView(
        slots.keys.reshape(rows, 1, *slots.keys.shape[2:]), slots.values.reshape(rows, 1, *slots.values.shape[2:]),
        slots.valid.reshape(rows, -1), flat, scaling, layer_idx, num_layers, fold_heads(window, kv_heads),
        fold_heads(queries.mean, kv_heads), fold_heads(queries.cov, kv_heads), rope,
        output_weight=per_value, mean_budget=None if mean_budget is None else mean_budget.repeat_interleave(kv_heads),
    )  # fmt: skip


def values_to_output(weight: torch.Tensor, kv_heads: int, head_dim: int) -> torch.Tensor:
    """``(hidden, heads * head_dim)`` output-projection weight -> ``(1, kv_heads, groups, head_dim, hidden)``,
    a view: ``v @ result[0, g, j]`` is what query head ``g * groups + j`` writes for value ``v``."""
    hidden, width = weight.shape
    groups = width // (kv_heads * head_dim)
    return weight.t().view(1, kv_heads, groups, head_dim, hidden)

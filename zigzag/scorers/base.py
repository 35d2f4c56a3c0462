"""The contract every scorer keeps: one layer's cached keys and values in, a score per token out.

A scorer never sees a model. The pipeline (:mod:`zigzag.pipeline`) runs the prefill, gathers what
the scorer declares it needs (``query_window``, ``needs_query_stats``, ``reconstruction``) into a
:class:`LayerView`, and calls
:meth:`Scorer.score`. Higher scores mean *keep*. Left-padded positions are excluded by the pipeline
after scoring, so a scorer may return anything there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from zigzag.scorers.kvzip import Reconstruction

RopeFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""Maps positions ``(batch, n)`` (long) to ``(cos, sin)``, each ``(batch, n, head_dim)``, using the
model's own rotary embedding, so that ``x_rot = x * cos + rotate_half(x) * sin``."""


@dataclass
class LayerView:
    """What a scorer may read about one attention layer, right after the prefill.

    Attributes:
        keys: ``(batch, kv_heads, seq, head_dim)`` keys as cached (after RoPE).
        values: ``(batch, kv_heads, seq, head_dim)`` values as cached.
        valid: ``(batch, seq)`` bool, False on left padding.
        positions: ``(batch, seq)`` long, the RoPE position of each token (0 on padding).
        window_queries: ``(batch, heads, window, head_dim)`` queries of the last ``window`` tokens after
            RoPE, or None when no scorer asked for them. ``heads`` is a multiple of ``kv_heads``;
            query head ``h`` reads kv head ``h // (heads // kv_heads)``.
        query_mean: ``(batch, heads, head_dim)`` mean of the pre-RoPE queries over the valid tokens
            (skipping ``query_stats_skip`` first ones), or None.
        query_cov: ``(batch, heads, head_dim, head_dim)`` their covariance, or None.
        rope: the model's rotary embedding as a function of positions, or None.
        scaling: the softmax scale of the layer's attention (``head_dim ** -0.5`` for Llama).
        layer_idx: index of this layer, ``num_layers`` in all.
        padded: False when ``valid`` is known to be all True (no padding, no empty slot), so that
            window attention can skip its padding mask; True when it may hold False.
        reconstruction_scores: ``(batch, kv_heads, seq)`` float32, the largest attention each token got
            while the model repeated the context (:mod:`zigzag.pipeline.reconstruction`), or None when no
            scorer asked for them.
        output_weight: ``(batch or 1, kv_heads, groups, head_dim, hidden)``, the layer's output
            projection as it acts on values: query head ``h = g * groups + j`` adds ``v @
            output_weight[:, g, j]`` to the residual stream for value ``v`` of KV head ``g``; a view of
            the ``o_proj`` weight, or None where the caller has no model (a scorer tested on its own).
        mean_budget: ``(batch,)`` long, the tokens per KV head the compression keeps on average over
            the layers of each row, or None where unknown. A hint for scorers whose rule depends on
            the budget (CriticalKV's first stage); budgets themselves come later, from the allocator.
    """

    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor
    positions: torch.Tensor
    scaling: float
    layer_idx: int = 0
    num_layers: int = 1
    window_queries: torch.Tensor | None = None
    query_mean: torch.Tensor | None = None
    query_cov: torch.Tensor | None = None
    rope: RopeFn | None = None
    padded: bool = True
    reconstruction_scores: torch.Tensor | None = None
    output_weight: torch.Tensor | None = None
    mean_budget: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.keys.shape[0]

    @property
    def kv_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def seq(self) -> int:
        return self.keys.shape[2]


class Scorer:
    """Base of token scorers: the members the pipeline reads, with their defaults.

    Subclass it (usually as a ``@dataclass`` of hyperparameters) and implement :meth:`score`; a class
    of your own with the same members works too (:func:`check_scorer` names a missing one).

    Attributes (class or instance attributes):
        name: registry name, e.g. ``"snapkv"`` (registries are built from it).
        query_window: how many last queries (after RoPE) the scorer reads in ``LayerView.window_queries``;
            0 for none.
        needs_query_stats: whether it reads ``query_mean`` / ``query_cov`` (pre-RoPE) and ``rope``.
        query_stats_skip: leading valid tokens left out of those statistics (attention sinks).
        reconstruction: a :class:`zigzag.scorers.Reconstruction` when the scorer reads
            ``LayerView.reconstruction_scores`` (the context read a second time), else None.
    """

    name: ClassVar[str] = ""
    query_window: int = 0
    needs_query_stats: bool = False
    query_stats_skip: int = 0
    reconstruction: Reconstruction | None = None

    def score(self, layer: LayerView) -> torch.Tensor:
        """Return scores ``(batch, kv_heads, seq)``, float; higher means keep.

        The pipeline sets padding (``layer.valid`` False) to ``-inf`` afterwards, so anything may be
        returned there; NaN anywhere is an error.
        """
        raise NotImplementedError(f"scorer {type(self).__name__} does not implement score(layer)")


_SCORER_MEMBERS: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "query_window": int,
    "needs_query_stats": bool,
    "query_stats_skip": int,
}


def check_scorer(scorer: object) -> None:
    """Raise ``TypeError`` naming the first member of the :class:`Scorer` protocol that ``scorer`` lacks
    (or holds with the wrong type): ``score``, ``name``, ``query_window``, ``needs_query_stats``,
    ``query_stats_skip``. ``reconstruction`` is optional (absent means None)."""
    who = type(scorer).__name__
    if not callable(getattr(scorer, "score", None)):
        raise TypeError(f"scorer {who} has no score(layer) method (see zigzag.scorers.Scorer)")
    for member, kind in _SCORER_MEMBERS.items():
        if not hasattr(scorer, member):
            raise TypeError(f"scorer {who} has no attribute {member!r} (see zigzag.scorers.Scorer)")
        value = getattr(scorer, member)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise TypeError(f"scorer {who}.{member} must be a {kind.__name__}; got {value!r}")
    for member in ("query_window", "query_stats_skip"):
        if getattr(scorer, member) < 0:
            raise TypeError(f"scorer {who}.{member} must be >= 0; got {getattr(scorer, member)!r}")


class ScorerWrapper(Scorer):
    """Base of scorers that transform another scorer's scores (``self.inner``): the pipeline's
    needs (query window, query statistics) are the inner scorer's."""

    inner: Scorer

    @property
    def query_window(self) -> int:
        return self.inner.query_window

    @property
    def needs_query_stats(self) -> bool:
        return self.inner.needs_query_stats

    @property
    def query_stats_skip(self) -> int:
        return self.inner.query_stats_skip

    @property
    def reconstruction(self) -> Reconstruction | None:
        return getattr(self.inner, "reconstruction", None)

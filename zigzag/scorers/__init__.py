"""Token scorers: one layer's cache in, a score per token out (higher = keep).

Every scorer is a dataclass of hyperparameters that keeps the :class:`Scorer` contract of
:mod:`zigzag.scorers.base`. :func:`get_scorer` turns a name or an object into a scorer.
"""

from __future__ import annotations

from typing import Any

from zigzag.scorers._window import group_mean, window_attention
from zigzag.scorers.base import LayerView, Scorer
from zigzag.scorers.expected_attention import ExpectedAttention
from zigzag.scorers.knorm import Knorm
from zigzag.scorers.pooled import SpanPooled
from zigzag.scorers.random import RandomScorer
from zigzag.scorers.snapkv import SnapKV
from zigzag.scorers.streaming_llm import StreamingLLM
from zigzag.scorers.tova import TOVA

SCORERS: dict[str, type] = {
    "knorm": Knorm,
    "snapkv": SnapKV,
    "expected_attention": ExpectedAttention,
    "tova": TOVA,
    "streaming_llm": StreamingLLM,
    "random": RandomScorer,
}
"""Registry: name -> scorer class (built with its default hyperparameters by :func:`get_scorer`)."""


def get_scorer(spec: Any) -> Scorer:
    """Return a scorer from a registry name or an existing scorer object.

    Args:
        spec: a name from :data:`SCORERS` (case-insensitive; hyphens and underscores alike, e.g.
            ``"Expected-Attention"``), built with default hyperparameters; or any object with a
            callable ``score`` method, returned unchanged.

    Returns:
        The scorer.

    Raises:
        ValueError: unknown name (the message lists the known ones).
        TypeError: neither a string nor an object with a ``score`` method.
    """
    if isinstance(spec, str):
        key = spec.strip().lower().replace("-", "_")
        if key not in SCORERS:
            raise ValueError(f"unknown scorer {spec!r}; known scorers: {', '.join(sorted(SCORERS))}")
        return SCORERS[key]()
    if isinstance(spec, type):
        raise TypeError(
            f"scorer must be a name or a scorer instance; got the class {spec.__name__} (call it: {spec.__name__}())"
        )
    if callable(getattr(spec, "score", None)):
        return spec
    raise TypeError(
        f"scorer must be a name ({', '.join(sorted(SCORERS))}) or an object with a score(layer) method; "
        f"got {type(spec).__name__}"
    )


__all__ = [
    "SCORERS",
    "ExpectedAttention",
    "Knorm",
    "LayerView",
    "RandomScorer",
    "Scorer",
    "SnapKV",
    "SpanPooled",
    "StreamingLLM",
    "TOVA",
    "get_scorer",
    "group_mean",
    "window_attention",
]

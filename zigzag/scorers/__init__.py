"""Token scorers: one layer's cache in, a score per token out (higher = keep).

Every scorer is a dataclass of hyperparameters that keeps the :class:`Scorer` contract of
:mod:`zigzag.scorers.base`. :func:`get_scorer` turns a name or an object into a scorer.
"""

from __future__ import annotations

import re
from typing import Any

from zigzag.scorers.base import LayerView, Scorer, ScorerWrapper, check_scorer
from zigzag.scorers.chunkkv import ChunkKV
from zigzag.scorers.critical import CriticalKV, value_output_norms
from zigzag.scorers.cur import CUR
from zigzag.scorers.expected_attention import ExpectedAttention
from zigzag.scorers.h2o import H2O
from zigzag.scorers.keydiff import KeyDiff
from zigzag.scorers.knorm import Knorm
from zigzag.scorers.kvzip import KVzip, KVzipPlus, Reconstruction, with_reconstruction
from zigzag.scorers.lagkv import LagKV
from zigzag.scorers.leverage import LeverageScore, leverage_scores
from zigzag.scorers.observed import ALL_QUERIES, ObservedAttention
from zigzag.scorers.pooled import SpanPooled
from zigzag.scorers.qfilters import QFilters
from zigzag.scorers.random import RandomScorer
from zigzag.scorers.snapkv import SnapKV
from zigzag.scorers.streaming_llm import StreamingLLM
from zigzag.scorers.tova import TOVA
from zigzag.scorers.window import group_mean, window_attention, window_mass_sum
from zigzag.scorers.wrappers import HeadShared, Protected

SCORER_CLASSES: tuple[type[Scorer], ...] = (
    Knorm, SnapKV, ExpectedAttention, TOVA, StreamingLLM, RandomScorer, KVzip, KVzipPlus, ObservedAttention, H2O,
    KeyDiff, LagKV, LeverageScore, CUR, QFilters,
)
"""Every scorer class zigzag ships (wrappers aside); a new one is one file and one entry here."""

SCORERS: dict[str, type[Scorer]] = {cls.name: cls for cls in SCORER_CLASSES}
"""Registry: name -> scorer class (built with its default hyperparameters by :func:`get_scorer`)."""

WRAPPER_SUFFIXES = {
    "pool<k>": "SpanPooled(inner, k): mean of the scores over k neighbours (k odd)",
    "maxpool<k>": "SpanPooled(inner, k, mode='max'): best score within k // 2 tokens",
    "shared": "HeadShared(inner): every KV head keeps the same tokens (mean of rank-normalized scores)",
    "sharedmax": "HeadShared(inner, reduce='max'): the same, with the best rank over the heads",
    "first<n>": "Protected(inner, first=n): the first n tokens are always kept",
    "last<n>": "Protected(inner, first=0, last=n): the last n tokens are always kept",
    "chunk<k>": "ChunkKV(inner, k): whole chunks of k tokens, ranked by the inner scorer's mean over the chunk",
    "critical": "CriticalKV(inner): two-stage selection, attention times the L1 norm of the projected value",
}
"""Suffixes :func:`get_scorer` understands after a registry name, applied left to right (each wraps
the scorer built so far): ``"expected_attention+pool5+shared+first64+last32"``."""

_SUFFIX = re.compile(r"^(maxpool|pool|first|last|chunk)([0-9]+)$|^(shared|sharedmax|critical)$")


def _wrap(scorer: Any, suffix: str, spec: str) -> Any:
    match = _SUFFIX.match(suffix)
    if match is None:
        raise ValueError(
            f"unknown suffix {suffix!r} in scorer {spec!r}; known suffixes: "
            + ", ".join(f"+{k}" for k in WRAPPER_SUFFIXES)
        )
    kind, number, flag = match.groups()
    if flag == "critical":
        return CriticalKV(scorer)
    if flag:
        return HeadShared(scorer, reduce="mean" if flag == "shared" else "max")
    n = int(number)
    if kind == "chunk":
        return ChunkKV(scorer, n)
    if kind in ("pool", "maxpool"):
        return SpanPooled(scorer, n, mode="max" if kind == "maxpool" else "mean")
    return Protected(scorer, first=n) if kind == "first" else Protected(scorer, first=0, last=n)


def get_scorer(spec: Any) -> Scorer:
    """Return a scorer from a registry name or an existing scorer object.

    Args:
        spec: a name from :data:`SCORERS` (case-insensitive; hyphens and underscores alike, e.g.
            ``"Expected-Attention"``), built with default hyperparameters, optionally followed by
            wrapper suffixes (:data:`WRAPPER_SUFFIXES`, e.g. ``"expected_attention+pool5+first64"``);
            or a scorer object with the members of :class:`Scorer` (checked by :func:`check_scorer`),
            returned unchanged.

    Returns:
        The scorer.

    Raises:
        ValueError: unknown name or suffix (the message lists the known ones).
        TypeError: neither a string nor a scorer object, or a scorer that lacks a member of the
            protocol (the message names it).
    """
    if isinstance(spec, str):
        key, *suffixes = spec.strip().lower().replace("-", "_").split("+")
        if key not in SCORERS:
            raise ValueError(f"unknown scorer {spec!r}; known scorers: {', '.join(sorted(SCORERS))}")
        if getattr(SCORERS[key], "calibrated", False):
            raise ValueError(
                f"scorer {key!r} is calibrated once per model: build it from its file, e.g. "
                f"{SCORERS[key].__name__}.from_file(path) (written by `python -m zigzag.calibrate {key}`)"
            )
        scorer = SCORERS[key]()
        for suffix in suffixes:
            scorer = _wrap(scorer, suffix.strip(), spec)
        return scorer
    if isinstance(spec, type):
        raise TypeError(
            f"scorer must be a name or a scorer instance; got the class {spec.__name__} (call it: {spec.__name__}())"
        )
    if not callable(getattr(spec, "score", None)):
        raise TypeError(
            f"scorer must be a name ({', '.join(sorted(SCORERS))}) or a scorer object (see zigzag.scorers.Scorer); "
            f"got {type(spec).__name__}"
        )
    check_scorer(spec)
    return spec


__all__ = [
    "ALL_QUERIES",
    "CUR",
    "H2O",
    "SCORERS",
    "SCORER_CLASSES",
    "TOVA",
    "WRAPPER_SUFFIXES",
    "ChunkKV",
    "CriticalKV",
    "ExpectedAttention",
    "HeadShared",
    "KVzip",
    "KVzipPlus",
    "KeyDiff",
    "Knorm",
    "LagKV",
    "LayerView",
    "LeverageScore",
    "ObservedAttention",
    "Protected",
    "QFilters",
    "RandomScorer",
    "Reconstruction",
    "Scorer",
    "ScorerWrapper",
    "SnapKV",
    "SpanPooled",
    "StreamingLLM",
    "check_scorer",
    "get_scorer",
    "group_mean",
    "leverage_scores",
    "value_output_norms",
    "window_attention",
    "window_mass_sum",
    "with_reconstruction",
]

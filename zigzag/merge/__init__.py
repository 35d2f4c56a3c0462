"""Merge-on-evict: fold evicted tokens into the most similar survivor instead of dropping them.

:class:`CosineMerge` is the method (a dataclass of hyperparameters with a ``merge`` method);
:func:`merge_reference` is the plain float64 definition and :func:`merge_chunked` the blocked,
memory-bounded PyTorch path. On CUDA with ``triton`` installed, the similarity search runs as a fused
kernel (:mod:`zigzag.merge.triton` around :mod:`zigzag.kernels.merge_triton`, imported only when used;
the ``"merge"`` switch of :mod:`zigzag.kernels` chooses). Besides torch, only :mod:`zigzag.kernels` is
imported (the arrow goes one way: kernels never import merge).
"""

from __future__ import annotations

from typing import Any

from zigzag.merge.base import MergeResult
from zigzag.merge.chunked import merge_chunked
from zigzag.merge.cosine import CosineMerge
from zigzag.merge.reference import merge_reference

MERGE_CLASSES: tuple[type, ...] = (CosineMerge,)
"""Every merge class zigzag ships; a new one is one file and one entry here."""

MERGES: dict[str, type] = {cls.name: cls for cls in MERGE_CLASSES}
"""Registry: name -> merge class (built with its default hyperparameters by :func:`get_merge`)."""


def get_merge(spec: Any) -> CosineMerge | None:
    """Return a merge from a registry name or an existing merge object, or None for no merging.

    Args:
        spec: ``None``, ``False`` or ``"none"`` (no merging); a name from :data:`MERGES`
            (case-insensitive), built with default hyperparameters; or any object with a callable
            ``merge`` method, returned unchanged.

    Returns:
        The merge, or None.

    Raises:
        ValueError: unknown name (the message lists the known ones).
        TypeError: anything else (including ``True`` and a merge *class*).
    """
    if spec is None or spec is False:
        return None
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key == "none":
            return None
        if key not in MERGES:
            raise ValueError(f"unknown merge {spec!r}; known merges: none, {', '.join(sorted(MERGES))}")
        return MERGES[key]()
    if isinstance(spec, type):
        raise TypeError(
            f"merge must be a name or a merge instance; got the class {spec.__name__} (call it: {spec.__name__}())"
        )
    if callable(getattr(spec, "merge", None)):
        return spec
    raise TypeError(
        f"merge must be None, 'none', a name ({', '.join(sorted(MERGES))}) or an object with a "
        f"merge(keys, values, kept, valid) method; got {type(spec).__name__}"
    )


__all__ = ["MERGES", "MERGE_CLASSES", "CosineMerge", "MergeResult", "get_merge", "merge_chunked", "merge_reference"]

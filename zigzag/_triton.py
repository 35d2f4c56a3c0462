"""Whether Triton can be imported here (checked once): the CUDA kernels' common precondition."""

from __future__ import annotations

import functools
import importlib.util


@functools.cache
def triton_importable() -> bool:
    """True when the ``triton`` package is installed; imported only by the kernels that use it."""
    return importlib.util.find_spec("triton") is not None

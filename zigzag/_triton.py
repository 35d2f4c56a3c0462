"""Whether Triton can be imported here (checked once), and whether its kernels can run on a device:
the CUDA kernels' common preconditions."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.cache
def triton_importable() -> bool:
    """True when the ``triton`` package is installed; imported only by the kernels that use it."""
    return importlib.util.find_spec("triton") is not None


def triton_runs_on(device: torch.device) -> bool:
    """Whether Triton kernels can run on ``device``: CUDA with ``triton`` importable, or any device
    under Triton's interpreter (``TRITON_INTERPRET=1``, the CPU tests)."""
    if not triton_importable():
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"

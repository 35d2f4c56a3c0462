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


KERNEL_BACKENDS = ("auto", "torch", "triton")


class KernelSwitch:
    """Which path a computation with an optional Triton kernel takes: ``"auto"`` (the kernel for CUDA
    tensors it supports when ``triton`` imports, else PyTorch), ``"torch"`` (the PyTorch reference
    always; for A/B timings) or ``"triton"`` (the kernel always: CUDA, or CPU tensors under
    ``TRITON_INTERPRET=1``; its launcher rejects what it cannot take).

    Args:
        what: the computation's name, for messages.
        env: environment variable holding the initial choice (read once, here; checked on first use).
    """

    def __init__(self, what: str, env: str):
        self.what, self.env = what, env
        self.name = os.environ.get(env, "auto")

    def set(self, name: str) -> None:
        if name not in KERNEL_BACKENDS:
            raise ValueError(f"unknown {self.what} backend {name!r}; known: {', '.join(KERNEL_BACKENDS)}")
        self.name = name

    def use_kernel(self, device: torch.device, supported: bool) -> bool:
        """Whether the kernel runs for tensors on ``device``; ``supported``: it takes these inputs
        (consulted by ``"auto"`` only)."""
        if self.name not in KERNEL_BACKENDS:  # from the environment
            raise ValueError(f"{self.env} must be one of {', '.join(KERNEL_BACKENDS)}; got {self.name!r}")
        if self.name == "torch":
            return False
        available = triton_runs_on(device)
        if self.name == "triton":
            if not available:
                raise RuntimeError(
                    f"the 'triton' {self.what} backend needs CUDA tensors (or TRITON_INTERPRET=1) and an "
                    f"importable triton; got {device} tensors, triton importable: {triton_importable()}"
                )
            return True
        return available and device.type == "cuda" and supported

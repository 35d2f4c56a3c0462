"""The one backend switch: for each computation with an optional Triton kernel, the kernel or its
PyTorch reference.

Every switch lives in :data:`SWITCHES`, keyed by the kernel's name, and starts from its environment
variable (``ZIGZAG_<KERNEL>_BACKEND``, read once at import, checked on first use). Choose in code
with :func:`set_backend` or, for a block, :func:`using`. The kernels and their references are listed
in :mod:`zigzag.kernels`.

Nothing here imports triton: :func:`triton_importable` only looks for it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Iterator

import torch


# Memo: asked on every dispatch; find_spec walks sys.path until triton is imported (53 us here, 0.05 cached).
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
"""``"auto"``: the kernel for CUDA tensors it supports when ``triton`` imports, else PyTorch;
``"torch"``: the PyTorch reference always (A/B timings); ``"triton"``: the kernel always (CUDA, or CPU
tensors under ``TRITON_INTERPRET=1``)."""


class KernelSwitch:
    """Which path one computation with an optional Triton kernel takes (one of :data:`KERNEL_BACKENDS`).

    Args:
        kernel: the kernel's name in :data:`SWITCHES` (and in messages).
        env: environment variable holding the initial choice (read once, here; checked on first use).
        aliases: other names accepted for a backend (``{"segment": "torch"}`` for varlen attention,
            whose PyTorch reference was called so).
    """

    def __init__(self, kernel: str, env: str, aliases: dict[str, str] | None = None):
        self.kernel, self.env = kernel, env
        self.aliases = dict(aliases or {})
        raw = os.environ.get(env, "auto")
        self.name = self.aliases.get(raw, raw)  # an unknown value raises on first use, naming env

    def set(self, name: str) -> None:
        """Choose ``name`` (one of :data:`KERNEL_BACKENDS` or an alias)."""
        name = self.aliases.get(name, name)
        if name not in KERNEL_BACKENDS:
            known = ", ".join((*KERNEL_BACKENDS, *self.aliases))
            raise ValueError(f"unknown {self.kernel} backend {name!r}; known: {known}")
        self.name = name

    def use_kernel(self, device: torch.device, supported: bool) -> bool:
        """Whether the kernel runs for tensors on ``device``; ``supported``: it takes these inputs
        (consulted by ``"auto"`` only)."""
        name = self.name
        if name == "torch":
            return False
        if name not in KERNEL_BACKENDS:  # from the environment
            raise ValueError(f"{self.env} must be one of {', '.join((*KERNEL_BACKENDS, *self.aliases))}; got {name!r}")
        available = triton_runs_on(device)
        if name == "triton":
            if not available:
                raise RuntimeError(
                    f"the 'triton' {self.kernel} backend needs CUDA tensors (or TRITON_INTERPRET=1) and an "
                    f"importable triton; got {device} tensors, triton importable: {triton_importable()}"
                )
            return True
        return available and device.type == "cuda" and supported


SWITCHES: dict[str, KernelSwitch] = {
    switch.kernel: switch
    for switch in (
        KernelSwitch("ea", "ZIGZAG_EA_BACKEND"),
        KernelSwitch("mass", "ZIGZAG_MASS_BACKEND"),
        KernelSwitch("moments", "ZIGZAG_MOMENTS_BACKEND"),
        KernelSwitch("gather", "ZIGZAG_GATHER_BACKEND"),
        KernelSwitch("merge", "ZIGZAG_MERGE_BACKEND"),
        KernelSwitch("varlen", "ZIGZAG_VARLEN_BACKEND", aliases={"segment": "torch"}),
    )
}
"""Kernel name -> its switch (the kernels are described in :mod:`zigzag.kernels`)."""


def kernel_switch(kernel: str) -> KernelSwitch:
    """The switch of ``kernel`` (a key of :data:`SWITCHES`)."""
    found = SWITCHES.get(kernel)
    if found is None:
        raise ValueError(f"unknown kernel {kernel!r}; known: {', '.join(SWITCHES)}")
    return found


def set_backend(kernel: str, name: str) -> None:
    """Choose how ``kernel`` runs: ``"auto"``, ``"torch"`` or ``"triton"`` (see :data:`KERNEL_BACKENDS`)."""
    kernel_switch(kernel).set(name)


def get_backend(kernel: str) -> str:
    """The choice for ``kernel`` as set (``"auto"`` unresolved)."""
    return kernel_switch(kernel).name


@contextlib.contextmanager
def using(kernel: str, name: str) -> Iterator[None]:
    """:func:`set_backend` for the block, the previous choice restored after (tests, benchmarks)."""
    chosen = kernel_switch(kernel)
    previous = chosen.name
    chosen.set(name)
    try:
        yield
    finally:
        chosen.name = previous


__all__ = [
    "KERNEL_BACKENDS",
    "SWITCHES",
    "KernelSwitch",
    "get_backend",
    "kernel_switch",
    "set_backend",
    "triton_importable",
    "triton_runs_on",
    "using",
]

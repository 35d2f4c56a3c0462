"""The float32 matmul precision that scores share: TF32 on CUDA tensor cores while scoring.

Scorers and the kernels that mirror their matmuls read the setting through the same API that sets it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def tf32_matmuls() -> Iterator[None]:
    """float32 matmuls on CUDA tensor cores (TF32) inside the block, restored after.

    Scores only rank tokens: TF32's 10-bit mantissa does not change a ranking that float32 noise
    would not, and the scorers' float32 products (ExpectedAttention's quadratic forms, window
    attention) run several times faster. CPU results are unaffected.
    """
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):  # older torch
        previous, matmul.allow_tf32 = matmul.allow_tf32, True
        try:
            yield
        finally:
            matmul.allow_tf32 = previous
        return
    previous, matmul.fp32_precision = matmul.fp32_precision, "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision = previous


def tf32_matmuls_enabled() -> bool:
    """Whether PyTorch runs float32 CUDA matmuls in TF32 now (inside :func:`tf32_matmuls`, say), read
    through the same API that :func:`tf32_matmuls` sets, so kernels can match the matmuls' precision."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # reading allow_tf32 after the new API set it raises
        return matmul.fp32_precision == "tf32"  # "none" reads as the global setting it inherits
    return bool(matmul.allow_tf32)

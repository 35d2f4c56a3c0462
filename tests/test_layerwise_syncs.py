"""The layer-by-layer prefill waits for the GPU a fixed number of times, however many layers the model has.

A host read (``.item()``, ``.cpu()``, ``bool(tensor)``) or a blocking host-to-device copy inside a layer
hook makes the host wait for the GPU once per layer, so that it can no longer run ahead and queue the
next layers' work (host-bound at small sizes, and worse with many processes on one GPU). Counted with
PyTorch's sync debug mode, which warns at every synchronizing CUDA call. Skipped without CUDA.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.conftest import tiny_llama
from zigzag import compress_cache

pytestmark = pytest.mark.gpu


def _syncs(model, ids: torch.Tensor, **kwargs) -> int:
    """Synchronizing CUDA calls made by one ``compress_cache(model, ids, **kwargs)``."""
    compress_cache(model, ids, **kwargs)  # kernels compiled, pinned memory and streams made
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # one warning per call, not one per source line
        torch.cuda.set_sync_debug_mode("warn")
        try:
            compress_cache(model, ids, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.parametrize("scorer", ["knorm", "snapkv", "expected_attention+pool25"])
@pytest.mark.parametrize("budget", ["uniform", "zigzag"])
def test_cuda_syncs_per_compression_do_not_grow_with_layers(scorer, budget):
    ids = torch.randint(0, 128, (1, 1500), device="cuda")
    counts = [
        _syncs(tiny_llama("sdpa", layers=layers).to("cuda", torch.bfloat16), ids, ratio=0.5, scorer=scorer, budget=budget)
        for layers in (2, 6)
    ]
    assert counts[0] == counts[1], f"{counts[0]} syncs with 2 layers, {counts[1]} with 6: some layer waits for the GPU"

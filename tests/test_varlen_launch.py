"""A masked varlen decoding step keeps the direct kernel launch (zigzag.kernels.varlen_triton.launch).

The model's mask reaches the kernel as a view one column into it (the appended tokens' part), so its
pointer is never 16-byte aligned. The direct launch used to refuse any misaligned pointer, which sent
every layer of every masked decoding step through ``JITFunction.run`` (11-27 us more per launch on
H100s). Runs on the CPU with stand-ins for CUDA and for the compiled kernel, as
tests/test_varlen_kernel.py's direct-launch test does.
"""

from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("triton")

from transformers.integrations.sdpa_attention import sdpa_attention_forward

from zigzag import kernels
from zigzag.cache.varlen import VarlenLayer
from zigzag.kernels import varlen_triton as vk


class CudaLike(torch.Tensor):
    """A tensor that says it is on CUDA, and nothing else."""

    __torch_function__ = torch._C._disabled_torch_function_impl
    is_cuda = True


class Compiled:
    """Stands in for Triton's compiled kernel: records the direct launches."""

    function, packed_metadata = "function", "metadata"

    def __init__(self, direct: list):
        self.direct = direct

    def run(self, *args):
        self.direct.append(args)


def _step_launch(monkeypatch, masked: bool) -> tuple:
    """The launch arguments ``(grid, tensors, integers, scale, flags)`` of one decoding step of a
    varlen layer (batch 2, skewed heads) under transformers' SDPA attention, with or without a bool mask."""
    captured = []
    monkeypatch.setattr(vk, "_launch_on", lambda where, *args: captured.append(args))
    gen = torch.Generator().manual_seed(0)
    batch, kv_heads, d, n = 2, 8, 16, 40
    lengths = torch.full((batch, kv_heads), n)
    lengths[:, 0], lengths[:, 1] = n // 2, n + n // 2
    total = int(lengths.sum())
    flat = torch.randn(total, d, generator=gen)
    layer = VarlenLayer(flat, flat, torch.arange(total) % n, lengths, n)
    module = types.SimpleNamespace(num_key_value_groups=4, is_causal=True, training=False)
    query = torch.randn(batch, 1, 4 * kv_heads, d, generator=gen).transpose(1, 2)
    with kernels.using("varlen", "triton"):
        for _ in range(2):  # the second step: a tail of two tokens
            keys, values = layer.update(torch.randn(batch, kv_heads, 1, d), torch.randn(batch, kv_heads, 1, d))
            mask = torch.ones(batch, 1, 1, 1 + layer.appended, dtype=torch.bool) if masked else None
            sdpa_attention_forward(module, query, keys, values, mask, scaling=d**-0.5)
    return captured[-1]


def _launch_twice(monkeypatch, launch_args: tuple) -> tuple[int, int]:
    """Launch ``launch_args`` twice as on CUDA; returns (launches through Triton, direct launches)."""
    grid, tensors, integers, scale, flags = launch_args
    through, direct = [], []
    monkeypatch.setattr(vk, "direct_launch", True)
    monkeypatch.setattr(vk, "_compiled", {})
    monkeypatch.setattr(vk, "launch_through_triton", lambda *args: through.append(args) or Compiled(direct))
    monkeypatch.setattr(vk, "_current_device", lambda: 0)
    monkeypatch.setattr(vk, "_current_stream", lambda index: 1000)
    monkeypatch.setattr(vk, "_launch_hooks_set", lambda: False)
    tensors = (tensors[0].as_subclass(CudaLike), *tensors[1:])
    for _ in range(2):
        vk.launch(grid, tensors, integers, scale, flags)
    return len(through), len(direct)


def test_a_masked_decoding_step_launches_directly_from_its_second_launch(monkeypatch):
    real_launch_on = vk._launch_on
    launch_args = _step_launch(monkeypatch, masked=True)
    monkeypatch.setattr(vk, "_launch_on", real_launch_on)
    _grid, tensors, _integers, _scale, flags = launch_args
    mask = tensors[7]
    assert flags[2] and flags[3]  # HAS_MASK, MASK_BOOL: the model's mask reached the kernel
    assert mask.data_ptr() % 16 == 1  # a bool view one column into an aligned allocation
    assert _launch_twice(monkeypatch, launch_args) == (1, 1)  # was (2, 0): every launch through Triton


def test_aligned_and_misaligned_pointers_keep_separate_kernels(monkeypatch):
    real_launch_on = vk._launch_on
    unmasked = _step_launch(monkeypatch, masked=False)
    monkeypatch.setattr(vk, "_launch_on", real_launch_on)
    _grid, tensors, integers, _scale, flags = unmasked
    aligned = tuple(t.data_ptr() for t in tensors)
    assert vk._alignment(aligned) is True
    shifted = (aligned[0] + 4, *aligned[1:])  # the query 4 bytes off: Triton would compile another kernel
    assert vk._alignment(shifted) == (False,) + (True,) * (len(aligned) - 1)
    assert vk._launch_key(aligned, tensors, integers, flags) != vk._launch_key(shifted, tensors, integers, flags)
    assert vk._launch_key(aligned, tensors, (*integers[:-1], 2**31), flags) is None  # beyond int32: through Triton

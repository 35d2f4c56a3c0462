"""What zigzag needs to know about a Hugging Face decoder.

Kept in one place so that every module that runs the model (the prefill, the
layer-by-layer compressor, context reconstruction) reads the same few facts from one place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack (the module holding ``layers`` and ``rotary_emb``) of a causal LM or of itself."""
    return model.model if hasattr(model, "model") and hasattr(model.model, "layers") else model


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(..., head_dim)`` -> the same with halves swapped and the first negated (RoPE's rotation)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_fn(model: nn.Module, like: torch.Tensor):
    """The model's rotary embedding as a function ``positions (batch, n) -> (cos, sin)``, each
    ``(batch, n, head_dim)`` float32, so that ``x_rot = x * cos + rotate_half(x) * sin``."""
    rotary = decoder_of(model).rotary_emb

    def rope(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = rotary(like, positions.to(like.device))
        return cos.float(), sin.float()

    return rope


def query_projection(attention: nn.Module) -> nn.Module:
    """The module whose output is the layer's pre-RoPE queries, ``(batch, seq, heads * head_dim)``."""
    # Qwen3 normalises queries per head after the projection and before RoPE.
    return attention.q_norm if hasattr(attention, "q_norm") else attention.q_proj


@contextlib.contextmanager
def forward_hooks(modules_and_hooks) -> Iterator[None]:
    """Forward hooks on ``(module, hook)`` pairs inside the block, always removed after it."""
    handles = []
    try:
        for module, hook in modules_and_hooks:
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()

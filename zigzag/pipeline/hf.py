"""What zigzag needs to know about a Hugging Face decoder.

Kept in one place so that every module that runs the model (the prefill, the
layer-by-layer compressor, context reconstruction) reads the same few facts from one place.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator

import torch
from torch import nn


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack (the module holding ``layers`` and ``rotary_emb``) of a causal LM or of itself."""
    return model.model if hasattr(model, "model") and hasattr(model.model, "layers") else model


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Each decoder layer's attention module, in layer order."""
    return [layer.self_attn for layer in decoder_of(model).layers]


def query_shape(config) -> tuple[int, int, int]:
    """``(heads, kv_heads, head_dim)`` of a decoder's attention, from its config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, head_dim


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


def output_projection(attention: nn.Module) -> nn.Module:
    """The linear map from the concatenated head outputs ``(..., heads * head_dim)`` to the hidden size."""
    return attention.o_proj


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


SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ATTENTION = ("sdpa", "eager")


class UnsupportedModelError(ValueError, NotImplementedError):
    """The model's architecture or attention implementation is not one zigzag can compress exactly."""


def check_model(model: nn.Module) -> None:
    """Raise unless zigzag can compress ``model`` exactly.

    Raises:
        TypeError: ``model`` is not a Hugging Face causal LM at all.
        UnsupportedModelError: a causal LM whose architecture (``model_type``), sliding-window layers or
            attention implementation zigzag does not support.
    """
    config = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or config is None:
        raise TypeError(f"model must be a Hugging Face causal LM (e.g. LlamaForCausalLM); got {type(model).__name__}")
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} ({type(model).__name__}) is not supported; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}. Adding one means checking that its attention applies standard "
            "RoPE to the q_proj outputs and reads the cache through DynamicCache layers (zigzag/pipeline/hf.py)."
        )
    if not hasattr(decoder_of(model), "layers"):
        raise TypeError(f"model must be a Hugging Face causal LM with a decoder stack; got {type(model).__name__}")
    layer_types = getattr(config, "layer_types", None) or []
    sliding = [i for i, t in enumerate(layer_types) if t != "full_attention"]
    uses_window = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
    if sliding or (uses_window and model_type == "mistral"):
        raise UnsupportedModelError(
            f"{type(model).__name__} has sliding-window (or other non-full) attention layers "
            f"{sliding or 'all'}; zigzag compresses full-attention layers only"
        )
    attn = config._attn_implementation
    if attn not in SUPPORTED_ATTENTION:
        raise UnsupportedModelError(
            f"attention implementation {attn!r} is not supported; use one of {SUPPORTED_ATTENTION} "
            "(model.set_attn_implementation('sdpa'))"
        )


def cache_argument(model: nn.Module) -> str:
    """The keyword under which this transformers version's ``model.forward`` takes the cache.

    transformers renamed ``past_key_values`` to ``cache`` (the old name warns from about 5.2x and goes
    in 5.40); zigzag passes the name the installed version declares, so its own calls never warn.
    """
    return _forward_cache_argument(type(model))


@functools.cache
def _forward_cache_argument(model_class: type) -> str:
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def run_model(model: nn.Module, cache, **inputs) -> None:
    """``model(**inputs)`` with ``cache`` passed under the name the installed transformers expects."""
    model(**inputs, **cache_kwarg(model, cache))


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside the block (no dropout while the cache is built); every module's
    ``training`` flag is as it was after."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def cache_kwarg(model: nn.Module, cache) -> dict[str, object]:
    """``{name: cache}`` with the keyword the installed transformers expects for ``model`` (``cache``, or
    ``past_key_values`` before the rename): ``model.generate(**inputs, **cache_kwarg(model, cache))``
    works on either side of it, and so does ``model(...)``."""
    return {cache_argument(model): cache}

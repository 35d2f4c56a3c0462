"""Shared fixtures: tiny random-weight models for shape tests, the real SmolLM2 for correctness."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels (zigzag.kernels.varlen_triton) then run in Triton's interpreter on CPU tensors, so their
    # math is tested here too; the flag is read when a kernel is defined, hence before any import.
    os.environ.setdefault("TRITON_INTERPRET", "1")
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(attn: str = "sdpa", layers: int = 3, seed: int = 0) -> LlamaForCausalLM:
    """A random-weight Llama with GQA (4 query heads, 2 KV heads), float32, eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    model = LlamaForCausalLM(config).eval()
    model.set_attn_implementation(attn)
    return model


def continuation_logits(model, ctx: dict, cache, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of ``new_tokens`` random tokens appended after ``ctx`` through the compressed ``cache``,
    and through the masked float64 reference (the full prefill of ``ctx`` with every position evicted
    from ``cache`` masked per layer and KV head): ``(ours, reference)``, each ``(batch, new, vocab)``."""
    from tests.reference import keep_masks, masked_reference
    from zigzag import cache_kwarg, prefill_context

    mask = ctx["attention_mask"]
    batch, seq = mask.shape
    full = prefill_context(model, ctx, window=0, query_stats_skip=None).cache
    new = torch.randint(0, model.config.vocab_size, (batch, new_tokens))
    full_mask = torch.cat([mask, torch.ones(batch, new_tokens, dtype=torch.long)], dim=-1)
    kwargs = {"input_ids": new, "attention_mask": full_mask, "position_ids": (full_mask.cumsum(-1) - 1)[:, -new_tokens:]}
    with torch.no_grad():
        ours = model(**cache_kwarg(model, cache), **kwargs).logits
        with masked_reference(model, keep_masks(cache.kept_positions, seq)):
            reference = model(**cache_kwarg(model, full), **kwargs).logits
    return ours, reference


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct, float32, SDPA, with its tokenizer (converted once, then cached)."""
    from zigzag.testing.models import load_smollm2

    return load_smollm2(dtype=torch.float32, attn_implementation="sdpa")


def pytest_collection_modifyitems(config, items):
    # Every test that loads the real SmolLM2 through the fixture is slow (the quick subset,
    # `-m "not slow"`, leaves them out); tests that load it otherwise carry @pytest.mark.slow themselves.
    for item in items:
        if "smollm2" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)

"""Compressed caches of random keys and values with chosen per-head budgets, for benchmarks and tests."""

from __future__ import annotations

import torch

from zigzag.cache import CompressedLayer, VarlenLayer, ZigZagCache


def random_cache(
    batch: int,
    kv_heads: int,
    head_dim: int,
    budgets: torch.Tensor,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cuda",
    layout: str = "auto",
    original_length: int | None = None,
    seed: int = 0,
) -> ZigZagCache:
    """A compressed cache of random keys and values with given per-head budgets, for benchmarks.

    Args:
        batch, kv_heads, head_dim: the cache's shape (Llama-3.1-8B: ``kv_heads=8, head_dim=128``).
        budgets: ``(batch, num_layers, kv_heads)`` long, tokens kept by each row, layer and KV head.
        dtype, device: of the keys and values.
        layout: ``"varlen"`` (every layer a :class:`~zigzag.cache.varlen.VarlenLayer`: memory = the sum of the
            budgets), ``"dense"`` (every layer a :class:`~zigzag.cache.CompressedLayer` ``(batch, kv_heads, widest,
            head_dim)``, shorter heads padded with masked empty slots), or ``"auto"`` (what
            :func:`zigzag.pipeline.select.build_layer` would choose: varlen for a layer whose heads differ in some row).
        original_length: the uncompressed context length (positions continue from it); default: the
            largest budget. Slot ``j`` of a head that keeps ``n`` tokens holds position
            ``original_length - n + j`` (its last ``n`` tokens).
        seed: random seed of the keys and values.

    Returns:
        A :class:`~zigzag.cache.ZigZagCache` with ``num_layers`` layers; ``cache.budgets`` is ``(batch, num_layers)``,
        the mean budget per head (floored). Continue with ``model(input_ids=..., attention_mask=ones(batch,
        original_length + new), position_ids=..., past_key_values=cache)`` or ``model.generate``.
    """
    if layout not in ("auto", "varlen", "dense"):
        raise ValueError(f"layout must be 'auto', 'varlen' or 'dense'; got {layout!r}")
    budgets = torch.as_tensor(budgets, dtype=torch.long).cpu()
    if budgets.dim() != 3 or budgets.shape[0] != batch or budgets.shape[2] != kv_heads:
        raise ValueError(f"budgets must be (batch={batch}, num_layers, kv_heads={kv_heads}); got {tuple(budgets.shape)}")
    if bool((budgets < 0).any()):
        raise ValueError("budgets must be non-negative")
    length = int(budgets.max()) if original_length is None else int(original_length)
    if length < int(budgets.max()):
        raise ValueError(f"original_length {length} is below the largest budget {int(budgets.max())}")
    gen = torch.Generator(device=device).manual_seed(seed)
    layers = []
    for layer in range(budgets.shape[1]):
        lengths = budgets[:, layer].to(device)  # (batch, kv_heads)
        counts = budgets[:, layer]
        varlen = layout == "varlen" or (layout == "auto" and kv_heads > 1 and bool((counts != counts[:, :1]).any()))
        if varlen:
            total = int(counts.sum())
            keys = torch.randn(total, head_dim, generator=gen, device=device, dtype=dtype)
            values = torch.randn(total, head_dim, generator=gen, device=device, dtype=dtype)
            flat = lengths.flatten()
            seg = torch.repeat_interleave(torch.arange(flat.numel(), device=device), flat, output_size=total)
            start = torch.cumsum(flat, 0) - flat
            positions = length - flat[seg] + torch.arange(total, device=device) - start[seg]
            layers.append(VarlenLayer(keys, values, positions, lengths, length))
        else:
            width = int(counts.max())
            column = torch.arange(width, device=device)
            used = column >= (width - lengths)[..., None]  # (batch, kv_heads, width): empty slots first
            kept = torch.where(used, length - width + column, -1)
            keys = torch.randn(batch, kv_heads, width, head_dim, generator=gen, device=device, dtype=dtype)
            values = torch.randn(batch, kv_heads, width, head_dim, generator=gen, device=device, dtype=dtype)
            zero = used[..., None].to(dtype)
            layers.append(CompressedLayer(keys * zero, values * zero, kept, original_length=length))
    return ZigZagCache(layers, budgets=budgets.sum(-1) // kv_heads)


__all__ = ["random_cache"]

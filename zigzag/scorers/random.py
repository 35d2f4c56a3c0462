"""Random scores: the floor every scorer should beat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from zigzag.scorers.base import LayerView, Scorer

_BLOCK = 1024  # positions drawn per generator; see RandomScorer


@dataclass
class RandomScorer(Scorer):
    """Uniform random scores in ``[0, 1)``, reproducible.

    Paper: none; a baseline (kvpress ``RandomPress``).

    The score of a token depends only on ``(seed, layer_idx, kv head, RoPE position)``: positions
    are cut into blocks of 1024 and each block is drawn from its own CPU ``torch.Generator`` seeded
    from ``(seed, layer_idx, block)``, then moved to the keys' device. So a call is reproducible, a
    row's scores do not depend on the other rows, on left padding, or on the batch size, and layers
    and kv heads draw independently. Rows whose tokens sit at the same positions get the same scores.

    Parameters
    ----------
    seed:
        Base seed. ``None`` draws a fresh seed at every call (not reproducible).
    """

    seed: int | None = 0

    name: ClassVar[str] = "random"
    query_window: ClassVar[int] = 0
    needs_query_stats: ClassVar[bool] = False
    query_stats_skip: ClassVar[int] = 0

    def __post_init__(self) -> None:
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int or None; got {self.seed!r}")

    def score(self, layer: LayerView) -> torch.Tensor:
        """Return random scores.

        Args:
            layer: the layer; reads ``positions: (batch, seq)``, ``valid: (batch, seq)``,
                ``layer_idx`` and the shape and device of ``keys``.

        Returns:
            ``(batch, kv_heads, seq)`` float32 in ``[0, 1)``; higher means keep.
        """
        seed = self.seed if self.seed is not None else torch.Generator().seed()  # leaves the global RNG alone
        kv_heads = layer.kv_heads
        positions = layer.positions.to(torch.long).cpu().masked_fill(~layer.valid.cpu().bool(), 0)
        n_blocks = int(positions.max()) // _BLOCK + 1 if positions.numel() else 1
        blocks = []
        for block in range(n_blocks):
            generator = torch.Generator().manual_seed(_mix(seed, layer.layer_idx, block))
            blocks.append(torch.rand(_BLOCK, kv_heads, generator=generator))
        table = torch.cat(blocks)  # (n_blocks * _BLOCK, kv_heads): row p holds position p
        scores = table[positions]  # (batch, seq, kv_heads)
        return scores.permute(0, 2, 1).contiguous().to(layer.keys.device)


def _mix(*values: int) -> int:
    """Deterministic 63-bit seed from integers (splitmix64-style mixing)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF

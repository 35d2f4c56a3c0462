"""ChunkKV: keep whole chunks of consecutive tokens, ranked by any scorer's scores."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zigzag.scorers.base import LayerView, Scorer, ScorerWrapper


@dataclass
class ChunkKV(ScorerWrapper):
    """Cut each row into chunks of ``chunk_size`` tokens and rank the chunks by their mean inner score.

    Paper: https://arxiv.org/abs/2502.00299 ("ChunkKV: Semantic-Preserving KV Cache Compression for
    Efficient Long-Context LLM Inference", Liu et al., 2025). Token-level scores tear phrases apart;
    ChunkKV keeps or drops chunks of consecutive tokens as a whole.

    For each (row, KV head):

    1. Chunks are counted from the row's first valid token: valid tokens ``[0, c)``, ``[c, 2c)``, ...
       (``c = chunk_size``), so left padding does not move their boundaries. The last chunk may be
       shorter.
    2. A chunk's score is the mean of the inner scorer's scores over its tokens. For full chunks this
       ranks as the paper's sum does; the mean (kvpress's choice) does not penalize the short last
       chunk for its length.
    3. Every token gets its chunk's *rank* among the row's chunks (0 for the lowest, ties broken
       towards the later chunk), plus ``(c - offset) / (c + 1)`` for its offset inside the chunk, a
       term in ``(0, 1)``. Tokens of a better chunk thus always rank above those of a worse one, and a
       budget that ends inside a chunk keeps the chunk's first tokens, a contiguous span. Ranks, not
       raw means, make this exact at any scale of the inner scores (up to ~5e5 chunks for
       ``c = 10``, where float32 still resolves the offset term); scores are therefore not
       comparable across heads in magnitude (an AdaKV split sees every head alike).

    Non-finite inner scores count as the largest finite float32 of their sign (NaN, which no scorer
    should return, as 0), so a chunk holding a ``+inf`` token ranks above every chunk of ordinary scores, a
    chunk holding a ``-inf`` one below. Tokens an inner scorer protects by lifting them (SnapKV's
    window, TOVA's last token, Protected) lift their chunk's mean by their share: a chunk made only of
    tokens lifted above all others ranks above every chunk without such a token, a chunk holding a
    few of them ranks by its mean like any other. To keep protected tokens whatever their chunk, wrap
    the chunked scorer instead: ``snapkv+chunk10+last64``.

    Args:
        inner: the scorer whose scores rank the chunks (its needs are passed through).
        chunk_size: tokens per chunk, ``>= 1``; the paper's default is 10 (its chunk-size ablation;
            kvpress defaults to 20). 1 ranks single tokens by their inner score.
    """

    inner: Scorer
    chunk_size: int = 10

    def __post_init__(self) -> None:
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1 (tokens per chunk); got {self.chunk_size!r}")

    @property
    def name(self) -> str:
        return f"{self.inner.name}+chunk{self.chunk_size}"

    def score(self, layer: LayerView) -> torch.Tensor:
        """``(batch, kv_heads, seq)`` float32: each token's chunk rank plus its in-chunk tie-break."""
        inner = self.inner.score(layer)
        batch, kv_heads, seq = inner.shape
        c = self.chunk_size
        device = inner.device
        valid = layer.valid.to(device=device, dtype=torch.bool)
        big = torch.finfo(torch.float32).max
        scores = torch.nan_to_num(inner.float(), nan=0.0, posinf=big, neginf=-big).to(torch.float64)

        # The k-th valid token of a row belongs to chunk k // c: chunks count valid tokens only, so
        # padding (or an empty slot) never moves a boundary.
        n_chunks = -(-seq // c)
        n_valid = valid.sum(dim=-1, keepdim=True)  # (batch, 1)
        columns = torch.argsort((~valid).to(torch.int8), dim=-1, stable=True)  # valid columns first, in order
        k = torch.arange(n_chunks * c, device=device)
        inside = k[None, :] < n_valid  # (batch, n_chunks * c)
        at = columns.gather(-1, k.clamp(max=seq - 1)[None, :].expand(batch, -1))
        gathered = scores.gather(-1, at[:, None, :].expand(batch, kv_heads, -1))
        # Float64 sums of float32 values clamped to the finite range cannot overflow.
        total = gathered.masked_fill(~inside[:, None, :], 0.0).view(batch, kv_heads, n_chunks, c).sum(-1)
        count = inside.view(batch, n_chunks, c).sum(-1)  # (batch, n_chunks)
        mean = total / count.clamp(min=1)[:, None, :]
        # Chunks past the row's valid tokens sort last, so a real chunk's rank does not depend on the padding.
        mean = mean.masked_fill((count == 0)[:, None, :], float("inf"))
        order = mean.argsort(dim=-1, stable=True)  # ascending; equal means keep their index order
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n_chunks, device=device).expand_as(order))

        index = (valid.long().cumsum(dim=-1) - 1).clamp(min=0)  # (batch, seq): rank among valid tokens
        chunk, offset = index // c, index % c
        tie = (c - offset).to(torch.float32) / (c + 1)  # in (0, 1), decreasing inside the chunk
        own = rank.gather(-1, chunk[:, None, :].expand(batch, kv_heads, seq)).to(torch.float32)
        return own + tie[:, None, :]

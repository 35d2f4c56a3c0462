"""The fast merge in plain PyTorch: vectorized over batch and heads, blocked over the sequence.

Memory never grows with ``seq x n``: the similarity search walks ``seq`` in blocks of ``chunk_size``
positions and holds at most ``(batch, kv_heads, chunk_size, n)`` similarities at a time. Beyond that
it keeps O(seq) per (row, head) (best cosine and best slot of every position) and O(n * head_dim)
accumulators. Blocks run over *positions*, not over the ragged evicted list: kept and padded
positions in a block are computed and then masked out, which avoids per-head gathers.

The search step (:func:`best_match_torch`) is the only part with ``seq x n`` work; the Triton kernel in
:mod:`zigzag.merge.triton` replaces just that step and reuses the rest of this module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from zigzag.merge.base import QUOTA_SLACK, MergeResult, check_inputs, check_merge_args

SIM_BLOCK_ELEMENTS = 1 << 26
"""Auto ``chunk_size`` keeps ``batch * kv_heads * chunk_size * n`` at most this (256 MiB in float32)."""

ACC_BLOCK_ELEMENTS = 1 << 24
"""The accumulation pass reads values in blocks of at most this many elements (64 MiB in float32)."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def auto_chunk_size(batch: int, kv_heads: int, seq: int, n: int) -> int:
    """Largest block of positions whose similarities fit :data:`SIM_BLOCK_ELEMENTS` (at least 16)."""
    return max(1, min(seq, max(16, SIM_BLOCK_ELEMENTS // max(1, batch * kv_heads * n))))


def _inv_norm(x: torch.Tensor) -> torch.Tensor:
    """``1 / |x|`` over the last dim, ``0`` where the norm is 0 (so a zero key has cosine 0)."""
    norm = torch.linalg.vector_norm(x, dim=-1)
    return torch.where(norm > 0, 1.0 / norm.clamp_min(torch.finfo(norm.dtype).tiny), torch.zeros_like(norm))


def _unit(x: torch.Tensor) -> torch.Tensor:
    """``x / |x|`` over the last dim (a zero vector stays zero). Divides rather than multiplying by
    ``1 / |x|``, so parallel vectors give a cosine of exactly 1 (as in the reference)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x / norm.clamp_min(torch.finfo(norm.dtype).tiny)


@dataclass
class Survivors:
    """Everything the search and the accumulation need to know about the kept slots of one layer.

    Attributes:
        slot_ok: ``(batch, kv_heads, n)`` bool, the slot holds a token (``kept >= 0``).
        target: ``(batch, kv_heads, n)`` bool, the slot may absorb (holds a non-padding token).
        evicted: ``(batch, kv_heads, seq)`` bool, valid and not kept.
        keys: ``(batch, kv_heads, n, head_dim)`` survivor keys in the *input* dtype; rows of
            non-targets are zero.
        inv_norm: ``(batch, kv_heads, n)`` compute dtype: ``1 / |k_s|`` on targets, ``0`` elsewhere.
        values: ``(batch, kv_heads, n, head_dim)`` original survivor values in the compute dtype
            (zeros on empty slots); :func:`accumulate` adds into it in place.
        value_norm: ``(batch, kv_heads, n)`` ``|v_s|`` of the original values.
    """

    slot_ok: torch.Tensor
    target: torch.Tensor
    evicted: torch.Tensor
    keys: torch.Tensor
    inv_norm: torch.Tensor
    values: torch.Tensor
    value_norm: torch.Tensor


def gather_survivors(keys: torch.Tensor, values: torch.Tensor, kept: torch.Tensor, valid: torch.Tensor) -> Survivors:
    """Gather the kept slots and build the evicted mask (see :class:`Survivors`)."""
    batch, kv_heads, seq, head_dim = keys.shape
    cd = compute_dtype(values.dtype)
    slot_ok = kept >= 0  # (batch, kv_heads, n)
    pos = kept.clamp_min(0)
    valid_bh = valid[:, None, :].expand(batch, kv_heads, seq)
    target = slot_ok & valid_bh.gather(2, pos)
    # Kept mask via scatter; empty slots write into an extra column that is dropped, so they never
    # clobber a real kept position 0.
    is_kept = torch.zeros(batch, kv_heads, seq + 1, dtype=torch.bool, device=keys.device)
    is_kept.scatter_(2, torch.where(slot_ok, pos, seq), True)
    evicted = valid_bh & ~is_kept[..., :seq]  # (batch, kv_heads, seq)

    idx = pos[..., None].expand(-1, -1, -1, head_dim)  # (batch, kv_heads, n, head_dim)
    s_keys = keys.gather(2, idx).masked_fill_(~target[..., None], 0)  # padding may hold NaN
    s_values = values.gather(2, idx).to(cd).masked_fill_(~slot_ok[..., None], 0)
    return Survivors(
        slot_ok=slot_ok,
        target=target,
        evicted=evicted,
        keys=s_keys,
        inv_norm=_inv_norm(s_keys.to(cd)),  # zero rows give 0
        values=s_values,
        value_norm=torch.linalg.vector_norm(s_values, dim=-1),
    )


def best_match_torch(keys: torch.Tensor, surv: Survivors, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every position, the largest cosine to a target slot and that slot (first one on ties).

    Args:
        keys: ``(batch, kv_heads, seq, head_dim)`` all keys.
        surv: the survivors (non-target slots have zero normalized keys, hence cosine 0).
        chunk_size: positions per block; at most ``(batch, kv_heads, chunk_size, n)`` similarities live.

    Returns:
        ``best (batch, kv_heads, seq)`` in the compute dtype and ``slot (batch, kv_heads, seq)`` long.
        Meaningful only on evicted positions. Where a non-target slot wins (its cosine is 0), the best
        cosine is ``<= 0`` and the token never merges, so the slot does not matter.
    """
    batch, kv_heads, seq, _ = keys.shape
    cd = surv.values.dtype
    s_unit = _unit(surv.keys.to(cd))  # (batch, kv_heads, n, head_dim); non-target rows are zero
    s_unit_t = s_unit.transpose(-1, -2)  # (batch, kv_heads, head_dim, n)
    best = torch.empty(batch, kv_heads, seq, dtype=cd, device=keys.device)
    slot = torch.empty(batch, kv_heads, seq, dtype=torch.long, device=keys.device)
    for start in range(0, seq, chunk_size):
        stop = min(seq, start + chunk_size)
        block = keys[:, :, start:stop].to(cd)  # (batch, kv_heads, chunk, head_dim)
        block = _unit(block)
        sim = torch.matmul(block, s_unit_t)  # (batch, kv_heads, chunk, n)
        top, arg = sim.max(dim=-1)  # first maximum on ties = lowest slot
        best[..., start:stop] = top
        slot[..., start:stop] = arg
        del sim, top, arg
    return best, slot


def select(best: torch.Tensor, evicted: torch.Tensor, threshold: float, fraction: float) -> torch.Tensor:
    """``(batch, kv_heads, seq)`` bool: evicted tokens that merge (quota by ``fraction``, then threshold).

    The quota keeps the ``ceil(fraction * n_evicted)`` largest best-cosines per (row, head); a stable
    descending sort breaks ties by position, like the reference.
    """
    chosen = evicted & (best >= threshold) & (best > 0)
    if fraction < 1.0:
        seq = best.shape[-1]
        n_evicted = evicted.sum(dim=-1)  # (batch, kv_heads)
        quota = torch.ceil(n_evicted.double() * fraction - QUOTA_SLACK).clamp_min(0).long()
        score = best.masked_fill(~evicted, float("-inf"))
        order = torch.sort(score, dim=-1, descending=True, stable=True).indices  # (batch, kv_heads, seq)
        ranks = torch.arange(seq, device=best.device).expand_as(order)
        rank = torch.empty_like(order).scatter_(-1, order, ranks)
        chosen &= rank < quota[..., None]
    return chosen


def accumulate(
    values: torch.Tensor,
    surv: Survivors,
    best: torch.Tensor,
    slot: torch.Tensor,
    chosen: torch.Tensor,
) -> MergeResult:
    """Apply ``v_s <- (v_s + sum w_e v_e) / (1 + sum w_e)`` over the chosen tokens, block by block."""
    batch, kv_heads, seq, head_dim = values.shape
    n = surv.values.shape[2]
    cd = surv.values.dtype
    zero = torch.zeros((), dtype=cd, device=values.device)
    acc = surv.values  # starts at v_s; owned by this call, so accumulate in place
    wsum = torch.zeros(batch, kv_heads, n, dtype=cd, device=values.device)
    absorbed = torch.zeros(batch, kv_heads, n, dtype=cd, device=values.device)
    block = max(1, min(seq, ACC_BLOCK_ELEMENTS // max(1, batch * kv_heads * head_dim)))
    for start in range(0, seq, block):
        stop = min(seq, start + block)
        take = chosen[..., start:stop]  # (batch, kv_heads, block)
        v_e = torch.where(take[..., None], values[:, :, start:stop].to(cd), zero)  # padding may hold NaN
        n_e = torch.linalg.vector_norm(v_e, dim=-1)
        sl = slot[..., start:stop]
        n_s = surv.value_norm.gather(2, sl)
        take = take & (n_e > 0)
        w = torch.where(take, best[..., start:stop] * n_e / torch.where(take, n_e + n_s, 1.0), zero)
        acc.scatter_add_(2, sl[..., None].expand(-1, -1, -1, head_dim), w[..., None] * v_e)
        wsum.scatter_add_(2, sl, w)
        absorbed.scatter_add_(2, sl, (w > 0).to(cd))
    merged = acc.div_((1.0 + wsum)[..., None])  # empty slots: 0 / 1 = 0
    counts = torch.where(surv.slot_ok, 1.0 + absorbed, zero).float()
    return MergeResult(values=merged.to(values.dtype), counts=counts)


BestMatch = Callable[[torch.Tensor, Survivors, int], "tuple[torch.Tensor, torch.Tensor]"]


def merge_with(
    best_match: BestMatch,
    keys: torch.Tensor,
    values: torch.Tensor,
    kept: torch.Tensor,
    valid: torch.Tensor,
    threshold: float,
    fraction: float,
    chunk_size: int | None,
) -> MergeResult:
    """The merge pipeline with a pluggable search step (PyTorch blocks or the Triton kernel)."""
    kept = check_inputs(keys, values, kept, valid)
    check_merge_args(threshold, fraction)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int (positions per block) or None (auto); got {chunk_size!r}")
    batch, kv_heads, seq, head_dim = keys.shape
    n = kept.shape[-1]
    if n == 0 or seq == 0:
        return MergeResult(
            values=values.new_zeros(batch, kv_heads, n, head_dim),
            counts=torch.zeros(batch, kv_heads, n, dtype=torch.float32, device=values.device),
        )
    with torch.no_grad():
        surv = gather_survivors(keys, values, kept, valid)
        chunk = chunk_size if chunk_size is not None else auto_chunk_size(batch, kv_heads, seq, n)
        best, slot = best_match(keys, surv, chunk)
        chosen = select(best, surv.evicted, float(threshold), float(fraction))
        return accumulate(values, surv, best, slot, chosen)


def merge_chunked(
    keys: torch.Tensor,
    values: torch.Tensor,
    kept: torch.Tensor,
    valid: torch.Tensor,
    threshold: float = 0.0,
    fraction: float = 1.0,
    chunk_size: int | None = None,
) -> MergeResult:
    """Fold every evicted token into its most key-similar survivor, in bounded memory (PyTorch).

    Same rule and result as :func:`zigzag.merge.reference.merge_reference` (up to float rounding),
    computed in float32 (float64 for float64 inputs) and cast back to ``values.dtype``.

    Args:
        keys: ``(batch, kv_heads, seq, head_dim)`` all prefill keys (never modified).
        values: ``(batch, kv_heads, seq, head_dim)`` all prefill values (never modified).
        kept: ``(batch, kv_heads, n)`` integer: kept columns of ``seq``, ascending; ``-1`` marks an
            empty slot (empty slots come first).
        valid: ``(batch, seq)`` bool, False on left padding (never evicted, never merged).
        threshold: minimum cosine for a token to merge (default 0: every positive-cosine token).
        fraction: share ``(0, 1]`` of each (row, head)'s evicted tokens that may merge, most similar
            first (default 1: all).
        chunk_size: positions per similarity block; peak extra memory is about
            ``batch * kv_heads * chunk_size * n`` floats. ``None`` (default) picks the largest block
            with at most ``2**26`` similarities (256 MiB in float32).

    Returns:
        :class:`MergeResult`: ``values (batch, kv_heads, n, head_dim)`` in ``values.dtype`` (zeros on
        empty slots) and ``counts (batch, kv_heads, n)`` float32 (0 on empty slots).
    """
    return merge_with(best_match_torch, keys, values, kept, valid, threshold, fraction, chunk_size)

"""Cosine best match for merge-on-evict in one Triton kernel: cosine, max and argmax fused, no
similarity matrix (imported lazily by :mod:`zigzag.merge.triton`, which builds the merge around it).

Each program takes ``BLOCK_M`` positions of one (row, head), walks the survivors in tiles of
``BLOCK_N``, and keeps a running maximum of ``(k_e . k_s) / |k_s|`` and its slot; at the end it
divides by ``|k_e|``. The dot products run on tensor cores in the input dtype (bf16/fp16) with float32
accumulation (exact products, float32 sums), or in IEEE float32 for float32 inputs, so results agree
with the float32 PyTorch path (:func:`zigzag.merge.chunked.best_match_torch`, the reference) up to
rounding. Ties go to the lowest slot, as everywhere.

The launcher is the operator ``zigzag::cosine_best_match`` (a ``torch.library.custom_op``) with a
fake (shape-only) implementation, so that torch.compile traces through it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _best_match_kernel(
    keys_ptr,  # (batch, kv_heads, seq, head_dim), input dtype
    skeys_ptr,  # (batch, kv_heads, n, head_dim), input dtype: the survivors' keys
    inv_ptr,  # (batch, kv_heads, n) float32: 1 / |k_s| on targets, 0 elsewhere
    best_ptr,  # (batch, kv_heads, seq) float32 out, contiguous
    slot_ptr,  # (batch, kv_heads, seq) int64 out, contiguous
    order_ptr,  # (batch * kv_heads, seq) int64: each (row, head)'s searched positions first, ascending
    count_ptr,  # (batch * kv_heads,) int64: how many positions of each (row, head) are searched
    kv_heads,
    seq,
    n,
    head_dim,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_kd,
    stride_sb,
    stride_sh,
    stride_sn,
    stride_sd,
    stride_ib,
    stride_ih,
    stride_in,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // kv_heads
    h = pid_bh % kv_heads
    count = tl.load(count_ptr + pid_bh)
    if pid_m * BLOCK_M >= count:  # past this (row, head)'s searched positions: nothing to do
        return

    ranks = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = ranks < count
    offs_m = tl.load(order_ptr + pid_bh * seq + ranks, mask=m_ok, other=0)  # positions in seq
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    k_ptrs = keys_ptr + b * stride_kb + h * stride_kh + offs_m[:, None] * stride_ks + offs_d[None, :] * stride_kd
    ke = tl.load(k_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)

    best = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    arg = tl.zeros((BLOCK_M,), dtype=tl.int32)
    s_base = skeys_ptr + b * stride_sb + h * stride_sh
    i_base = inv_ptr + b * stride_ib + h * stride_ih
    for start in range(0, n, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n
        ks = tl.load(
            s_base + offs_n[None, :] * stride_sn + offs_d[:, None] * stride_sd,
            mask=d_ok[:, None] & n_ok[None, :],
            other=0.0,
        )  # (BLOCK_D, BLOCK_N)
        if IEEE:
            dots = tl.dot(ke, ks, input_precision="ieee")
        else:
            dots = tl.dot(ke, ks)  # bf16/fp16 on tensor cores, float32 accumulation
        inv = tl.load(i_base + offs_n * stride_in, mask=n_ok, other=0.0)
        sim = tl.where(n_ok[None, :], dots * inv[None, :], float("-inf"))  # (BLOCK_M, BLOCK_N)
        tile_max, tile_idx = tl.max(sim, axis=1, return_indices=True, return_indices_tie_break_left=True)
        tile_arg = start + tile_idx  # first maximum within the tile
        better = tile_max > best  # strict: an earlier tile (lower slot) keeps ties
        best = tl.where(better, tile_max, best)
        arg = tl.where(better, tile_arg, arg)

    kf = ke.to(tl.float32)
    norm = tl.sqrt(tl.sum(kf * kf, axis=1))
    best = tl.where(norm > 0, best / norm, 0.0)
    out = pid_bh * seq + offs_m
    tl.store(best_ptr + out, best, mask=m_ok)
    tl.store(slot_ptr + out, arg.to(tl.int64), mask=m_ok)


def _config(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) for a head size (tiles fit shared memory)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if dtype == torch.float32:
        return (64, 32, block_d, 4, 2) if block_d <= 128 else (32, 32, block_d, 4, 2)
    if block_d <= 128:
        return 128, 64, block_d, 8, 3
    return 64, 32, block_d, 4, 2


@torch.library.custom_op("zigzag::cosine_best_match", mutates_args=())
def cosine_best_match(
    keys: torch.Tensor, survivor_keys: torch.Tensor, inv_norm: torch.Tensor, searched: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest cosine of each searched position's key to the survivors' keys, and the slot (first on ties).

    Args:
        keys: ``(batch, kv_heads, seq, head_dim)`` float16, bfloat16 or float32.
        survivor_keys: ``(batch, kv_heads, n, head_dim)``, same dtype (rows of non-targets arbitrary).
        inv_norm: ``(batch, kv_heads, n)`` float32: ``1 / |k_s|`` on targets, ``0`` elsewhere
            (non-targets then score a cosine of 0).
        searched: ``(batch, kv_heads, seq)`` bool, the positions to search for (the evicted ones).
            Only they cost work: at ratio 0.5 half the products of searching every position.

    Returns:
        ``best (batch, kv_heads, seq)`` float32 and ``slot (batch, kv_heads, seq)`` int64; 0 and 0 at
        positions not searched.
    """
    batch, kv_heads, seq, head_dim = keys.shape
    n = survivor_keys.shape[2]
    best = torch.zeros(batch, kv_heads, seq, dtype=torch.float32, device=keys.device)
    slot = torch.zeros(batch, kv_heads, seq, dtype=torch.int64, device=keys.device)
    if batch * kv_heads * seq == 0 or n == 0:
        return best, slot
    # Searched positions first (ascending), then the rest; the programs past the count exit at once.
    flat = searched.reshape(batch * kv_heads, seq)
    order = torch.sort((~flat).to(torch.int8), dim=-1, stable=True).indices
    count = flat.sum(dim=-1)
    block_m, block_n, block_d, warps, stages = _config(head_dim, keys.dtype)
    grid = (triton.cdiv(seq, block_m), batch * kv_heads)
    _best_match_kernel[grid](
        keys,
        survivor_keys,
        inv_norm,
        best,
        slot,
        order,
        count,
        kv_heads,
        seq,
        n,
        head_dim,
        *keys.stride(),
        *survivor_keys.stride(),
        *inv_norm.stride(),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        IEEE=keys.dtype == torch.float32,
        num_warps=warps,
        num_stages=stages,
    )
    return best, slot


@cosine_best_match.register_fake
def _(keys, survivor_keys, inv_norm, searched):
    batch, kv_heads, seq, _ = keys.shape
    return (
        keys.new_empty(batch, kv_heads, seq, dtype=torch.float32),
        keys.new_empty(batch, kv_heads, seq, dtype=torch.int64),
    )

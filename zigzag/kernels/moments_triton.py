"""Second moments of shifted queries in one Triton pass (imported lazily by :func:`zigzag.kernels.moments.query_moments_half`).

For each (row, query head), with ``c_t = round_to_dtype(q_t - s)`` (the shift ``s`` is the mean
rounded to the queries' dtype, as in the PyTorch path)::

    second[b, h] = sum_t w_t c_t c_t^T        (head_dim x head_dim, float32)

The PyTorch path writes the shifted queries (``seq x heads x head_dim`` half-precision values, 256 MB
per layer at 32k tokens and 32 heads) and reads them back for a batched matmul; here each program
reads its block of queries once, shifts and rounds it in registers and multiplies it on the tensor
cores (half-precision products are exact in float32, sums in float32).

Program ``(batch * heads, split of the tokens)``: a ``head_dim x head_dim`` float32 accumulator over
its tokens, written to ``partial[b * heads + h, split]``; the caller sums the splits (in a fixed
order: the result does not depend on scheduling).

The launch is the operator ``zigzag::shifted_second_moment`` (a ``torch.library.custom_op``) with a
fake implementation, so that torch.compile traces through it.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl


@triton.jit
def _second_moment_kernel(
    q_ptr, shift_ptr, w_ptr, out_ptr,
    heads, seq, head_dim, tokens_per_split,
    s_qb, s_qs, s_qh, s_qd, s_wb, s_ws,
    HAS_WEIGHTS: tl.constexpr, UPCAST: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    shift = tl.load(shift_ptr + bh * head_dim + d, mask=d_ok, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_D, BLOCK_D], tl.float32)
    start = split * tokens_per_split
    stop = tl.minimum(start + tokens_per_split, seq)
    base = q_ptr + b * s_qb + h * s_qh
    for t0 in range(start, stop, BLOCK_S):
        t = t0 + tl.arange(0, BLOCK_S)
        t_ok = t < stop
        q = tl.load(base + t.to(tl.int64)[:, None] * s_qs + d[None, :] * s_qd, mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        c = (q.to(tl.float32) - shift[None, :]).to(q.dtype, fp_downcast_rounding="rtne")  # as torch.sub(q, shift) rounds
        keep = t_ok[:, None] & d_ok[None, :]
        if HAS_WEIGHTS:
            keep = keep & (tl.load(w_ptr + b * s_wb + t.to(tl.int64) * s_ws, mask=t_ok, other=0.0) != 0)[:, None]
        c = tl.where(keep, c, tl.zeros_like(c))
        if UPCAST:
            c = c.to(tl.float32)
            acc += tl.dot(tl.trans(c), c, input_precision="ieee")
        else:
            acc += tl.dot(tl.trans(c), c)
    out = out_ptr + (bh * tl.num_programs(1) + split) * head_dim * head_dim
    tl.store(out + d[:, None] * head_dim + d[None, :], acc, mask=d_ok[:, None] & d_ok[None, :])


def shifted_second_moment(q: torch.Tensor, shift: torch.Tensor, weights: torch.Tensor | None, upcast: bool = False) -> torch.Tensor:
    """See :func:`second_moment_op`; ``upcast`` defaults to False (products in half precision)."""
    return second_moment_op(q, shift, weights, upcast)


@torch.library.custom_op("zigzag::shifted_second_moment", mutates_args=())
def second_moment_op(q: torch.Tensor, shift: torch.Tensor, weights: torch.Tensor | None, upcast: bool) -> torch.Tensor:
    """``sum_t w_t c_t c_t^T`` per (row, head), ``c_t = q_t - shift`` rounded to ``q``'s dtype.

    Args:
        q: ``(batch, seq, heads, head_dim)`` bfloat16 / float16, any strides; ``head_dim <= 128``.
        shift: ``(batch, heads, head_dim)`` in ``q``'s dtype.
        weights: ``(batch, seq)`` 0/1 (tokens that count), or None for all.
        upcast: multiply in IEEE float32 instead of half precision (same products: the interpreter).

    Returns:
        ``(batch, heads, head_dim, head_dim)`` float32.
    """
    batch, seq, heads, head_dim = q.shape
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_s = 64
    splits = max(1, min(triton.cdiv(seq, block_s), triton.cdiv(256, max(batch * heads, 1))))
    tokens_per_split = triton.cdiv(triton.cdiv(seq, splits), block_s) * block_s
    splits = max(1, triton.cdiv(seq, tokens_per_split))
    partial = torch.empty(batch * heads, splits, head_dim, head_dim, device=q.device, dtype=torch.float32)
    shift = shift.to(q.dtype).contiguous()
    w_arg = weights if weights is not None else shift
    w_strides = weights.stride() if weights is not None else (0, 0)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _second_moment_kernel[(batch * heads, splits)](
            q, shift, w_arg, partial,
            heads, seq, head_dim, tokens_per_split,
            *q.stride(), *w_strides,
            HAS_WEIGHTS=weights is not None, UPCAST=upcast, BLOCK_S=block_s, BLOCK_D=block_d, num_warps=8,
        )
    return partial.sum(dim=1).view(batch, heads, head_dim, head_dim)


@second_moment_op.register_fake
def _(q, shift, weights, upcast):
    batch, _seq, heads, head_dim = q.shape
    return q.new_empty(batch, heads, head_dim, head_dim, dtype=torch.float32)

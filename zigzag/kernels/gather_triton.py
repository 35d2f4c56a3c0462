"""Keys and values of chosen tokens, copied in one Triton launch (imported lazily by :mod:`zigzag.kernels.gather`).

Program ``(block of BLOCK_N ranks, batch * kv_heads)``: read the token indices of its ranks, then for
keys and values read each token's ``head_dim`` row and write it to the first output (ranks below
``width``, ``(batch, kv_heads, width, head_dim)``) or to the second (the other ranks,
``(n - width, batch, kv_heads, head_dim)``: rank-major, so that the next best tokens of every head
are one contiguous block). A negative index writes zeros (an empty cache slot).

With a second, rank-major source ``(m, batch, kv_heads, head_dim)`` (tokens just fetched from the
host), index ``seq + j`` reads its row ``j``: no concatenation of the two first.

A row is ``head_dim`` contiguous elements in every layout zigzag meets, so loads and stores are
vectorized; ``torch.gather`` computes an offset per element of its expanded index and, for the
rank-major output, needs a second copy.

The launch is the operator ``zigzag::gather_split`` (a ``torch.library.custom_op``) with a fake
implementation, so that torch.compile traces through it.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl


@triton.jit
def _copy_rows(src, extra, out_top, out_rest, b, h, idx, r, r_ok, d, d_ok, width, src_n,
               s_b, s_h, s_s, s_d, e_s, e_b, e_h, e_d, t_b, t_h, t_s, u_s, u_b, u_h, HAS_EXTRA: tl.constexpr):
    in_src = r_ok & (idx >= 0) & (idx < src_n)
    rows = tl.load(
        src + b * s_b + h * s_h + tl.minimum(tl.maximum(idx, 0), src_n - 1)[:, None] * s_s + d[None, :] * s_d,
        mask=in_src[:, None] & d_ok[None, :], other=0.0,
    )
    if HAS_EXTRA:  # indices from src_n on are rows of the rank-major second source
        in_extra = r_ok & (idx >= src_n)
        more = tl.maximum(idx - src_n, 0)
        rows += tl.load(
            extra + more[:, None] * e_s + b * e_b + h * e_h + d[None, :] * e_d, mask=in_extra[:, None] & d_ok[None, :], other=0.0
        )
    top = r < width
    tl.store(out_top + b * t_b + h * t_h + r[:, None] * t_s + d[None, :], rows, mask=(r_ok & top)[:, None] & d_ok[None, :])
    rest = tl.maximum(r - width, 0)
    tl.store(out_rest + rest[:, None] * u_s + b * u_b + h * u_h + d[None, :], rows, mask=(r_ok & ~top)[:, None] & d_ok[None, :])


@triton.jit
def _gather_kernel(
    keys, values, keys_extra, values_extra, index, k_top, v_top, k_rest, v_rest,
    kv_heads, n, width, head_dim, src_n,
    sk_b, sk_h, sk_s, sk_d, sv_b, sv_h, sv_s, sv_d, si_b, si_h, si_n,
    ek_s, ek_b, ek_h, ek_d, ev_s, ev_b, ev_h, ev_d,
    t_b, t_h, t_s, u_s, u_b, u_h,
    HAS_EXTRA: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(1).to(tl.int64)
    b = bh // kv_heads
    h = bh % kv_heads
    r = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    r_ok = r < n
    idx = tl.load(index + b * si_b + h * si_h + r * si_n, mask=r_ok, other=-1)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    _copy_rows(keys, keys_extra, k_top, k_rest, b, h, idx, r, r_ok, d, d_ok, width, src_n,
               sk_b, sk_h, sk_s, sk_d, ek_s, ek_b, ek_h, ek_d, t_b, t_h, t_s, u_s, u_b, u_h, HAS_EXTRA)
    _copy_rows(values, values_extra, v_top, v_rest, b, h, idx, r, r_ok, d, d_ok, width, src_n,
               sv_b, sv_h, sv_s, sv_d, ev_s, ev_b, ev_h, ev_d, t_b, t_h, t_s, u_s, u_b, u_h, HAS_EXTRA)


def gather_split(
    keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor, width: int, extra: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """See :func:`zigzag.kernels.gather.gather_split` (same contract; arguments already checked there)."""
    keys_extra, values_extra = extra if extra is not None else (None, None)
    return gather_split_op(keys, values, index, width, keys_extra, values_extra)


def _outputs(keys: torch.Tensor, n: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(keys_top, values_top, keys_rest, values_rest)`` allocated: ``(batch, kv_heads, width, d)``
    twice, then ``(n - width, batch, kv_heads, d)`` twice."""
    batch, kv_heads, _, head_dim = keys.shape
    top = keys.new_empty(batch, kv_heads, width, head_dim), keys.new_empty(batch, kv_heads, width, head_dim)
    rest = keys.new_empty(n - width, batch, kv_heads, head_dim), keys.new_empty(n - width, batch, kv_heads, head_dim)
    return top[0], top[1], rest[0], rest[1]


@torch.library.custom_op("zigzag::gather_split", mutates_args=())
def gather_split_op(
    keys: torch.Tensor,
    values: torch.Tensor,
    index: torch.Tensor,
    width: int,
    keys_extra: torch.Tensor | None,
    values_extra: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`gather_split` with the second source as two tensors (both or neither)."""
    extra = (keys_extra, values_extra) if keys_extra is not None else None
    batch, kv_heads, src_n, head_dim = keys.shape
    n = index.shape[-1]
    device = keys.device
    k_top, v_top, k_rest, v_rest = _outputs(keys, n, width)
    if n == 0 or batch * kv_heads == 0:
        return k_top, v_top, k_rest, v_rest
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_n = max(16, min(64, 8192 // block_d))
    t_b, t_h, t_s = k_top.stride()[:3]
    u_s, u_b, u_h = k_rest.stride()[:3]
    grid = (triton.cdiv(n, block_n), batch * kv_heads)
    with torch.cuda.device(device) if keys.is_cuda else contextlib.nullcontext():
        keys_extra, values_extra = extra if extra is not None else (keys, values)  # any pointers without extra
        _gather_kernel[grid](
            keys, values, keys_extra, values_extra, index, k_top, v_top, k_rest, v_rest,
            kv_heads, n, width, head_dim, src_n,
            *keys.stride(), *values.stride(), *index.stride(),
            *(keys_extra.stride() if extra is not None else (0,) * 4), *(values_extra.stride() if extra is not None else (0,) * 4),
            t_b, t_h, t_s, u_s, u_b, u_h,
            HAS_EXTRA=extra is not None, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4,
        )
    return k_top, v_top, k_rest, v_rest


@gather_split_op.register_fake
def _(keys, values, index, width, keys_extra, values_extra):
    return _outputs(keys, index.shape[-1], width)

"""Mean and covariance of half-precision queries (ExpectedAttention's statistics), with no float32 copy.

The shifted second moments come from one Triton pass on CUDA (:mod:`zigzag.kernels.moments_triton`)
or from a batched matmul (the reference), chosen by the ``"moments"`` switch of :mod:`zigzag.kernels`
(``set_backend("moments", ...)``, ``ZIGZAG_MOMENTS_BACKEND``; ``"auto"``: the kernel for CUDA queries
with ``head_dim <= 128``).
"""

from __future__ import annotations

import torch

from zigzag.kernels.switch import kernel_switch

_MOMENTS_SWITCH = kernel_switch("moments")


def query_moments_half(
    q: torch.Tensor, use: torch.Tensor | None = None, count: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of half-precision CUDA queries, with no float32 copy of them.

    Args:
        q: ``(batch, seq, heads, head_dim)`` bfloat16 / float16 pre-RoPE queries (may be a slice).
        use: ``(batch, seq)`` float 0/1, the tokens that count; count: ``(batch, 1, 1)`` their number.
            Both None: every token counts (one half-precision pass less).

    Returns:
        ``mean (batch, heads, head_dim)`` and ``cov (batch, heads, head_dim, head_dim)`` float32.

    The mean is a float32 sum (``bmm(..., out_dtype=float32)``: half-precision products are exact in
    float32). The covariance is taken around ``s``, the mean rounded to the queries' dtype:
    ``E[(q - s)(q - s)^T] - (mu - s)(mu - s)^T``. Shifting first matters: queries have dimensions whose
    mean is many standard deviations (``E[q q^T] - mu mu^T`` would cancel away float32's digits there).
    ``q - s`` rounded to half precision errs by up to ``2^-9`` of itself, so entries are within about
    0.2% of the float64 covariance (tested on CUDA): the precision the bfloat16 queries had to begin
    with. Memory traffic is two half-precision passes instead of the float32 path's copy, centring and
    masking (512 MB each per layer at 32k tokens and 32 heads).
    """
    batch, seq, heads, head_dim = q.shape
    if (use is None) != (count is None):
        raise ValueError("give both use and count, or neither")
    if use is None:
        weights = q.new_ones(batch, seq)
        count = torch.full((batch, 1, 1), float(seq), device=q.device)
    else:
        weights = use.to(q.dtype)  # 0 / 1: exact in half precision
    mean = torch.bmm(weights[:, None, :], q.reshape(batch, seq, heads * head_dim), out_dtype=torch.float32)
    mean = mean.view(batch, heads, head_dim) / count
    shift = mean.to(q.dtype)
    if _MOMENTS_SWITCH.use_kernel(q.device, head_dim <= 128 and batch * heads < 2**16):
        # One pass: each block of queries is shifted, rounded and multiplied in registers.
        from zigzag.kernels.moments_triton import shifted_second_moment  # imports triton: on first use only

        second = shifted_second_moment(q, shift, use, upcast=not q.is_cuda) / count[..., None]
    else:
        centred = torch.sub(q, shift[:, None])  # (batch, seq, heads, head_dim)
        if use is not None:
            centred.mul_(weights[:, :, None, None])
        rows = centred.permute(0, 2, 1, 3).reshape(batch * heads, seq, head_dim)  # views when batch == 1
        columns = centred.permute(0, 2, 3, 1).reshape(batch * heads, head_dim, seq)
        second = torch.bmm(columns, rows, out_dtype=torch.float32).view(batch, heads, head_dim, head_dim) / count[..., None]
    delta = mean - shift.float()
    return mean, second - delta[..., :, None] * delta[..., None, :]

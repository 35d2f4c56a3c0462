"""ExpectedAttention's logits in one Triton kernel, straight from the keys: no key-sized intermediates.

Imported lazily by :mod:`zigzag.scorers.expected_attention` (CUDA tensors and ``triton`` present, or
Triton's interpreter in the tests). It computes what the scorer's PyTorch loop computes, for every
key ``k`` of KV head ``(b, h)`` and query head ``g`` of its group::

    z[b, h, g, i] = k_i^T Q_g k_i + m_g . k_i

with ``Q_g``, ``m_g`` read from the scorer's ``weights`` ``[Q_1 | ... | Q_G | m_1 ... m_G]``. The
PyTorch path writes ``k Q_g`` for every key and query head (``seq x heads x head_dim`` floats) and a
float32 copy of each key chunk; here a program keeps a block of keys in registers, in float32 whatever
their dtype, and only the ``(groups, BLOCK_N)`` logits reach memory.

**Program** ``(key block, batch * kv_heads)``: load ``K`` ``(BLOCK_N, head_dim)`` once (strided, cast
to float32), then for each query head ``g`` and each block ``J`` of ``BLOCK_J`` output columns::

    z += sum_j K[:, j] * ((K Q_g)[:, j] + m_g[j])       for j in J

(``k^T Q k + m . k = sum_j k_j ((k Q)_j + m_j)``, so the linear term costs no second reduction). The
column blocks bound the ``Q_g`` tile that must sit in shared memory at ``head_dim x BLOCK_J`` floats
(64 KiB for ``head_dim`` 256 with ``BLOCK_J`` 64); the product is then taken with the keys' columns
``J``, re-read from memory (the L1/L2 copy of the block just loaded) unless ``J`` is all of them.

**Q read transposed.** A quadratic form does not change under transposition (``k^T Q k = k^T Q^T k``
for any ``Q``, summed over the same pairs), so the tile is read as ``Q_g^T``: its reduction index is
then the contiguous one of ``weights``, the layout tensor cores take for TF32 operands.

**Precision.** Products in TF32 (``precision="tf32"``, what the scorer's torch path gets under
:func:`zigzag.pipeline.select.score_layer`) or IEEE float32 (``"ieee"``: the tests, and CUDA when PyTorch's
float32 matmuls are not TF32), always with float32 accumulation.

**Operator.** The launch is ``zigzag::ea_group_logits`` (a ``torch.library.custom_op`` that writes
its ``out`` argument) with a fake implementation, so that torch.compile traces through it; the
arguments are checked before, in :func:`group_logits`.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

PRECISIONS = ("ieee", "tf32")
"""``tl.dot`` input precisions: IEEE float32 or TF32 (float32 accumulation either way)."""

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _ea_logits_kernel(
    keys_ptr,  # (batch, kv_heads, seq, head_dim), any float dtype, strided
    w_ptr,  # (batch, kv_heads, head_dim, groups * head_dim + groups) float32, strided
    out_ptr,  # (batch, kv_heads, groups, seq) float32, contiguous
    kv_heads,
    seq,
    head_dim,
    groups,
    s_kb,
    s_kh,
    s_ks,
    s_kd,
    s_wb,
    s_wh,
    s_wr,
    s_wc,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # int64: offsets of long caches overflow int32
    b = bh // kv_heads
    h = bh % kv_heads

    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < seq
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    k_rows = keys_ptr + b * s_kb + h * s_kh + n.to(tl.int64)[:, None] * s_ks  # (BLOCK_N, 1)
    k = tl.load(k_rows + d[None, :] * s_kd, mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)

    w = w_ptr + b * s_wb + h * s_wh
    out = out_ptr + bh * groups * seq + n
    j_blocks = tl.cdiv(head_dim, BLOCK_J)
    z = tl.zeros([BLOCK_N], dtype=tl.float32)
    # One flat loop over (query head, column block), so that the compiler pipelines every Q tile load.
    for t in range(groups * j_blocks):
        g = t // j_blocks
        jb = t % j_blocks
        j = jb * BLOCK_J + tl.arange(0, BLOCK_J)
        j_ok = j < head_dim
        # qt[i, j] = Q_g[j, i] = weights[j, g * head_dim + i]: Q_g^T, reduction index i contiguous.
        qt = tl.load(
            w + j[None, :] * s_wr + (g * head_dim + d)[:, None] * s_wc,
            mask=d_ok[:, None] & j_ok[None, :],
            other=0.0,
        )  # (BLOCK_D, BLOCK_J)
        m = tl.load(w + j * s_wr + (groups * head_dim + g) * s_wc, mask=j_ok, other=0.0)  # m_g[j]
        kq = tl.dot(k, qt, input_precision=PRECISION)  # (BLOCK_N, BLOCK_J) float32: (k Q_g^T)[j]
        if BLOCK_J == BLOCK_D:
            kj = k  # one column block: every column
        else:
            kj = tl.load(k_rows + j[None, :] * s_kd, mask=n_ok[:, None] & j_ok[None, :], other=0.0).to(tl.float32)
        z += tl.sum(kj * (kq + m[None, :]), 1)
        # z of query head g is complete after its last column block (a vector: the interpreter
        # rejects a scalar mask broadcast against a vector one).
        last = tl.full([BLOCK_N], jb, tl.int32) == j_blocks - 1
        tl.store(out + g * seq, z, mask=n_ok & last)
        z = tl.where(last, 0.0, z)


def _config(head_dim: int, precision: str) -> tuple[int, int, int, int, int]:
    """``(BLOCK_N, BLOCK_D, BLOCK_J, num_warps, num_stages)`` for a head size and dot precision.

    head_dim 128 with TF32 was timed on an H100 (``python -m benchmarks.perf.ea_scoring --device cuda
    --seq 32768 --dtype bfloat16 --logits-sweep``, 8 KV heads x 4 query heads): ``(128, 128, 64, 8, 2)``
    takes 0.45 ms per layer, against 0.62 ms for ``(64, 128, 64, 8, 2)`` and 1.08 ms for the torch
    path. The other sizes come from sm_90 compiles (ptxas, without a GPU): no register spills, and
    shared memory (the float32 key block ``BLOCK_N x BLOCK_D`` plus ``num_stages`` Q tiles ``BLOCK_D x
    BLOCK_J``) that leaves room for at least one program per SM. TF32 products run on tensor cores;
    IEEE float32 ones are FMAs, whose operands live in registers, so their column blocks are narrower
    (32 columns: no spills up to head_dim 256).
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    if precision == "ieee":
        return 64, block_d, min(block_d, 32), 4 if block_d <= 32 else 8, 2
    if block_d <= 64:
        return 64, block_d, block_d, 4, 2
    if block_d <= 128:
        return 128, block_d, 64, 8, 2
    return 32, block_d, 64, 4, 2


def group_logits(
    keys: torch.Tensor,
    weights: torch.Tensor,
    out: torch.Tensor | None = None,
    precision: str = "tf32",
    config: tuple[int, int, int, int, int] | None = None,
) -> torch.Tensor:
    """``z = k^T Q_g k + m_g . k`` for every key and query head of its KV group, from the keys as they are.

    Args:
        keys: ``(batch, kv_heads, seq, head_dim)`` float16 / bfloat16 / float32, any strides;
            ``head_dim`` at most 256.
        weights: ``(batch, kv_heads, head_dim, groups * head_dim + groups)`` float32, any strides:
            ``[Q_1 | ... | Q_groups | m_1 ... m_groups]`` (the scorer's ``_group_weights``).
        out: ``(batch, kv_heads, groups, seq)`` float32 contiguous to write into, or None to allocate.
        precision: ``tl.dot`` input precision, one of :data:`PRECISIONS` (float32 accumulation always).
        config: ``(BLOCK_N, BLOCK_D, BLOCK_J, num_warps, num_stages)`` instead of :func:`_config`'s
            (benchmarks); ``BLOCK_D`` a power of two >= max(16, head_dim), ``BLOCK_J`` one <= it.

    Returns:
        ``(batch, kv_heads, groups, seq)`` float32 (``out`` when given).
    """
    batch, kv_heads, seq, head_dim = keys.shape
    width = weights.shape[-1]
    groups = width // (head_dim + 1)
    if weights.shape != (batch, kv_heads, head_dim, groups * (head_dim + 1)) or weights.dtype != torch.float32:
        raise ValueError(
            f"weights must be float32 (batch, kv_heads, head_dim, groups * head_dim + groups) for keys "
            f"{tuple(keys.shape)}; got {weights.dtype} {tuple(weights.shape)}"
        )
    if keys.dtype not in KERNEL_DTYPES:
        raise ValueError(f"keys must be one of {KERNEL_DTYPES}; got {keys.dtype}")
    if head_dim > 256:
        raise ValueError(f"head_dim must be at most 256 for the kernel; got {head_dim}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}")
    if out is None:
        out = torch.empty(batch, kv_heads, groups, seq, device=keys.device, dtype=torch.float32)
    elif out.shape != (batch, kv_heads, groups, seq) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous float32 tensor of shape {(batch, kv_heads, groups, seq)}; "
            f"got {out.dtype} {tuple(out.shape)} (contiguous: {out.is_contiguous()})"
        )
    if out.numel() == 0:
        return out
    block_n, block_d, block_j, num_warps, num_stages = _config(head_dim, precision) if config is None else config
    if block_d < head_dim or block_j > block_d:
        raise ValueError(f"config needs BLOCK_D >= head_dim ({head_dim}) and BLOCK_J <= BLOCK_D; got {config}")
    ea_group_logits(keys, weights, out, precision, [block_n, block_d, block_j, num_warps, num_stages])
    return out


@torch.library.custom_op("zigzag::ea_group_logits", mutates_args=("out",))
def ea_group_logits(
    keys: torch.Tensor, weights: torch.Tensor, out: torch.Tensor, precision: str, config: list[int]
) -> None:
    """The launch of :func:`group_logits` (arguments checked there, ``config`` resolved): writes ``out``
    ``(batch, kv_heads, groups, seq)``. An operator so that torch.compile traces through it."""
    batch, kv_heads, seq, head_dim = keys.shape
    groups = out.shape[2]
    block_n, block_d, block_j, num_warps, num_stages = config
    grid = (triton.cdiv(seq, block_n), batch * kv_heads)
    with torch.cuda.device(keys.device) if keys.is_cuda else contextlib.nullcontext():  # launch on the keys' GPU
        _ea_logits_kernel[grid](
            keys,
            weights,
            out,
            kv_heads,
            seq,
            head_dim,
            groups,
            *keys.stride(),
            *weights.stride(),
            PRECISION=precision,
            BLOCK_N=block_n,
            BLOCK_D=block_d,
            BLOCK_J=block_j,
            num_warps=num_warps,
            num_stages=num_stages,
        )


@ea_group_logits.register_fake
def _(keys, weights, out, precision, config) -> None:
    return None

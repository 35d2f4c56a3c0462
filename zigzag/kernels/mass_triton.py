"""The attention mass a window of last queries gives each key, in two Triton passes: no logits in memory.

Imported lazily by :func:`zigzag.scorers.window_mass` (CUDA tensors and ``triton`` present, or
Triton's interpreter in the tests). It computes what the PyTorch path computes,
``window_attention(queries, keys, valid, scaling).sum(dim=2)``: for query head ``h`` (KV head
``h // groups``) and key ``j``::

    mass[b, h, j] = sum_i softmax_j(scaling * q[b, h, i] . k[b, h // groups, j])

over the ``window`` last queries ``i``, each seeing the valid keys up to its own position (bottom-right
causal alignment). The PyTorch path writes the ``(batch, heads, window, seq)`` float32 logits, masks
them, writes the probabilities and reads them again for the sum: four passes over the largest tensor
of the step. Here the logits live in registers only.

**Rows.** The ``groups * window`` queries of one KV head are the rows of one matrix. Each query head's
rows are padded to ``W = next_power_of_2(window)`` (at least 16, the smallest ``tl.dot``), so row
``r`` is query ``r % W`` of group head ``r // W``; rows past the window or the group are masked.
A block of ``BLOCK_R`` rows holds ``BLOCK_R // W`` whole query heads.

**Pass 1** (``_row_stats_kernel``, program ``(batch * kv_heads, row block, key split)``): the running
maximum ``m`` and sum ``l = sum_j 2^(s_j - m)`` of each row's logits ``s`` (base 2: ``log2(e)`` is
folded into the scale) over one split of the keys. Splits fill the GPU when ``batch * kv_heads`` is
small. Each program loads its query tile once and streams its keys past it.

**Merge** (``_merge_stats_kernel``): the splits' ``(m, l)`` of each row become its maximum ``M`` and
``1 / L`` (0 for a row that sees no key), once, so that no key block has to merge them again.

**Pass 2** (``_mass_kernel``, the same programs): recompute the logits of the split, ``p = 2^(s - M) /
L`` (0 where masked), and sum the ``W`` rows of each query head of the block.

**Precision.** Half-precision inputs go to ``tl.dot`` as they are: their products are exact in float32
(what the PyTorch path gets from float32 copies under TF32, whose mantissa holds theirs). When either
is float32 (the pipeline's window queries are), both are, with ``precision`` (``"tf32"`` as PyTorch's matmul under :func:`zigzag.pipeline.hf.tf32_matmuls`, or
``"ieee"``). Accumulation, exponentials and sums are float32.

**Operator.** The three launches are ``zigzag::window_mass_sum`` (a ``torch.library.custom_op``)
with a fake implementation, so that torch.compile traces through it; the arguments are checked
before, in :func:`window_mass_sum`.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
import triton.language as tl

PRECISIONS = ("ieee", "tf32")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_WINDOW = 256
"""Longest window the kernel takes (one query head's rows must fit one row block)."""
MAX_HEAD_DIM = 256


@triton.jit
def _load_queries(q_ptr, b, h, groups, window, r, d, d_ok, s_qb, s_qh, s_qw, s_qd, W: tl.constexpr, UPCAST: tl.constexpr):
    """The ``(BLOCK_R, BLOCK_D)`` query tile of rows ``r``, its row mask and each row's window index."""
    g = r // W
    i = r % W
    row_ok = (g < groups) & (i < window)
    q_rows = q_ptr + b * s_qb + (h * groups + g).to(tl.int64) * s_qh + i.to(tl.int64) * s_qw
    q = tl.load(q_rows[:, None] + d[None, :] * s_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    return q, row_ok, i


@triton.jit
def _key_tile(k_base, n, limit, d, d_ok, s_ks, s_kd, UPCAST: tl.constexpr):
    k = tl.load(k_base + n.to(tl.int64)[:, None] * s_ks + d[None, :] * s_kd, mask=(n < limit)[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    return k


@triton.jit
def _visible(n, i, row_ok, valid_ptr, b, s_vb, s_vs, limit, first_query, HAS_VALID: tl.constexpr):
    """``(BLOCK_R, BLOCK_N)`` bool: window row ``i`` (sequence index ``first_query + i``) sees key ``n < limit``."""
    n_ok = n < limit
    if HAS_VALID:
        n_ok = n_ok & (tl.load(valid_ptr + b * s_vb + n.to(tl.int64) * s_vs, mask=n_ok, other=0) != 0)
    return row_ok[:, None] & n_ok[None, :] & (n[None, :] <= (first_query + i)[:, None])


@triton.jit
def _row_stats_kernel(
    q_ptr, k_ptr, valid_ptr, m_ptr, l_ptr,
    kv_heads, groups, window, seq, head_dim, keys_per_split, qk_scale,
    s_qb, s_qh, s_qw, s_qd, s_kb, s_kh, s_ks, s_kd, s_vb, s_vs,
    HAS_VALID: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(2)
    b = bh // kv_heads
    h = bh % kv_heads
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    q, row_ok, i = _load_queries(q_ptr, b, h, groups, window, r, d, d_ok, s_qb, s_qh, s_qw, s_qd, W, UPCAST)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_R], tl.float32)
    k_base = k_ptr + b * s_kb + h * s_kh
    start = split * keys_per_split
    stop = tl.minimum(start + keys_per_split, seq)
    for n0 in range(start, stop, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        s = tl.dot(q, tl.trans(_key_tile(k_base, n, stop, d, d_ok, s_ks, s_kd, UPCAST)), input_precision=PRECISION)
        seen = _visible(n, i, row_ok, valid_ptr, b, s_vb, s_vs, stop, seq - window, HAS_VALID)
        s = tl.where(seen, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet
        l = l * tl.exp2(m - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m = m_new
    rows = groups * W
    out = (bh * tl.num_programs(2) + split) * rows + r
    tl.store(m_ptr + out, m, mask=r < rows)
    tl.store(l_ptr + out, l, mask=r < rows)


@triton.jit
def _merge_stats_kernel(m_ptr, l_ptr, splits, rows, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr):
    """Merge the splits' running ``(max, sum)`` of each row into its softmax maximum ``M`` and ``1 / L``
    (0 for rows that see no key: queries on padding), written over split 0's ``(m, l)``."""
    bh = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    sp = tl.arange(0, BLOCK_S)
    stats = (bh * splits + sp[:, None]) * rows + r[None, :]
    ok = (sp[:, None] < splits) & (r[None, :] < rows)
    m_s = tl.load(m_ptr + stats, mask=ok, other=float("-inf"))
    l_s = tl.load(l_ptr + stats, mask=ok, other=0.0)
    m_row = tl.max(m_s, 0)
    m_row = tl.where(m_row == float("-inf"), 0.0, m_row)
    l_row = tl.sum(l_s * tl.exp2(m_s - m_row[None, :]), 0)
    inv_l = tl.where(l_row > 0, 1.0 / tl.where(l_row > 0, l_row, 1.0), 0.0)
    out = bh * splits * rows + r
    tl.store(m_ptr + out, m_row, mask=r < rows)
    tl.store(l_ptr + out, inv_l, mask=r < rows)


@triton.jit
def _mass_kernel(
    q_ptr, k_ptr, valid_ptr, m_ptr, inv_l_ptr, out_ptr,
    kv_heads, groups, window, seq, head_dim, keys_per_split, qk_scale,
    s_qb, s_qh, s_qw, s_qd, s_kb, s_kh, s_ks, s_kd, s_vb, s_vs,
    HAS_VALID: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    rb = tl.program_id(1)
    splits = tl.num_programs(2)
    b = bh // kv_heads
    h = bh % kv_heads
    r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    q, row_ok, i = _load_queries(q_ptr, b, h, groups, window, r, d, d_ok, s_qb, s_qh, s_qw, s_qd, W, UPCAST)
    rows = groups * W
    stats = bh * splits * rows + r  # merged into split 0's slots by _merge_stats_kernel
    m_row = tl.load(m_ptr + stats, mask=r < rows, other=0.0)
    inv_l = tl.load(inv_l_ptr + stats, mask=r < rows, other=0.0)
    HEADS_PER_BLOCK: tl.constexpr = BLOCK_R // W
    g = rb * HEADS_PER_BLOCK + tl.arange(0, HEADS_PER_BLOCK)
    out_rows = out_ptr + (b * kv_heads * groups + h * groups + g.to(tl.int64))[:, None] * seq
    k_base = k_ptr + b * s_kb + h * s_kh
    start = tl.program_id(2) * keys_per_split
    stop = tl.minimum(start + keys_per_split, seq)
    for n0 in range(start, stop, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        s = tl.dot(q, tl.trans(_key_tile(k_base, n, stop, d, d_ok, s_ks, s_kd, UPCAST)), input_precision=PRECISION)
        seen = _visible(n, i, row_ok, valid_ptr, b, s_vb, s_vs, stop, seq - window, HAS_VALID)
        p = tl.where(seen, tl.exp2(s * qk_scale - m_row[:, None]) * inv_l[:, None], 0.0)
        mass = tl.sum(tl.reshape(p, [HEADS_PER_BLOCK, W, BLOCK_N]), 1)  # (HEADS_PER_BLOCK, BLOCK_N)
        tl.store(out_rows + n[None, :], mass, mask=(g < groups)[:, None] & (n < stop)[None, :])


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few splits, to exercise merging them
    return torch.cuda.get_device_properties(device).multi_processor_count


def _config(window: int, groups: int, head_dim: int, upcast: bool) -> tuple[int, int, int, int, int]:
    """``(W, BLOCK_R, BLOCK_N, BLOCK_D, num_warps)``: rows per query head, rows per block, keys per
    block, head size tile, warps. At most 256 rows per block (a ``256 x 64`` float32 logit tile in
    registers over 8 warps), 128 when the operands are float32 (their tiles then take twice the
    shared memory)."""
    w = max(16, triton.next_power_of_2(window))
    rows = 128 if upcast else 256
    heads_per_block = min(triton.next_power_of_2(groups), max(1, rows // w))
    block_r = w * heads_per_block
    block_d = max(16, triton.next_power_of_2(head_dim))
    # Timed on an H100 (python -m benchmarks.perf.window_mass --device cuda --sweep, Llama-3.1-8B's
    # heads, 32k keys): float32 queries 0.37 ms with 128 keys per block against 0.41 with 64.
    block_n = (128 if upcast else 64) if block_d <= 128 else 32
    return w, block_r, block_n, block_d, 8 if block_r >= 128 else 4


def window_mass_sum(
    queries: torch.Tensor,
    keys: torch.Tensor,
    valid: torch.Tensor | None,
    scaling: float,
    precision: str = "tf32",
    config: tuple[int, int, int, int, int] | None = None,
) -> torch.Tensor:
    """Sum over the window's queries of their softmax attention over ``keys``, without the logits in memory.

    Args:
        queries: ``(batch, heads, window, head_dim)``, after RoPE, any strides; ``window <= seq`` and
            at most :data:`MAX_WINDOW`.
        keys: ``(batch, kv_heads, seq, head_dim)`` float16 / bfloat16 / float32, any strides;
            ``heads`` a multiple of ``kv_heads``; ``head_dim`` at most 256. The queries have the keys'
            dtype or float32 (both then go to ``tl.dot`` as float32).
        valid: ``(batch, seq)`` bool (False on padding), or None when every key is valid.
        scaling: softmax scale.
        precision: ``tl.dot`` precision for float32 inputs, one of :data:`PRECISIONS`.
        config: ``(W, BLOCK_R, BLOCK_N, BLOCK_D, num_warps)`` instead of :func:`_config`'s (benchmarks).

    Returns:
        ``(batch, heads, seq)`` float32: ``window_attention(...).sum(dim=2)``. A query that sees no
        valid key adds nothing.
    """
    batch, heads, window, head_dim = queries.shape
    kv_batch, kv_heads, seq, kv_dim = keys.shape
    if (kv_batch, kv_dim) != (batch, head_dim) or heads % max(kv_heads, 1):
        raise ValueError(f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} do not match")
    if keys.dtype not in KERNEL_DTYPES or queries.dtype not in (keys.dtype, torch.float32):
        raise ValueError(f"keys must be one of {KERNEL_DTYPES} and queries of the same dtype or float32; got {keys.dtype} and {queries.dtype}")
    if not 0 < window <= min(seq, MAX_WINDOW) or head_dim > MAX_HEAD_DIM:
        raise ValueError(f"the kernel takes 0 < window <= min(seq, {MAX_WINDOW}) and head_dim <= {MAX_HEAD_DIM}; got {tuple(queries.shape)}, seq {seq}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}")
    if valid is not None and (valid.shape != (batch, seq) or valid.dtype != torch.bool):
        raise ValueError(f"valid must be a (batch, seq) = {(batch, seq)} bool tensor or None; got {valid.dtype} {tuple(valid.shape)}")
    groups = heads // kv_heads
    # Half-precision products are exact in float32 either way; the interpreter's half tl.dot is not
    # reliable, so there they are taken in IEEE float32.
    upcast = torch.float32 in (keys.dtype, queries.dtype) or os.environ.get("TRITON_INTERPRET") == "1"
    w, block_r, block_n, block_d, num_warps = _config(window, groups, head_dim, upcast) if config is None else config
    if w < window or block_r % w or block_d < head_dim:
        raise ValueError(f"config needs W >= window, BLOCK_R a multiple of W and BLOCK_D >= head_dim; got {config}")
    return window_mass_op(queries, keys, valid, float(scaling), precision, [w, block_r, block_n, block_d, num_warps])


@torch.library.custom_op("zigzag::window_mass_sum", mutates_args=())
def window_mass_op(
    queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor | None, scaling: float, precision: str, config: list[int]
) -> torch.Tensor:
    """The launches of :func:`window_mass_sum` (arguments checked there, ``config`` resolved):
    ``(batch, heads, seq)`` float32."""
    batch, heads, window, head_dim = queries.shape
    kv_heads, seq = keys.shape[1], keys.shape[2]
    groups = heads // kv_heads
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    fp32 = torch.float32 in (keys.dtype, queries.dtype)
    upcast = fp32 or interpreted
    w, block_r, block_n, block_d, num_warps = config
    device = keys.device
    row_blocks = triton.cdiv(groups * w, block_r)
    key_blocks = triton.cdiv(seq, block_n)
    splits = max(1, min(key_blocks, 64, triton.cdiv(2 * _sm_count(device), batch * kv_heads * row_blocks)))
    keys_per_split = triton.cdiv(key_blocks, splits) * block_n
    splits = triton.cdiv(seq, keys_per_split)
    stats = torch.empty(2, batch * kv_heads, splits, groups * w, device=device, dtype=torch.float32)
    out = torch.empty(batch, heads, seq, device=device, dtype=torch.float32)
    valid_arg = valid.view(torch.uint8) if valid is not None else keys  # any pointer when HAS_VALID is False
    valid_strides = valid.stride() if valid is not None else (0, 0)
    common = {
        "HAS_VALID": valid is not None,
        "UPCAST": upcast,
        "PRECISION": precision if fp32 else ("ieee" if interpreted else "tf32"),
        "W": w, "BLOCK_R": block_r, "BLOCK_N": block_n, "BLOCK_D": block_d, "num_warps": num_warps,
    }
    qk_scale = float(scaling) * math.log2(math.e)
    strides = (*queries.stride(), *keys.stride(), *valid_strides)
    with torch.cuda.device(device) if keys.is_cuda else contextlib.nullcontext():
        _row_stats_kernel[(batch * kv_heads, row_blocks, splits)](
            queries, keys, valid_arg, stats[0], stats[1],
            kv_heads, groups, window, seq, head_dim, keys_per_split, qk_scale, *strides, **common,
        )
        merge_rows = max(16, 4096 // max(2, triton.next_power_of_2(splits)))
        _merge_stats_kernel[(batch * kv_heads, triton.cdiv(groups * w, merge_rows))](
            stats[0], stats[1], splits, groups * w, BLOCK_S=max(2, triton.next_power_of_2(splits)), BLOCK_R=merge_rows,
        )
        _mass_kernel[(batch * kv_heads, row_blocks, splits)](
            queries, keys, valid_arg, stats[0], stats[1], out,
            kv_heads, groups, window, seq, head_dim, keys_per_split, qk_scale, *strides, **common,
        )
    return out


@window_mass_op.register_fake
def _(queries, keys, valid, scaling, precision, config):
    batch, heads, _window, _ = queries.shape
    return queries.new_empty(batch, heads, keys.shape[2], dtype=torch.float32)

"""Varlen attention for CUDA in two Triton kernels: split-KV partial softmaxes, then one reduction.

Imported lazily by :mod:`zigzag.varlen` for its ``"triton"`` backend (CUDA tensors and ``triton``
present). It computes what :func:`zigzag.varlen.segment_attention` and the dense-tail combination
compute, with no Python work that grows with the number of segments or slots, no host sync, and the
query and tail read in place (strided), so a decoding step costs two kernel launches per layer.

**Layout.** Segment ``z = row * kv_heads + head`` holds slots ``offsets[z]:offsets[z + 1]`` of the flat
``(total, head_dim)`` keys and values. Its query rows are the ``g = Hq / kv_heads`` query heads of its
KV head at every query position: row ``r = j * rows + i`` is query head ``head * g + j`` at position
``i``.

**Kernel 1** (:func:`_partial_kernel`), grid ``(Z, splits + tail, row blocks)``. Program ``(z, s)``
attends the rows of segment ``z`` over slots ``offsets[z] + s * chunk`` up to ``chunk`` further, with
the running max / sum of flash attention, and writes its normalized output and log-sum-exp. ``chunk``
is chosen per layer so that ``Z * splits`` is a few programs per streaming multiprocessor whatever the
skew of the segment lengths (a segment of three times the average just has three times the splits);
programs past the end of a shorter segment exit with ``lse = -inf``. With a tail, the last split index
attends the dense appended tokens ``(batch, kv_heads, n, head_dim)`` of the segment's (row, head),
under the model's mask (additive, broadcast over heads when its head stride is 0) or, without one,
causally aligned to the end.

**Kernel 2** (:func:`_reduce_kernel`), grid ``(Z, row blocks)``: merges the splits by log-sum-exp,
``lse = log sum_s exp(lse_s)``, ``out = sum_s exp(lse_s - lse) out_s``, and writes ``out`` in the output
dtype and ``lse`` in float32. A row with nothing to attend gets ``out = 0``, ``lse = -inf``.

Products run on tensor cores in the input dtype (bf16 / fp16) with float32 accumulation, the
probabilities are rounded to the input dtype for ``p @ v`` (as flash attention does), and float32
inputs use IEEE float32 products: tests compare with a float64 reference.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

PROGRAMS_PER_SM = 4
"""Target programs per streaming multiprocessor for the split-KV kernel (one wave of a few blocks)."""


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """``a @ b`` with float32 accumulation; IEEE float32 products for float32 inputs (tests)."""
    if IEEE:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _softmax_step(s, v, m_i, l_i, acc, IEEE: tl.constexpr):
    """One block of the running softmax: logits ``s (BLOCK_M, BLOCK_N)`` (``-inf`` where hidden) and
    values ``v (BLOCK_N, BLOCK_D)`` folded into the running max ``m_i``, sum ``l_i`` and output ``acc``."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen nothing yet keeps m = -inf; subtract 0 there so that exp gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
    return m_new, l_i, acc


# Integers that change from call to call (tail length, query rows, splits, tail strides as its buffer
# grows) are not specialised on: each new value's divisibility would otherwise compile a new kernel in
# the middle of decoding.
@triton.jit(
    do_not_specialize=["rows", "m", "chunk", "prefix_splits", "n_tail", "s_tkb", "s_tkh", "s_tvb", "s_tvh", "s_mb", "s_mh", "s_mi"]
)
def _partial_kernel(
    q_ptr,  # (batch, Hq, rows, head_dim), strided
    k_ptr,  # (total, head_dim) flat keys, row stride stride_kt, unit column stride
    v_ptr,  # (total, head_dim) flat values
    bias_ptr,  # (total,) float32 logit bias, read when HAS_BIAS
    offsets_ptr,  # (Z + 1,) int64
    tk_ptr,  # (batch, kv_heads, n, head_dim) tail keys, strided, read when HAS_TAIL
    tv_ptr,
    mask_ptr,  # additive float32 tail mask, strided (0 strides broadcast), read when HAS_MASK
    out_ptr,  # (Z, S, m, BLOCK_D) float32 partial outputs, contiguous
    lse_ptr,  # (Z, S, m) float32 partial log-sum-exp, contiguous
    kv_heads,
    group,
    rows,
    m,
    head_dim,
    chunk,
    prefix_splits,
    n_tail,
    scale,
    s_qb, s_qh, s_qi,
    s_kt, s_vt,
    s_tkb, s_tkh, s_tkn,
    s_tvb, s_tvh, s_tvn,
    s_mb, s_mh, s_mi, s_mj,
    HAS_BIAS: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    z = tl.program_id(0)
    split = tl.program_id(1)
    rblock = tl.program_id(2)
    splits = tl.num_programs(1)
    b = z // kv_heads
    h = z % kv_heads

    r = rblock * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows of this segment
    d = tl.arange(0, BLOCK_D)
    r_ok = r < m
    d_ok = d < head_dim
    j = r // rows  # query head within the GQA group
    i = r % rows  # query position
    q = tl.load(
        q_ptr + b * s_qb + (h * group + j)[:, None] * s_qh + i[:, None] * s_qi + d[None, :],
        mask=r_ok[:, None] & d_ok[None, :],
        other=0.0,
    )

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    if split < prefix_splits:
        seg_end = tl.load(offsets_ptr + z + 1)
        lo = tl.load(offsets_ptr + z) + split * chunk
        hi = tl.minimum(lo + chunk, seg_end)
        for start in range(lo, hi, BLOCK_N):
            c = start + tl.arange(0, BLOCK_N)
            c_ok = c < hi
            k = tl.load(k_ptr + c[:, None] * s_kt + d[None, :], mask=c_ok[:, None] & d_ok[None, :], other=0.0)
            s = _dot(q, tl.trans(k), IEEE) * scale
            if HAS_BIAS:
                s += tl.load(bias_ptr + c, mask=c_ok, other=0.0)[None, :]
            v = tl.load(v_ptr + c[:, None] * s_vt + d[None, :], mask=c_ok[:, None] & d_ok[None, :], other=0.0)
            m_i, l_i, acc = _softmax_step(tl.where(c_ok[None, :], s, float("-inf")), v, m_i, l_i, acc, IEEE)
    elif HAS_TAIL:
        # Its own loop names: Triton wants one type per name across the branches (int64 offsets above).
        for t_start in range(0, n_tail, BLOCK_N):
            tc = t_start + tl.arange(0, BLOCK_N)
            tc_ok = tc < n_tail
            tk = tl.load(
                tk_ptr + b * s_tkb + h * s_tkh + tc[:, None] * s_tkn + d[None, :],
                mask=tc_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            ts = _dot(q, tl.trans(tk), IEEE) * scale
            t_visible = r_ok[:, None] & tc_ok[None, :]
            if HAS_MASK:
                ts += tl.load(
                    mask_ptr + b * s_mb + (h * group + j)[:, None] * s_mh + i[:, None] * s_mi + tc[None, :] * s_mj,
                    mask=t_visible,
                    other=0.0,
                )
            if CAUSAL:
                t_visible = t_visible & (tc[None, :] <= i[:, None] + (n_tail - rows))
            tv = tl.load(
                tv_ptr + b * s_tvb + h * s_tvh + tc[:, None] * s_tvn + d[None, :],
                mask=tc_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            m_i, l_i, acc = _softmax_step(tl.where(t_visible, ts, float("-inf")), tv, m_i, l_i, acc, IEEE)

    empty = l_i == 0.0
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    base = z * splits + split
    tl.store(lse_ptr + base * m + r, lse, mask=r_ok)
    tl.store(out_ptr + (base * m + r)[:, None] * BLOCK_D + d[None, :], out, mask=r_ok[:, None])


@triton.jit(do_not_specialize=["splits", "m"])
def _reduce_kernel(
    part_out_ptr,  # (Z, S, m, BLOCK_D) float32
    part_lse_ptr,  # (Z, S, m) float32
    out_ptr,  # (Z, m, head_dim) output dtype, contiguous
    lse_ptr,  # (Z, m) float32
    splits,
    m,
    head_dim,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    z = tl.program_id(0)
    r = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    r_ok = r < m
    peak = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for s in range(splits):
        peak = tl.maximum(peak, tl.load(part_lse_ptr + (z * splits + s) * m + r, mask=r_ok, other=float("-inf")))
    safe = tl.where(peak == float("-inf"), 0.0, peak)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for s in range(splits):
        base = (z * splits + s) * m + r
        w = tl.exp(tl.load(part_lse_ptr + base, mask=r_ok, other=float("-inf")) - safe)  # 0 for empty splits
        total += w
        acc += w[:, None] * tl.load(part_out_ptr + base[:, None] * BLOCK_D + d[None, :], mask=r_ok[:, None], other=0.0)
    empty = total == 0.0
    out = acc / tl.where(empty, 1.0, total)[:, None]
    lse = tl.where(empty, float("-inf"), safe + tl.log(tl.where(empty, 1.0, total)))
    tl.store(lse_ptr + z * m + r, lse, mask=r_ok)
    tl.store(
        out_ptr + (z * m + r)[:, None] * head_dim + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=r_ok[:, None] & (d < head_dim)[None, :],
    )


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter on the CPU (tests): any small number


def split_chunk(total: int, width: int, device: torch.device, block: int = 64) -> tuple[int, int]:
    """Slots per split and splits per segment for a layer of ``total`` slots, widest segment ``width``.

    About :data:`PROGRAMS_PER_SM` programs per multiprocessor over the whole layout, each at most
    ``chunk`` slots (a multiple of ``block``), so a skewed segment gets more splits, not longer ones.
    """
    target = PROGRAMS_PER_SM * _multiprocessors(device)
    chunk = max(block, triton.cdiv(triton.cdiv(max(total, 1), target), block) * block)
    return chunk, max(1, triton.cdiv(width, chunk))


def _tail_strides(tail: torch.Tensor, kv_heads: int) -> tuple[int, int, int]:
    """Batch, KV-head and slot strides of a tail ``(batch, heads, n, d)``. When the model repeated its
    KV heads for GQA (``heads = Hq``), head ``h * Hq / kv_heads`` is a copy of KV head ``h``: read that one."""
    if tail.dim() != 4:  # no tail: the kernel reads none
        return (0, 0, 0)
    return tail.stride(0), tail.stride(1) * (tail.shape[1] // kv_heads), tail.stride(2)


def varlen_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    kv_heads: int,
    width: int,
    scale: float,
    tail_keys: torch.Tensor | None = None,
    tail_values: torch.Tensor | None = None,
    tail_mask: torch.Tensor | None = None,
    causal: bool = False,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``query`` over a flat varlen prefix and (optionally) a dense tail.

    Args:
        query: ``(batch, Hq, rows, d)``, any strides with a unit last stride.
        keys, values: ``(total, d)`` flat prefix; segment ``z = row * kv_heads + head`` is
            ``offsets[z]:offsets[z + 1]``.
        offsets: ``(batch * kv_heads + 1,)`` integer, on the query's device.
        bias: ``(total,)`` float added to each prefix slot's logit, or None.
        kv_heads: KV heads per row (``Hq % kv_heads == 0``).
        width: the longest segment (sets the number of splits; no sync to find it).
        scale: logit scale.
        tail_keys, tail_values: ``(batch, kv_heads, n, d)`` appended tokens (unit last stride), or None;
            ``(batch, Hq, n, d)`` (KV heads repeated for GQA, as some attention code does) works too.
        tail_mask: ``(batch or 1, 1 or Hq, rows, n)`` bool (True = attend) or additive float, or None:
            then all tail tokens are visible, or causally aligned to the end when ``causal``.
        causal: see ``tail_mask``.
        out_dtype: dtype of ``out`` (default: the query's).

    Returns:
        ``out (batch, Hq, rows, d)`` in ``out_dtype`` and ``lse (batch, Hq, rows)`` float32; a row that
        sees nothing gets ``out = 0`` and ``lse = -inf``.
    """
    batch, hq, rows, head_dim = query.shape
    group = hq // kv_heads
    z_count, m = batch * kv_heads, group * rows
    device = query.device
    if query.stride(-1) != 1:
        query = query.contiguous()
    keys, values = keys.contiguous(), values.contiguous()
    block_m = 16 if m <= 16 else 64
    block_n = 64
    block_d = max(16, triton.next_power_of_2(head_dim))
    chunk, prefix_splits = split_chunk(keys.shape[0], width, device, block_n)
    has_tail = tail_keys is not None and tail_keys.shape[2] > 0
    n_tail = tail_keys.shape[2] if has_tail else 0
    if has_tail and (tail_keys.shape[1] not in (kv_heads, hq) or tail_values.shape != tail_keys.shape):
        raise ValueError(
            f"tail keys {tuple(tail_keys.shape)} / values {tuple(tail_values.shape)} must be (batch, {kv_heads} or {hq}, n, d)"
        )
    splits = prefix_splits + int(has_tail)

    mask = None
    if has_tail and tail_mask is not None:
        mask = tail_mask
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, device=device).masked_fill_(~mask, float("-inf"))
        mask = mask.float().expand(batch, hq, rows, n_tail)  # broadcast dims get stride 0
    tail_k = tail_keys if has_tail else keys
    tail_v = tail_values if has_tail else values
    mask_t = mask if mask is not None else keys

    part_out = torch.empty(z_count, splits, m, block_d, device=device, dtype=torch.float32)
    part_lse = torch.empty(z_count, splits, m, device=device, dtype=torch.float32)
    row_blocks = triton.cdiv(m, block_m)
    ieee = query.dtype == torch.float32
    _partial_kernel[(z_count, splits, row_blocks)](
        query, keys, values, bias if bias is not None else keys, offsets, tail_k, tail_v, mask_t,
        part_out, part_lse,
        kv_heads, group, rows, m, head_dim, chunk, prefix_splits, n_tail, scale,
        query.stride(0), query.stride(1), query.stride(2),
        keys.stride(0), values.stride(0),
        *_tail_strides(tail_k, kv_heads), *_tail_strides(tail_v, kv_heads),
        *(mask.stride() if mask is not None else (0, 0, 0, 0)),
        HAS_BIAS=bias is not None, HAS_TAIL=has_tail, HAS_MASK=mask is not None,
        CAUSAL=has_tail and mask is None and causal and rows > 1, IEEE=ieee,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
    )  # fmt: skip
    out = torch.empty(batch, hq, rows, head_dim, device=device, dtype=out_dtype or query.dtype)
    lse = torch.empty(batch, hq, rows, device=device, dtype=torch.float32)
    _reduce_kernel[(z_count, row_blocks)](
        part_out, part_lse, out, lse, splits, m, head_dim, BLOCK_M=block_m, BLOCK_D=block_d
    )
    return out, lse


__all__ = ["PROGRAMS_PER_SM", "split_chunk", "varlen_attention"]

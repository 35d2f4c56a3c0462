"""Varlen attention for CUDA in one Triton kernel: split-KV partial softmaxes merged in place.

Imported lazily by :mod:`zigzag.cache.varlen` for its ``"triton"`` backend (CUDA tensors and ``triton``
present). It computes what :func:`zigzag.cache.varlen.segment_attention` and the dense-tail combination
compute, with no Python work that grows with the number of segments or slots, no host sync, and the
query, tail and mask read in place (strided), so a decoding step costs one kernel launch per layer.
Decoding an 8B model at small batch is bound by the host, so the host side is kept short too: a varlen
layer keeps what its launches share (:class:`Prefix`), and a decoding step (:func:`attend`) only reads
the query and tail, allocates the output and launches (:func:`launch`).

**Layout.** Segment ``z = row * kv_heads + head`` holds slots ``offsets[z]:offsets[z + 1]`` of the flat
``(total, head_dim)`` keys and values. Its query rows are the ``g = Hq / kv_heads`` query heads of its
KV head at every query position: row ``r = j * rows + i`` is query head ``head * g + j`` at position
``i``.

**Splits** (:func:`_varlen_kernel`, grid ``(Z, splits + tail, row blocks)``). Program ``(z, s)``
attends the rows of segment ``z`` over slots ``offsets[z] + s * chunk`` up to ``chunk`` further, with
the running max / sum of flash attention. ``chunk`` is chosen per layer so that ``Z * splits`` is a few
programs per streaming multiprocessor whatever the skew of the segment lengths (a segment of three
times the average just has three times the splits); programs past the end of a shorter segment hold
``lse = -inf``. With a tail, the last split index attends the dense appended tokens
``(batch, kv_heads, n, head_dim)`` of the segment's (row, head), under the model's mask (additive or
boolean, broadcast where its stride is 0) or, without one, causally aligned to the end.

**Merge.** Each program writes its normalized output and log-sum-exp to a scratch buffer and counts
itself in with an atomic; the last of a segment's programs to arrive merges them,
``lse = log sum_s exp(lse_s)``, ``out = sum_s exp(lse_s - lse) out_s``, writes ``out`` in the output
dtype (and ``lse`` in float32 when asked) and zeroes the counter for the next launch. A single split
writes its result directly. A row with nothing to attend gets ``out = 0``, ``lse = -inf``.

Products run on tensor cores in the input dtype (bf16 / fp16) with float32 accumulation, the
probabilities are rounded to the input dtype for ``p @ v`` (as flash attention does), and float32
inputs use IEEE float32 products: tests compare with a float64 reference.

**Two ways in.** Under torch.compile, :func:`attend` calls the operator ``zigzag::varlen_attention``
(a ``torch.library.custom_op`` with a fake implementation), which the compiler can trace. Eager calls
skip the operator: its dispatch costs more host time than the whole launch (see :func:`attend`).

**Direct launch.** On the Triton releases it was tested against (:data:`DIRECT_LAUNCH_TRITON`),
repeated launches call the compiled kernel's launcher directly instead of ``kernel[grid](...)``
(:func:`launch`); on any other release, and in Triton's interpreter, every launch is the ordinary one.
"""

from __future__ import annotations

import functools
import operator
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from packaging.version import Version

BLOCK_N = 64
"""Slots per block of the kernel's inner loop (and the granularity of a split)."""

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
_NOT_SPECIALISED = ("rows", "m", "chunk", "prefix_splits", "n_tail", "s_tkb", "s_tkh", "s_tvb", "s_tvh", "s_mb", "s_mh", "s_mi")


@triton.jit(do_not_specialize=list(_NOT_SPECIALISED))
def _varlen_kernel(
    q_ptr,  # (batch, Hq, rows, head_dim), strided
    k_ptr,  # (total, head_dim) flat keys, row stride s_kt, unit column stride
    v_ptr,  # (total, head_dim) flat values
    bias_ptr,  # (total,) float32 logit bias, read when HAS_BIAS
    offsets_ptr,  # (Z + 1,) int64
    tk_ptr,  # (batch, kv_heads, n, head_dim) tail keys, strided, read when HAS_TAIL
    tv_ptr,
    mask_ptr,  # tail mask, strided (0 strides broadcast): additive float, or uint8 (1 = attend) when MASK_BOOL
    part_ptr,  # (Z, S, m, BLOCK_D) float32 partial outputs, then (Z, S, m) float32 partial lse
    count_ptr,  # (Z * row blocks,) int32 arrival counters, zero between launches
    out_ptr,  # (Z, m, head_dim) output dtype, contiguous
    lse_ptr,  # (Z, m) float32, written when WRITE_LSE
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
    MASK_BOOL: tl.constexpr,
    CAUSAL: tl.constexpr,
    IEEE: tl.constexpr,
    WRITE_LSE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    z = tl.program_id(0)
    split = tl.program_id(1)
    rblock = tl.program_id(2)
    splits = tl.num_programs(1)
    row_blocks = tl.num_programs(2)
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
                mask_at = mask_ptr + b * s_mb + (h * group + j)[:, None] * s_mh + i[:, None] * s_mi + tc[None, :] * s_mj
                if MASK_BOOL:
                    t_visible = t_visible & (tl.load(mask_at, mask=t_visible, other=0) != 0)
                else:
                    ts += tl.load(mask_at, mask=t_visible, other=0.0).to(tl.float32)
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
    if splits == 1:
        _store_rows(out, lse, out_ptr, lse_ptr, z, r, d, m, head_dim, WRITE_LSE)
    else:
        part_lse_ptr = part_ptr + tl.num_programs(0).to(tl.int64) * splits * m * BLOCK_D
        base = z * splits + split
        tl.store(part_lse_ptr + base * m + r, lse, mask=r_ok)
        tl.store(part_ptr + (base * m + r)[:, None] * BLOCK_D + d[None, :], out, mask=r_ok[:, None])
        # The last of a segment's split programs to arrive merges them all (flash-decoding's reduction
        # without a second launch). The barrier puts every thread's stores before the counter's release.
        tl.debug_barrier()
        counter = count_ptr + z * row_blocks + rblock
        if tl.atomic_add(counter, 1, sem="acq_rel") == splits - 1:
            tl.atomic_xchg(counter, 0)  # zero again for the next launch
            out, lse = _merge_splits(part_ptr, part_lse_ptr, z, splits, r, r_ok, d, m, BLOCK_M, BLOCK_D)
            _store_rows(out, lse, out_ptr, lse_ptr, z, r, d, m, head_dim, WRITE_LSE)


@triton.jit
def _merge_splits(part_ptr, part_lse_ptr, z, splits, r, r_ok, d, m, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Log-sum-exp merge of the ``splits`` partial results of rows ``r`` of segment ``z``.

    Loads bypass L1 (``.cg``): the partials were written by other programs."""
    peak = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for s in range(splits):
        lse_s = tl.load(part_lse_ptr + (z * splits + s) * m + r, mask=r_ok, other=float("-inf"), cache_modifier=".cg")
        peak = tl.maximum(peak, lse_s)
    safe = tl.where(peak == float("-inf"), 0.0, peak)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for s in range(splits):
        base = (z * splits + s) * m + r
        w = tl.exp(tl.load(part_lse_ptr + base, mask=r_ok, other=float("-inf"), cache_modifier=".cg") - safe)
        total += w  # an empty split has lse = -inf: weight 0
        part = tl.load(part_ptr + base[:, None] * BLOCK_D + d[None, :], mask=r_ok[:, None], other=0.0, cache_modifier=".cg")
        acc += w[:, None] * part
    empty = total == 0.0
    out = acc / tl.where(empty, 1.0, total)[:, None]
    lse = tl.where(empty, float("-inf"), safe + tl.log(tl.where(empty, 1.0, total)))
    return out, lse


@triton.jit
def _store_rows(out, lse, out_ptr, lse_ptr, z, r, d, m, head_dim, WRITE_LSE: tl.constexpr):
    """Write rows ``r`` of segment ``z``: ``out`` in the output dtype and, when asked, ``lse``."""
    r_ok = r < m
    if WRITE_LSE:
        tl.store(lse_ptr + z * m + r, lse, mask=r_ok)
    tl.store(
        out_ptr + (z * m + r)[:, None] * head_dim + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=r_ok[:, None] & (d < head_dim)[None, :],
    )


def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter on the CPU (tests): any small number


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # plain integers: triton.cdiv is a constexpr function, slow to call from the host


def split_chunk(total: int, width: int, device: torch.device, block: int = BLOCK_N) -> tuple[int, int]:
    """Slots per split and splits per segment for a layer of ``total`` slots, widest segment ``width``.

    About :data:`PROGRAMS_PER_SM` programs per multiprocessor over the whole layout, each at most
    ``chunk`` slots (a multiple of ``block``), so a skewed segment gets more splits, not longer ones.
    """
    target = PROGRAMS_PER_SM * _multiprocessors(device)
    chunk = max(block, _cdiv(_cdiv(max(total, 1), target), block) * block)
    return chunk, max(1, _cdiv(width, chunk))


arrival_counter_buffers: dict[tuple, torch.Tensor] = {}


def _arrival_counters(device: torch.device, stream: int, count: int) -> torch.Tensor:
    """``(>= count,)`` int32 zeros shared by the launches on ``stream`` (the raw CUDA stream the kernel
    runs on, 0 off CUDA); each launch leaves them zero. Launches on one stream run one after another,
    so they can share the counters; another stream, which may run at the same time, gets its own."""
    counters = arrival_counter_buffers.get((device, stream))
    if counters is None or counters.numel() < count:
        counters = torch.zeros(max(count, 4096), dtype=torch.int32, device=device)
        arrival_counter_buffers[(device, stream)] = counters
    return counters


SCRATCH_KEPT = 1 << 20
"""Largest split scratch (float32 elements, 4 MiB) kept between launches; a larger one is allocated
for its launch only."""

_scratch: dict[tuple, torch.Tensor] = {}


def _split_scratch(device: torch.device, stream: int, count: int) -> torch.Tensor:
    """``(>= count,)`` float32 for the partial results of the splits, shared like the arrival counters
    by the launches on one stream (each launch writes it before reading it) when it is not too big."""
    if count > SCRATCH_KEPT:
        return torch.empty(count, device=device, dtype=torch.float32)
    scratch = _scratch.get((device, stream))
    if scratch is None or scratch.numel() < count:
        scratch = torch.empty(max(count, 1 << 12), device=device, dtype=torch.float32)
        _scratch[(device, stream)] = scratch
    return scratch


def _mask_strides(mask: torch.Tensor, shape: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """Strides that read ``mask`` broadcast to ``shape`` (0 along its size-1 dimensions)."""
    if mask.dim() != 4 or any(have not in (1, want) for have, want in zip(mask.shape, shape)):
        raise ValueError(f"the tail mask {tuple(mask.shape)} does not broadcast to {shape}")
    return tuple(0 if have == 1 else stride for have, stride in zip(mask.shape, mask.stride()))


_last_mask: tuple = (None,)
MASK_KEPT = 1 << 22
"""Largest mask (elements) that :func:`_kernel_mask` keeps a reference to until the next launch."""


def _kernel_mask(mask: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``mask`` as the kernel reads it (a bool mask as uint8) and its broadcast strides for ``shape``.

    Every layer of a forward pass gets the same mask object: the last answer is kept, for that object
    and shape (the kept reference stops the object's id from being reused), unless the mask is large
    (not a decoding step's), so that its memory is freed with the pass."""
    global _last_mask
    # Memo (host_overhead --memos, CPU): 0.1 us against 4.3-6.8 for the view and strides, per layer of a masked step.
    last = _last_mask
    if last[0] is mask and last[1] == shape:
        return last[2], last[3]
    strides = _mask_strides(mask, shape)
    read = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    _last_mask = (mask, shape, read, strides) if mask.numel() <= MASK_KEPT else (None,)
    return read, strides


# ---------------------------------------------------------------------------------------------- launch

_INT_NAMES = (
    "kv_heads", "group", "rows", "m", "head_dim", "chunk", "prefix_splits", "n_tail",
    "s_qb", "s_qh", "s_qi", "s_kt", "s_vt", "s_tkb", "s_tkh", "s_tkn", "s_tvb", "s_tvh", "s_tvn",
    "s_mb", "s_mh", "s_mi", "s_mj",
)  # fmt: skip
_FLAG_NAMES = ("HAS_BIAS", "HAS_TAIL", "HAS_MASK", "MASK_BOOL", "CAUSAL", "IEEE", "WRITE_LSE", "BLOCK_M", "BLOCK_N", "BLOCK_D")
_SCALE_AT = _INT_NAMES.index("s_qb")  # the float ``scale`` sits between n_tail and the strides
# The integers Triton specialises on (divisible by 16, equal to 1): every other one is do_not_specialize.
_SPECIALISED = tuple(i for i, name in enumerate(_INT_NAMES) if name not in _NOT_SPECIALISED)
_INT32 = 2**31
_compiled: dict[tuple, object] = {}  # the direct launch's kernels: 11-27 us saved a launch on H100 (launch)

DIRECT_LAUNCH_TRITON = ((3, 6),)
"""Triton releases ``(major, minor)`` whose launcher the direct launch was written and tested against
(triton 3.6.0 on H100 and H200): it passes ``CompiledKernel.run`` its arguments by position, an
internal protocol that a release may change. The CPU tests' Triton (3.9) only interprets, and its
interpreter returns no compiled kernel to relaunch, so no other release has been run this way."""


def direct_launch_tested(version: str) -> bool:
    """Whether Triton ``version`` (``triton.__version__``) is a release of :data:`DIRECT_LAUNCH_TRITON`."""
    return Version(version).release[:2] in DIRECT_LAUNCH_TRITON


# Not in Triton's interpreter either (TRITON_INTERPRET=1 makes the kernel an InterpretedFunction,
# which launches nothing compiled).
direct_launch = direct_launch_tested(triton.__version__) and isinstance(_varlen_kernel, triton.runtime.JITFunction)
"""Relaunch compiled kernels without ``JITFunction.run`` (see :func:`launch`); False: always through it."""

# Looked up once: absent from CPU builds of torch (and from Triton before its knobs).
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
_get_device = getattr(torch._C, "_cuda_getDevice", None)
_runtime_knobs = getattr(getattr(triton, "knobs", None), "runtime", None)


def _current_stream(index: int) -> int:
    """The raw current CUDA stream of device ``index``, as Triton reads it."""
    return _raw_stream(index) if _raw_stream is not None else torch.cuda.current_stream(index).cuda_stream


def _current_device() -> int:
    """The current CUDA device, where Triton launches (CUDA is initialised: the tensors are on it)."""
    return _get_device() if _get_device is not None else torch.cuda.current_device()


_DTYPE = operator.attrgetter("dtype")
_DATA_PTR = operator.methodcaller("data_ptr")
_SPECIALISED_VALUES = operator.itemgetter(*_SPECIALISED)


def _launch_hooks_set() -> bool:
    """Whether a profiler has set Triton's launch hooks (``triton.knobs.runtime``)."""
    runtime = _runtime_knobs
    if runtime is None:
        return False
    # A hook is a HookChain (its list of calls, empty when unused) in recent Triton, else a callable or None.
    enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
    if enter is not None and bool(getattr(enter, "calls", True)):
        return True
    return leave is not None and bool(getattr(leave, "calls", True))


def _alignment(pointers: tuple) -> bool | tuple[bool, ...]:
    """What Triton specialises a pointer on: whether it is 16-byte aligned. True when every pointer
    is (one reduction, the common case); else each pointer's alignment. A masked decoding step has
    one misaligned pointer at every step: its tail mask is a view one column into the model's mask
    (:func:`zigzag.cache.attention.appended_mask`), one element past an aligned allocation."""
    if functools.reduce(operator.or_, pointers) % 16 == 0:
        return True
    return tuple(p % 16 == 0 for p in pointers)


def _launch_key(pointers: tuple, tensors: tuple, integers: tuple, flags: tuple) -> tuple | None:
    """A key at least as fine as what decides which compiled kernel Triton picks: the constexprs, the
    dtypes, the values of the integers Triton specialises on (it looks at their divisibility by 16
    only) and the pointers' 16-byte alignment (:func:`_alignment`). None (launch through Triton) when
    an integer does not fit in int32 (Triton would pick another specialisation).
    ``pointers``: the tensors' ``data_ptr()``."""
    if max(integers) >= _INT32 or min(integers) < 0:
        return None
    return flags, tuple(map(_DTYPE, tensors)), _SPECIALISED_VALUES(integers), _alignment(pointers)


def _runtime_args(tensors: tuple, integers: tuple, scale: float) -> tuple:
    """The kernel's non-constexpr arguments in signature order (the tensors, then ``_INT_NAMES`` with
    ``scale`` in its place)."""
    return (*tensors, *integers[:_SCALE_AT], scale, *integers[_SCALE_AT:])


def launch_through_triton(grid: tuple[int, int, int], tensors: tuple, integers: tuple, scale: float, flags: tuple):
    """``_varlen_kernel[grid](...)``: Triton binds and specialises every argument. Returns what Triton
    returns (the compiled kernel on CUDA)."""
    return _varlen_kernel[grid](*_runtime_args(tensors, integers, scale), **dict(zip(_FLAG_NAMES, flags)))


def _launch_on(where: tuple[int, int] | None, grid: tuple, tensors: tuple, integers: tuple, scale: float, flags: tuple):
    """:func:`launch` with ``where = (current device, its raw current stream)`` already read, or None:
    through Triton (off CUDA, direct launches off, or launch hooks set)."""
    key = None
    if where is not None:
        pointers = tuple(map(_DATA_PTR, tensors))
        key = _launch_key(pointers, tensors, integers, flags)
        kernel = _compiled.get((where[0], key)) if key is not None else None
        if kernel is not None:
            # Pointers as integers: Triton's launcher takes them as they are (a tensor costs it a
            # data_ptr() call and a driver query each).
            kernel.run(
                *grid, where[1], kernel.function, kernel.packed_metadata, None, None, None,
                *_runtime_args(pointers, integers, scale), *flags,
            )  # fmt: skip
            return
    kernel = launch_through_triton(grid, tensors, integers, scale, flags)
    if key is not None and all(hasattr(kernel, a) for a in ("run", "function", "packed_metadata")):
        _compiled[(where[0], key)] = kernel  # not in Triton's interpreter, which returns no compiled kernel


def _direct_target(on_cuda: bool) -> tuple[int, int] | None:
    """``(current device, its raw current stream)`` when a launch may skip ``JITFunction.run``, else None."""
    if not (on_cuda and direct_launch) or _launch_hooks_set():
        return None
    device = _current_device()
    return device, _current_stream(device)


def launch(grid: tuple[int, int, int], tensors: tuple, integers: tuple, scale: float, flags: tuple) -> None:
    """Launch :func:`_varlen_kernel`.

    ``kernel[grid](...)`` binds and specialises every argument and hashes the result on each call:
    tens of microseconds, on a path that runs once per layer per decoded token and is bound by the
    host. The first launch of each specialisation goes through it and keeps the compiled kernel; the
    next ones with the same :func:`_launch_key` call that kernel's launcher directly, with the
    arguments Triton would pass (all of them, in signature order). Measured on H100s with triton
    3.6 (``python -m benchmarks.perf.host_overhead --slots 1024``, benchmarks/RESULTS.md, fourth
    round): 17.1-26.5 us of host time per launch direct against 28.5-54.1 us through
    ``JITFunction.run``, 11-27 us saved per layer and decoded token.

    Only where :data:`direct_launch` holds (a Triton release of :data:`DIRECT_LAUNCH_TRITON`, not the
    interpreter) and for CUDA tensors; while a profiler has set Triton's launch hooks, every launch
    goes through Triton, which calls them."""
    # Triton keeps compiled kernels per current device (a kernel handle belongs to one device): so do we.
    _launch_on(_direct_target(tensors[0].is_cuda), grid, tensors, integers, scale, flags)


class Prefix(NamedTuple):
    """The flat prefix of one layout with what every launch over it shares, checked and computed once
    (:func:`build_prefix`): a varlen layer keeps one while its index does not change."""

    keys: torch.Tensor  # (total, head_dim), unit last stride
    values: torch.Tensor  # (total, head_dim), unit last stride
    offsets: torch.Tensor  # (Z + 1,) integer
    bias: torch.Tensor | None  # (total,) float32, or None
    kv_heads: int
    head_dim: int
    chunk: int  # slots per split (split_chunk)
    prefix_splits: int  # splits of the widest segment
    strides: tuple[int, int]  # row strides of keys and values
    block_d: int  # head_dim rounded up to a power of two, at least 16
    device: torch.device
    on_cuda: bool


def build_prefix(
    keys: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    kv_heads: int,
    width: int,
    split_plan: tuple[int, int] | None = None,
) -> Prefix:
    """A :class:`Prefix` for :func:`attend`; the arguments are :func:`varlen_attention`'s."""
    if keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError("the flat prefix keys and values need a unit last stride")
    device = keys.device
    chunk, prefix_splits = split_plan if split_plan is not None else split_chunk(keys.shape[0], width, device)
    head_dim = keys.shape[1]
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    strides = (keys.stride(0), values.stride(0))
    cuda = device.type == "cuda"
    return Prefix(keys, values, offsets, bias, kv_heads, head_dim, chunk, prefix_splits, strides, block_d, device, cuda)


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
    return_lse: bool = True,
    split_plan: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of ``query`` over a flat varlen prefix and (optionally) a dense tail, in one launch.

    Args:
        query: ``(batch, Hq, rows, d)``, any strides with a unit last stride.
        keys, values: ``(total, d)`` flat prefix with a unit last stride; segment
            ``z = row * kv_heads + head`` is ``offsets[z]:offsets[z + 1]``.
        offsets: ``(batch * kv_heads + 1,)`` integer, on the query's device.
        bias: ``(total,)`` float32 added to each prefix slot's logit, or None.
        kv_heads: KV heads per row (``Hq % kv_heads == 0``).
        width: the longest segment (sets the number of splits; no sync to find it).
        scale: logit scale.
        tail_keys, tail_values: ``(batch, kv_heads, n, d)`` appended tokens (unit last stride), or None;
            ``(batch, Hq, n, d)`` (KV heads repeated for GQA, as some attention code does) works too.
        tail_mask: broadcastable to ``(batch, Hq, rows, n)``, bool (True = attend) or additive float, or
            None: then all tail tokens are visible, or causally aligned to the end when ``causal``.
        causal: see ``tail_mask``.
        out_dtype: dtype of ``out`` (default: the query's).
        return_lse: also return the log-sum-exp (else None, and it is never written).
        split_plan: :func:`split_chunk` of this layout (``(chunk, prefix splits)``), when the caller keeps
            it; computed here otherwise.

    Returns:
        ``out (batch, Hq, rows, d)`` in ``out_dtype`` and ``lse (batch, Hq, rows)`` float32; a row that
        sees nothing gets ``out = 0`` and ``lse = -inf``.
    """
    prefix = build_prefix(keys, values, offsets, bias, kv_heads=kv_heads, width=width, split_plan=split_plan)
    return attend(prefix, query, scale, out_dtype or query.dtype, tail_keys, tail_values, tail_mask, causal, return_lse)


def attend(
    prefix: Prefix,
    query: torch.Tensor,
    scale: float,
    out_dtype: torch.dtype,
    tail_keys: torch.Tensor | None = None,
    tail_values: torch.Tensor | None = None,
    tail_mask: torch.Tensor | None = None,
    causal: bool = False,
    return_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`varlen_attention` over a :class:`Prefix` built beforehand: what a decoding step runs.

    The arguments and the result are :func:`varlen_attention`'s, positional, ``out_dtype`` required.

    Under torch.compile (``torch.compiler.is_compiling()``) this calls the operator
    ``zigzag::varlen_attention`` (:func:`varlen_attention_op`), which the compiler traces as one node.
    Eager calls launch directly (:func:`_attend_eager`): the dispatcher's way into a Python
    ``custom_op`` measured 28 us per call on a CPU where the same Python function called plainly took
    3 us (torch 2.13, a stand-in op of this signature), about the host time of the whole direct
    launch on an H100 (:func:`launch`), on a path bound by the host."""
    if torch.compiler.is_compiling():
        out, lse = varlen_attention_op(
            query, prefix.keys, prefix.values, prefix.offsets, prefix.bias, tail_keys, tail_values, tail_mask,
            prefix.kv_heads, prefix.chunk, prefix.prefix_splits, float(scale), causal, out_dtype, return_lse,
        )  # fmt: skip
        return out, lse if return_lse else None
    return _attend_eager(prefix, query, scale, out_dtype, tail_keys, tail_values, tail_mask, causal, return_lse)


@torch.library.custom_op("zigzag::varlen_attention", mutates_args=())
def varlen_attention_op(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    bias: torch.Tensor | None,
    tail_keys: torch.Tensor | None,
    tail_values: torch.Tensor | None,
    tail_mask: torch.Tensor | None,
    kv_heads: int,
    chunk: int,
    prefix_splits: int,
    scale: float,
    causal: bool,
    out_dtype: torch.dtype,
    return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attend` as an operator, the prefix as its tensors and split plan (``chunk``,
    ``prefix_splits``: :func:`split_chunk`). Returns ``out (batch, Hq, rows, d)`` in ``out_dtype`` and
    ``lse (batch, Hq, rows)`` float32, or an empty ``(0,)`` lse when ``return_lse`` is False."""
    prefix = build_prefix(keys, values, offsets, bias, kv_heads=kv_heads, width=0, split_plan=(chunk, prefix_splits))
    out, lse = _attend_eager(prefix, query, scale, out_dtype, tail_keys, tail_values, tail_mask, causal, return_lse)
    return out, lse if lse is not None else query.new_empty(0, dtype=torch.float32)


@varlen_attention_op.register_fake
def _(query, keys, values, offsets, bias, tail_keys, tail_values, tail_mask, kv_heads, chunk, prefix_splits, scale,
      causal, out_dtype, return_lse):
    batch, hq, rows, head_dim = query.shape
    lse_shape = (batch, hq, rows) if return_lse else (0,)
    return query.new_empty(batch, hq, rows, head_dim, dtype=out_dtype), query.new_empty(lse_shape, dtype=torch.float32)


def _attend_eager(
    prefix: Prefix,
    query: torch.Tensor,
    scale: float,
    out_dtype: torch.dtype,
    tail_keys: torch.Tensor | None,
    tail_values: torch.Tensor | None,
    tail_mask: torch.Tensor | None,
    causal: bool,
    return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`attend` without the operator: argument assembly and :func:`_launch_on`."""
    batch, hq, rows, head_dim = query.shape
    if head_dim != prefix.head_dim:
        raise ValueError(f"the query's head_dim is {head_dim}, the prefix's {prefix.head_dim}")
    kv_heads = prefix.kv_heads
    group = hq // kv_heads
    z_count, m = batch * kv_heads, group * rows
    device = prefix.device
    if query.stride(-1) != 1:
        query = query.contiguous()
    keys, values = prefix.keys, prefix.values
    block_m = 16 if m <= 16 else 64
    block_d = prefix.block_d
    chunk, prefix_splits = prefix.chunk, prefix.prefix_splits
    n_tail = tail_keys.shape[2] if tail_keys is not None else 0
    has_tail = n_tail > 0
    if has_tail:
        tail_shape = tail_keys.shape
        if tail_shape[1] not in (kv_heads, hq) or tail_values.shape != tail_shape:
            raise ValueError(
                f"tail keys {tuple(tail_shape)} / values {tuple(tail_values.shape)} must be "
                f"(batch, {kv_heads} or {hq}, n, d)"
            )
        # Batch, KV-head and slot strides. When the model repeated its KV heads for GQA (Hq heads),
        # head h * Hq / kv_heads is a copy of KV head h: read that one.
        per_head = tail_shape[1] // kv_heads
        s_tkb, s_tkh, s_tkn, _ = tail_keys.stride()
        s_tvb, s_tvh, s_tvn, _ = tail_values.stride()
        tail_strides = (s_tkb, s_tkh * per_head, s_tkn, s_tvb, s_tvh * per_head, s_tvn)
        tail_k, tail_v = tail_keys, tail_values
    else:
        tail_strides = (0, 0, 0, 0, 0, 0)
        tail_k, tail_v = keys, values
    splits = prefix_splits + has_tail
    row_blocks = _cdiv(m, block_m)

    mask = tail_mask if has_tail else None
    mask_bool = mask is not None and mask.dtype == torch.bool
    if mask is not None:
        mask, mask_strides = _kernel_mask(mask, (batch, hq, rows, n_tail))
    else:
        mask_strides = (0, 0, 0, 0)

    where = _direct_target(prefix.on_cuda)
    # The stream the kernel runs on (the current device's, as Triton launches), for the counters.
    stream = where[1] if where is not None else _current_stream(_current_device()) if prefix.on_cuda else 0
    # One float32 scratch holds the partial outputs (Z, S, m, BLOCK_D) then the partial lse (Z, S, m).
    part = _split_scratch(device, stream, z_count * splits * m * (block_d + 1) if splits > 1 else 1)
    counters = _arrival_counters(device, stream, z_count * row_blocks)
    out = torch.empty(batch, hq, rows, head_dim, device=device, dtype=out_dtype)
    lse = torch.empty(batch, hq, rows, device=device, dtype=torch.float32) if return_lse else None
    bias = prefix.bias
    tensors = (
        query, keys, values, bias if bias is not None else keys, prefix.offsets, tail_k, tail_v,
        mask if mask is not None else keys, part, counters, out, lse if return_lse else out,
    )  # fmt: skip
    integers = (
        kv_heads, group, rows, m, head_dim, chunk, prefix_splits, n_tail,
        *query.stride()[:3], *prefix.strides, *tail_strides, *mask_strides,
    )  # fmt: skip
    flags = (
        bias is not None, has_tail, mask is not None, mask_bool, has_tail and mask is None and causal and rows > 1,
        query.dtype == torch.float32, return_lse, block_m, BLOCK_N, block_d,
    )  # fmt: skip
    _launch_on(where, (z_count, splits, row_blocks), tensors, integers, float(scale), flags)
    return out, lse


__all__ = [
    "DIRECT_LAUNCH_TRITON",
    "PROGRAMS_PER_SM",
    "Prefix",
    "attend",
    "build_prefix",
    "direct_launch_tested",
    "split_chunk",
    "varlen_attention",
    "varlen_attention_op",
]

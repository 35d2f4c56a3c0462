"""The Triton varlen kernels (zigzag.kernels.varlen_triton) against a float64 reference, on fresh random inputs.

Without CUDA they run in Triton's interpreter on the CPU (tests/conftest.py sets TRITON_INTERPRET);
the products are then numpy's, so this checks the algorithm (splits, tail, masks, reduction), and the
GPU test at the end checks the compiled kernels."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from zigzag.kernels.varlen_triton import split_chunk, varlen_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _reference(query, keys, values, offsets, bias, kv_heads, scale, tail_k=None, tail_v=None, tail_mask=None, causal=False):
    """Float64 loop over (row, KV head): softmax over the segment's slots and the tail, then its lse."""
    batch, hq, rows, d = query.shape
    group = hq // kv_heads
    out = torch.zeros(batch, hq, rows, d, dtype=torch.float64)
    lse = torch.full((batch, hq, rows), float("-inf"), dtype=torch.float64)
    for b in range(batch):
        for h in range(kv_heads):
            z = b * kv_heads + h
            s, e = int(offsets[z]), int(offsets[z + 1])
            k, v = keys[s:e].double().cpu(), values[s:e].double().cpu()
            extra = torch.zeros(e - s, dtype=torch.float64) if bias is None else bias[s:e].double().cpu()
            n = 0 if tail_k is None else tail_k.shape[2]
            if n:
                k = torch.cat([k, tail_k[b, h].double().cpu()])
                v = torch.cat([v, tail_v[b, h].double().cpu()])
            for j in range(group):
                head = h * group + j
                logits = query[b, head].double().cpu() @ k.T * scale  # (rows, slots + n)
                logits[:, : e - s] += extra
                if n:
                    if tail_mask is not None:
                        m = tail_mask[b if tail_mask.shape[0] > 1 else 0, head if tail_mask.shape[1] > 1 else 0].cpu()
                        add = torch.where(m, 0.0, float("-inf")) if m.dtype == torch.bool else m.double()
                        logits[:, e - s :] += add
                    elif causal and rows > 1:
                        i = torch.arange(rows)[:, None]
                        jj = torch.arange(n)[None, :]
                        logits[:, e - s :] = logits[:, e - s :].masked_fill(jj > i + (n - rows), float("-inf"))
                row_lse = logits.logsumexp(-1)
                seen = torch.isfinite(row_lse)
                probs = torch.exp(logits - torch.where(seen, row_lse, 0.0)[:, None])
                out[b, head] = torch.where(seen[:, None], probs @ v, 0.0)
                lse[b, head] = row_lse
    return out, lse


def _layout(lengths: torch.Tensor, d: int, dtype, gen):
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.flatten().cumsum(0)])
    total = int(lengths.sum())
    keys = torch.randn(total, d, generator=gen).to(DEVICE, dtype)
    values = torch.randn(total, d, generator=gen).to(DEVICE, dtype)
    return keys, values, offsets.to(DEVICE), total


TOLERANCE = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}
# Triton's interpreter multiplies bfloat16 tiles wrongly (numpy has no bfloat16), so bfloat16 runs on
# CUDA only; float16 exercises the same low-precision path (products in the input dtype) on the CPU.
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


def _check(out, lse, ref_out, ref_lse, dtype):
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double().cpu(), ref_out, atol=tol, rtol=0)
    assert torch.equal(torch.isinf(lse).cpu(), torch.isinf(ref_lse))
    torch.testing.assert_close(lse.double().cpu().nan_to_num(0, 0, 0), ref_lse.nan_to_num(0, 0, 0), atol=tol, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "head_dim", "with_bias"), [(1, 64, False), (1, 16, True), (20, 80, False), (3, 32, True)])
def test_prefix_matches_float64(dtype, rows, head_dim, with_bias):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)  # fresh inputs every run
    kv_heads, group = 3, 4
    # An empty head, a one-slot head, and a head many times the others (several splits).
    lengths = torch.tensor([[40, 0, 3], [900, 17, 1]])
    keys, values, offsets, total = _layout(lengths, head_dim, dtype, gen)
    query = torch.randn(2, kv_heads * group, rows, head_dim, generator=gen).to(DEVICE, dtype)
    bias = torch.rand(total, generator=gen).to(DEVICE) if with_bias else None
    _chunk, splits = split_chunk(total, 900, torch.device(DEVICE))
    assert splits > 1  # the long head really is split
    out, lse = varlen_attention(query, keys, values, offsets, bias, kv_heads=kv_heads, width=900, scale=0.125, out_dtype=torch.float32)
    ref_out, ref_lse = _reference(query, keys, values, offsets, bias, kv_heads, 0.125)
    _check(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["none", "causal", "bool_per_head", "float_broadcast"])
@pytest.mark.parametrize("rows", [1, 5])
def test_tail_matches_float64(dtype, mask_kind, rows):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    batch, kv_heads, group, d, n = 2, 2, 3, 32, 9
    lengths = torch.tensor([[70, 0], [5, 130]])  # row 0 head 1 sees the tail only
    keys, values, offsets, _total = _layout(lengths, d, dtype, gen)
    # The tail is a slice of a larger buffer (as VarlenLayer keeps it): strided, not contiguous.
    buffer_k = torch.randn(batch, kv_heads, n + 7, d, generator=gen).to(DEVICE, dtype)
    buffer_v = torch.randn(batch, kv_heads, n + 7, d, generator=gen).to(DEVICE, dtype)
    tail_k, tail_v = buffer_k[:, :, :n], buffer_v[:, :, :n]
    # The query as transformers hands it to SDPA: (batch, heads, rows, d) transposed from (batch, rows, heads, d).
    query = torch.randn(batch, rows, kv_heads * group, d, generator=gen).to(DEVICE, dtype).transpose(1, 2)
    mask, causal = None, False
    if mask_kind == "causal":
        causal = True
    elif mask_kind == "bool_per_head":
        mask = torch.rand(batch, kv_heads * group, rows, n, generator=gen) > 0.3
        mask[0, 4] = False  # a query head of row 0's tail-only KV head sees nothing at all
        mask = mask.to(DEVICE)
    elif mask_kind == "float_broadcast":
        mask = torch.where(torch.rand(1, 1, rows, n, generator=gen) > 0.5, 0.0, -1e9)
        # Every query row sees one tail token: a row that sees nothing, in a head with no prefix, has
        # no defined answer under a finite -1e9 mask (about one draw in a hundred made one).
        mask[..., 0] = 0.0
        mask = mask.to(DEVICE)
    out, lse = varlen_attention(
        query, keys, values, offsets, None, kv_heads=kv_heads, width=130, scale=0.2,
        tail_keys=tail_k, tail_values=tail_v, tail_mask=mask, causal=causal, out_dtype=torch.float32,
    )  # fmt: skip
    ref_out, ref_lse = _reference(query, keys, values, offsets, None, kv_heads, 0.2, tail_k, tail_v, mask, causal)
    _check(out, lse, ref_out, ref_lse, dtype)


def test_output_dtype_and_shape():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([[4, 6]])
    keys, values, offsets, _ = _layout(lengths, 16, torch.float16, gen)
    query = torch.randn(1, 4, 1, 16, generator=gen).to(DEVICE, torch.float16)
    out, lse = varlen_attention(query, keys, values, offsets, None, kv_heads=2, width=6, scale=0.25)
    assert out.shape == (1, 4, 1, 16) and out.dtype == torch.float16
    assert lse.shape == (1, 4, 1) and lse.dtype == torch.float32


def test_merge_counters_are_left_zero_for_the_next_launch():
    """The last program of each segment merges the splits and zeroes its arrival counter; a second
    launch with a different layout must then merge correctly too (a counter left non-zero would make
    the wrong program merge, or none)."""
    from zigzag.kernels.varlen_triton import arrival_counter_buffers

    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    for lengths in (torch.tensor([[300, 5, 0]]), torch.tensor([[7, 260, 64], [1, 0, 190]])):
        keys, values, offsets, total = _layout(lengths, 32, torch.float32, gen)
        query = torch.randn(lengths.shape[0], 6, 2, 32, generator=gen).to(DEVICE)
        width = int(lengths.max())
        assert split_chunk(total, width, torch.device(DEVICE))[1] > 1
        out, lse = varlen_attention(query, keys, values, offsets, None, kv_heads=3, width=width, scale=0.3)
        ref_out, ref_lse = _reference(query, keys, values, offsets, None, 3, 0.3)
        _check(out, lse, ref_out, ref_lse, torch.float32)
        assert all(int(c.count_nonzero()) == 0 for c in arrival_counter_buffers.values())


def test_without_lse_and_mask_that_does_not_broadcast():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([[30, 2]])
    keys, values, offsets, _ = _layout(lengths, 16, torch.float32, gen)
    query = torch.randn(1, 4, 1, 16, generator=gen).to(DEVICE)
    tail = torch.randn(1, 2, 3, 16, generator=gen).to(DEVICE)
    mask = torch.ones(1, 1, 1, 3, dtype=torch.bool, device=DEVICE)
    kwargs = {"kv_heads": 2, "width": 30, "scale": 0.25, "tail_keys": tail, "tail_values": tail}
    out, lse = varlen_attention(query, keys, values, offsets, None, tail_mask=mask, return_lse=False, **kwargs)
    assert lse is None
    full, _ = varlen_attention(query, keys, values, offsets, None, tail_mask=mask, **kwargs)
    assert torch.equal(out, full)
    with pytest.raises(ValueError, match="does not broadcast"):
        varlen_attention(query, keys, values, offsets, None, tail_mask=mask.expand(1, 1, 1, 3)[..., :2], **kwargs)


@pytest.mark.gpu
def test_cuda_in_kernel_merge_has_no_race():
    """Many launches with many splits per segment, run concurrently on the GPU's multiprocessors: the
    atomic arrival count must let exactly the last program merge, after every split's partial result
    is visible. Compared with the PyTorch segment attention (float32) on fresh layouts each time."""
    from zigzag.cache.varlen import segment_attention

    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    for trial in range(40):
        lengths = torch.randint(0, 3000, (3, 4), generator=gen)
        lengths[0, 0] = 20000  # one long segment: dozens of splits
        keys, values, offsets, _total = _layout(lengths, 128, torch.bfloat16, gen)
        query = torch.randn(3, 16, 1, 128, generator=gen).to(DEVICE, torch.bfloat16)
        tail = torch.randn(3, 4, 1 + trial, 128, generator=gen).to(DEVICE, torch.bfloat16)
        out, lse = varlen_attention(
            query, keys, values, offsets, None, kv_heads=4, width=int(lengths.max()), scale=0.09,
            tail_keys=tail, tail_values=tail, out_dtype=torch.float32,
        )  # fmt: skip
        ref_out, ref_lse = segment_attention(query.reshape(12, 4, 128), keys, values, offsets, scale=0.09)
        tail_out, tail_lse = _reference(query, keys[:0], values[:0], torch.zeros(13, dtype=torch.long), None, 4, 0.09, tail, tail)
        both = torch.logaddexp(ref_lse.reshape(3, 16, 1).double().cpu(), tail_lse)
        expect = ref_out.reshape(3, 16, 1, 128).double().cpu() * torch.exp(ref_lse.reshape(3, 16, 1).double().cpu() - both)[..., None]
        expect += tail_out * torch.exp(tail_lse - both)[..., None]
        torch.testing.assert_close(out.double().cpu(), expect, atol=2e-2, rtol=0)
        torch.testing.assert_close(lse.double().cpu(), both, atol=2e-2, rtol=0)


def test_launch_hooks_send_launches_through_triton():
    """A profiler's launch hooks (Triton's HookChain) must see every launch: the direct path steps aside."""
    from zigzag.kernels import varlen_triton as varlen_kernel

    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if runtime is None or not hasattr(runtime.launch_enter_hook, "add"):
        pytest.skip("this Triton has no launch hook chain")
    assert not varlen_kernel._launch_hooks_set()
    hook = lambda *args: None
    runtime.launch_enter_hook.add(hook)
    try:
        assert varlen_kernel._launch_hooks_set()
    finally:
        runtime.launch_enter_hook.remove(hook)
    assert not varlen_kernel._launch_hooks_set()


def test_launch_argument_order_is_the_kernels():
    """The direct launch passes arguments by position: its name lists must follow the kernel's signature."""
    import inspect

    from zigzag.kernels import varlen_triton as vk

    params = list(inspect.signature(getattr(vk._varlen_kernel, "fn", vk._varlen_kernel)).parameters)
    ints = list(vk._INT_NAMES)
    pointers = [name for name in params if name.endswith("_ptr")]
    assert len(pointers) == 12  # the tensors varlen_attention passes, in this order, first
    expected = pointers + ints[: vk._SCALE_AT] + ["scale"] + ints[vk._SCALE_AT :] + list(vk._FLAG_NAMES)
    assert params == expected


def test_direct_launch_is_for_the_tested_triton_releases_only():
    """The direct launch relies on Triton's internal launcher protocol: on only the releases it was
    tested against, never in the interpreter (which compiles nothing to relaunch)."""
    from zigzag.kernels import varlen_triton as vk

    assert vk.direct_launch_tested("3.6.0") and vk.direct_launch_tested("3.6.1+gitdeadbeef")
    assert not any(vk.direct_launch_tested(v) for v in ("3.5.1", "3.7.0", "3.9.0", "3.10.0", "4.6.0"))
    interpreted = not isinstance(vk._varlen_kernel, triton.runtime.JITFunction)
    assert vk.direct_launch == (vk.direct_launch_tested(triton.__version__) and not interpreted)
    if not vk.direct_launch:
        assert vk._direct_target(True) is None


def test_direct_launch_passes_what_triton_was_given(monkeypatch):
    """The first launch of a specialisation goes through Triton and is kept; the next one calls the
    kept kernel's launcher with the same arguments, pointers as integers, on the current stream. A
    misaligned pointer or a launch hook sends it through Triton again. Stand-ins for CUDA and for the
    compiled kernel (and the direct launch allowed whatever this Triton), so that this runs on the CPU
    too."""
    from zigzag.kernels import varlen_triton as vk

    monkeypatch.setattr(vk, "direct_launch", True)

    class CudaLike(torch.Tensor):  # a tensor that says it is on CUDA, and nothing else
        __torch_function__ = torch._C._disabled_torch_function_impl
        is_cuda = True

    class Compiled:
        function, packed_metadata = "function", "metadata"

        def run(self, *args):
            direct.append(args)

    direct, through = [], []
    captured = []
    real_launch_on = vk._launch_on
    monkeypatch.setattr(vk, "_launch_on", lambda where, *args: captured.append(args))
    gen = torch.Generator().manual_seed(0)
    keys, values, offsets, _ = _layout(torch.tensor([[30, 2]]), 16, torch.float32, gen)
    query = torch.randn(1, 4, 1, 16, generator=gen).to(DEVICE)
    tail = torch.randn(1, 2, 8, 16, generator=gen).to(DEVICE)[:, :, :3]
    kwargs = {"kv_heads": 2, "width": 30, "scale": 0.25, "tail_keys": tail, "tail_values": tail}
    varlen_attention(query, keys, values, offsets, None, **kwargs)
    grid, tensors, integers, scale, flags = captured[0]

    monkeypatch.setattr(vk, "_launch_on", real_launch_on)
    monkeypatch.setattr(vk, "_compiled", {})
    monkeypatch.setattr(vk, "launch_through_triton", lambda *args: through.append(args) or Compiled())
    monkeypatch.setattr(vk, "_current_device", lambda: 3)
    monkeypatch.setattr(vk, "_current_stream", lambda index: 1000 + index)
    hooks = [False]
    monkeypatch.setattr(vk, "_launch_hooks_set", lambda: hooks[0])
    tensors = (tensors[0].as_subclass(CudaLike), *tensors[1:])
    vk.launch(grid, tensors, integers, scale, flags)
    assert len(through) == 1 and not direct
    vk.launch(grid, tensors, integers, scale, flags)
    assert len(through) == 1 and len(direct) == 1
    pointers = tuple(t.data_ptr() for t in tensors)
    arguments = vk._runtime_args(pointers, integers, scale)
    assert direct[0] == (*grid, 1003, "function", "metadata", None, None, None, *arguments, *flags)

    odd = torch.zeros(tensors[0].numel() + 1, device=DEVICE)[1:].view(tensors[0].shape).as_subclass(CudaLike)
    vk.launch(grid, (odd, *tensors[1:]), integers, scale, flags)  # 4 bytes off: not 16-byte aligned
    hooks[0] = True
    vk.launch(grid, tensors, integers, scale, flags)
    assert len(through) == 3 and len(direct) == 1


@pytest.mark.parametrize(("with_tail", "return_lse"), [(False, True), (True, False), (True, True)])
def test_operator_passes_opcheck(with_tail, return_lse):
    """zigzag::varlen_attention has a fake and mutates none of its arguments: torch.compile can trace it."""
    from zigzag.kernels.varlen_triton import varlen_attention_op

    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    lengths = torch.tensor([[70, 0], [5, 13]])
    keys, values, offsets, total = _layout(lengths, 16, torch.float32, gen)
    query = torch.randn(2, 4, 2, 16, generator=gen).to(DEVICE)
    bias = torch.rand(total, generator=gen).to(DEVICE)
    tail = mask = None
    if with_tail:
        tail = torch.randn(2, 2, 3, 16, generator=gen).to(DEVICE)
        mask = (torch.rand(2, 1, 2, 3, generator=gen) > 0.3).to(DEVICE)
    chunk, splits = split_chunk(total, 70, torch.device(DEVICE), block=16)
    args = (query, keys, values, offsets, bias, tail, tail, mask, 2, chunk, splits, 0.25, False, torch.float32, return_lse)
    torch.library.opcheck(varlen_attention_op, args)


def test_compiled_attend_calls_the_operator():
    """Under torch.compile, attend is the zigzag::varlen_attention node (fullgraph: no break around
    the launch), and gives the eager result."""
    from zigzag.kernels import varlen_triton as vk

    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    lengths = torch.tensor([[30, 2]])
    keys, values, offsets, _ = _layout(lengths, 16, torch.float32, gen)
    prefix = vk.build_prefix(keys, values, offsets, None, kv_heads=2, width=30)
    query = torch.randn(1, 4, 1, 16, generator=gen).to(DEVICE)
    tail = torch.randn(1, 2, 3, 16, generator=gen).to(DEVICE)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    step = lambda q: vk.attend(prefix, q, 0.25, torch.float32, tail, tail, None, False, True)
    torch._dynamo.reset()
    try:
        out, lse = torch.compile(step, backend=backend, fullgraph=True)(query)
    finally:
        torch._dynamo.reset()
    assert any("zigzag.varlen_attention" in str(node.target) for node in graphs[0].graph.nodes)
    ref_out, ref_lse = step(query)
    torch.testing.assert_close(out, ref_out, atol=0, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=0, rtol=0)


def test_split_scratch_is_shared_per_stream_when_small(monkeypatch):
    from zigzag.kernels import varlen_triton as vk

    monkeypatch.setattr(vk, "_scratch", {})
    device = torch.device(DEVICE)
    first = vk._split_scratch(device, 0, 100)
    assert vk._split_scratch(device, 0, 50).data_ptr() == first.data_ptr()
    assert vk._split_scratch(device, 1, 50).data_ptr() != first.data_ptr()  # another stream
    grown = vk._split_scratch(device, 0, 10**5)
    assert grown.numel() >= 10**5 and vk._split_scratch(device, 0, 100).data_ptr() == grown.data_ptr()
    big = vk._split_scratch(device, 0, vk.SCRATCH_KEPT + 1)
    assert big.numel() == vk.SCRATCH_KEPT + 1 and all(s.numel() <= vk.SCRATCH_KEPT for s in vk._scratch.values())

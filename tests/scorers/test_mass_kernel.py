"""The window-mass Triton kernel (zigzag.kernels.mass_triton) against float64 and the torch path.

Without CUDA the kernel runs in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET): this checks the row layout, the key splits and their merge, the causal and padding
masks and strides on small shapes. The GPU tests check the compiled kernel at Llama-3.1-8B's shape.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

import zigzag.scorers.window as window_module
from zigzag import kernels
from zigzag.kernels.mass_triton import window_mass_op
from zigzag.kernels.mass_triton import window_mass_sum as kernel_mass
from zigzag.scorers import SnapKV, window_mass_sum
from zigzag.scorers.base import LayerView

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(batch, heads, kv_heads, window, seq, head_dim, dtype, strided, gen, query_dtype=None):
    if strided:  # keys as a view of a (batch, seq, kv_heads, wider) buffer, queries transposed
        wide = torch.randn(batch, seq, kv_heads, head_dim + 8, generator=gen)
        keys = wide[..., 4 : 4 + head_dim].transpose(1, 2)
        queries = torch.randn(batch, window, heads, head_dim, generator=gen).transpose(1, 2)
    else:
        keys = torch.randn(batch, kv_heads, seq, head_dim, generator=gen)
        queries = torch.randn(batch, heads, window, head_dim, generator=gen)
    keys = keys * 2  # sharper softmax than unit logits
    return queries.to(DEVICE, query_dtype or dtype), keys.to(DEVICE, dtype)


def _reference(queries, keys, valid, scaling):
    """float64 ``(batch, heads, seq)``: softmax of each window query over the keys it sees, summed."""
    q, k, valid = queries.double().cpu(), keys.double().cpu(), valid.cpu()
    batch, heads, window, _ = q.shape
    seq = k.shape[2]
    k = k.repeat_interleave(heads // k.shape[1], dim=1)
    logits = q @ k.transpose(-1, -2) * scaling  # (batch, heads, window, seq)
    causal = torch.arange(seq)[None, :] <= torch.arange(seq - window, seq)[:, None]
    seen = causal[None, None] & valid[:, None, None, :]
    probs = torch.softmax(logits.masked_fill(~seen, float("-inf")), dim=-1).nan_to_num(0.0)
    return probs.sum(dim=2)


# (batch, heads, kv_heads, window, seq, head_dim, dtype, strided, padded, query dtype): windows below
# 16 and not powers of two (padded rows), groups of 1, 3 and 4 (3: a row block with an empty head
# slot), seq not a multiple of the key block and long enough for several splits, head_dim 80 inside
# a 128 tile, float32 queries over half-precision keys (the pipeline's window queries).
CASES = [
    (2, 4, 2, 5, 37, 16, torch.float32, False, True, None),
    (1, 6, 2, 16, 300, 32, torch.float16, True, False, None),
    (1, 3, 1, 64, 130, 64, torch.bfloat16, False, True, torch.float32),
    (2, 8, 2, 7, 9, 16, torch.float32, True, False, None),
    (1, 4, 4, 3, 200, 80, torch.float32, False, False, None),
    (2, 9, 3, 20, 77, 16, torch.bfloat16, True, True, None),
    (1, 8, 2, 64, 150, 32, torch.bfloat16, True, False, torch.float32),
]


@pytest.mark.parametrize(("batch", "heads", "kv_heads", "window", "seq", "head_dim", "dtype", "strided", "padded", "query_dtype"), CASES)
def test_kernel_matches_float64(batch, heads, kv_heads, window, seq, head_dim, dtype, strided, padded, query_dtype):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    queries, keys = _inputs(batch, heads, kv_heads, window, seq, head_dim, dtype, strided, gen, query_dtype)
    valid = torch.ones(batch, seq, dtype=torch.bool)
    if padded:
        valid[0, : seq // 3] = False  # left padding of row 0 ...
        valid[-1, seq // 2] = False  # ... and a hole (any mask is taken)
    scaling = head_dim**-0.5
    got = kernel_mass(queries, keys, valid.to(DEVICE) if padded else None, scaling, precision="ieee")
    ref = _reference(queries, keys, valid, scaling)
    assert got.shape == (batch, heads, seq) and got.dtype == torch.float32
    # each query's row sums to 1: float32 exponentials and sums, a few ulps of 1 per query
    assert (got.double().cpu() - ref).abs().max() <= 2e-6 * window
    assert torch.allclose(got.double().cpu().sum(-1), torch.full((batch, heads), float(window), dtype=torch.float64), atol=1e-4 * window)


def test_queries_that_see_nothing_add_nothing():
    """Window queries on left padding (row 0 is padding up to its last two tokens) see no valid key."""
    gen = torch.Generator().manual_seed(1)
    queries, keys = _inputs(2, 4, 2, 6, 10, 16, torch.float32, False, gen)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[0, :8] = False
    got = kernel_mass(queries, keys, valid.to(DEVICE), 0.25, precision="ieee").cpu()
    assert torch.isfinite(got).all()
    assert torch.allclose(got[0].sum(-1), torch.full((4,), 2.0), atol=1e-5)  # only the last two queries see a key
    assert (got[0, :, :8] == 0).all()
    assert torch.allclose(got.double(), _reference(queries, keys, valid, 0.25), atol=1e-5)


def test_kernel_checks_arguments():
    q, k = torch.zeros(1, 4, 3, 16, device=DEVICE), torch.zeros(1, 2, 5, 16, device=DEVICE)
    with pytest.raises(ValueError, match="do not match"):
        kernel_mass(q[:, :3], k, None, 1.0)
    with pytest.raises(ValueError, match="same dtype or float32"):
        kernel_mass(q.half(), k, None, 1.0)
    with pytest.raises(ValueError, match="window"):
        kernel_mass(torch.zeros(1, 4, 6, 16, device=DEVICE), k, None, 1.0)
    with pytest.raises(ValueError, match="valid"):
        kernel_mass(q, k, torch.ones(1, 4, dtype=torch.bool, device=DEVICE), 1.0)
    with pytest.raises(ValueError, match="precision"):
        kernel_mass(q, k, None, 1.0, precision="bf16")
    with pytest.raises(ValueError, match="dtype|one of"):
        kernel_mass(q.double(), k.double(), None, 1.0)


@pytest.mark.parametrize("padded", [False, True])
def test_operator_passes_opcheck(padded):
    """zigzag::window_mass_sum has a fake and mutates nothing: torch.compile can trace it."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    queries, keys = _inputs(1, 4, 2, 3, 20, 16, torch.float32, True, gen)
    valid = torch.ones(1, 20, dtype=torch.bool, device=DEVICE)
    valid[0, :3] = False
    config = [16, 32, 16, 16, 4]  # (W, BLOCK_R, BLOCK_N, BLOCK_D, num_warps): two key blocks
    torch.library.opcheck(window_mass_op, (queries, keys, valid if padded else None, 0.25, "ieee", config))


def test_backend_switch(monkeypatch):
    with pytest.raises(ValueError, match="backend"):
        kernels.set_backend("mass", "cuda")
    switch = window_module._MASS_SWITCH
    monkeypatch.setattr(switch, "name", "auto")
    cpu = torch.zeros(1, 2, 5, 16)
    assert not switch.use_kernel(cpu.device, True)  # auto: CUDA only, even under the interpreter
    monkeypatch.setattr(switch, "name", "torch")
    assert not switch.use_kernel(torch.device(DEVICE), True)
    monkeypatch.setattr(switch, "name", "triton")
    assert switch.use_kernel(torch.device(DEVICE), False)
    monkeypatch.setattr(switch, "name", "nonsense")
    with pytest.raises(ValueError, match="ZIGZAG_MASS_BACKEND"):
        switch.use_kernel(torch.device(DEVICE), True)


@pytest.mark.parametrize("padded", [False, True])
def test_dispatch_gives_the_torch_result(monkeypatch, padded):
    """window_mass_sum through the kernel and through window_attention agree, and so do SnapKV's scores."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    queries, keys = _inputs(2, 6, 2, 8, 45, 16, torch.bfloat16, True, gen, torch.float32)
    valid = torch.ones(2, 45, dtype=torch.bool, device=DEVICE)
    if padded:
        valid[1, :11] = False
    out = {}
    for backend in ("torch", "triton"):
        monkeypatch.setattr(window_module._MASS_SWITCH, "name", backend)
        view = LayerView(keys, keys, valid, torch.arange(45, device=DEVICE).expand(2, -1), 0.25, 0, 1, queries, padded=padded)
        out[backend] = window_mass_sum(queries, keys, valid, 0.25, padded), SnapKV(window=8).score(view)
    for a, b in zip(out["torch"], out["triton"]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("dtype", "query_dtype"), [(torch.bfloat16, None), (torch.float32, None), (torch.bfloat16, torch.float32)])
def test_compiled_kernel_at_llama_shape(monkeypatch, dtype, query_dtype):
    """32 query / 8 KV heads, head_dim 128, 64-query window over 5000 keys, against float64."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    queries, keys = _inputs(1, 32, 8, 64, 5000, 128, dtype, True, gen, query_dtype)
    valid = torch.ones(1, 5000, dtype=torch.bool)
    ref = _reference(queries, keys, valid, 128**-0.5)
    got = kernel_mass(queries, keys, None, 128**-0.5, precision="ieee").double().cpu()
    assert (got - ref).abs().max() <= 1e-5 * 64
    monkeypatch.setattr(window_module._MASS_SWITCH, "name", "auto")
    with_tf32 = window_mass_sum(queries, keys, valid.cuda(), 128**-0.5, padded=False).double().cpu()
    exact_products = queries.dtype == torch.bfloat16  # else TF32 rounds the float32 operands
    assert (with_tf32 - ref).abs().max() <= (1e-5 if exact_products else 2e-3) * 64

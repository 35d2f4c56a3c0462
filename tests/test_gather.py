"""zigzag.kernels.gather: the Triton gather kernel against torch.gather (bit for bit), and its dispatch.

Without CUDA the kernel runs in Triton's interpreter on CPU tensors (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

import zigzag.kernels.gather as gather_module
from tests.conftest import tiny_llama
from zigzag import compress_cache, kernels
from zigzag.kernels.gather import gather_split, gather_split_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _states(batch, kv_heads, seq, head_dim, dtype, strided, gen):
    if strided:  # as the model caches them: a (batch, seq, kv_heads, head_dim) projection seen transposed
        return torch.randn(batch, seq, kv_heads, head_dim, generator=gen).to(DEVICE, dtype).transpose(1, 2)
    return torch.randn(batch, kv_heads, seq, head_dim, generator=gen).to(DEVICE, dtype)


def _ranking(batch, kv_heads, seq, n, gen, empty: bool):
    index = torch.stack([torch.randperm(seq, generator=gen)[:n] for _ in range(batch * kv_heads)]).view(batch, kv_heads, n)
    if empty:
        index[0, 0, :2] = -1  # empty slots come out as zeros
    return index.to(DEVICE)


@pytest.mark.parametrize(
    ("batch", "kv_heads", "seq", "n", "width", "head_dim", "dtype", "strided", "empty"),
    [
        (1, 2, 70, 70, 30, 16, torch.float32, False, False),
        (2, 3, 50, 41, 0, 80, torch.bfloat16, True, True),
        (2, 1, 90, 90, 90, 64, torch.float16, True, False),
        (1, 4, 33, 20, 7, 128, torch.bfloat16, False, True),
    ],
)
def test_kernel_equals_torch_gather(monkeypatch, batch, kv_heads, seq, n, width, head_dim, dtype, strided, empty):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    keys, values = (_states(batch, kv_heads, seq, head_dim, dtype, strided, gen) for _ in range(2))
    index = _ranking(batch, kv_heads, seq, n, gen, empty)
    monkeypatch.setattr(gather_module._SWITCH, "name", "triton")
    got = gather_split(keys, values, index, width)
    want = gather_split_torch(keys, values, index, width)
    assert [t.shape for t in got] == [(batch, kv_heads, width, head_dim)] * 2 + [(n - width, batch, kv_heads, head_dim)] * 2
    assert all(t.is_contiguous() for t in got)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    # the reference itself: the rest is rank-major, and empty slots are zeros
    top_keys, _, rest_keys, _ = want
    assert torch.equal(rest_keys.permute(1, 2, 0, 3), keys.gather(2, index[..., width:].clamp(min=0)[..., None].expand(-1, -1, -1, head_dim))
                       * (index[..., width:] >= 0)[..., None])
    if empty and width >= 2:
        assert (top_keys[0, 0, :2] == 0).all()


@pytest.mark.parametrize("width", [0, 5, 12])
def test_second_source_reads_as_if_concatenated(monkeypatch, width):
    """Indices from seq on read a rank-major second source (tokens fetched back from the host)."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    batch, kv_heads, seq, more, head_dim = 2, 3, 9, 4, 16
    keys, values = (_states(batch, kv_heads, seq, head_dim, torch.bfloat16, True, gen) for _ in range(2))
    extra = tuple(torch.randn(more, batch, kv_heads, head_dim, generator=gen).to(DEVICE, torch.bfloat16) for _ in range(2))
    index = _ranking(batch, kv_heads, seq + more, 12, gen, empty=True)
    monkeypatch.setattr(gather_module._SWITCH, "name", "triton")
    got = gather_split(keys, values, index, width, extra)
    joined = [torch.cat([s, e.permute(1, 2, 0, 3)], dim=2) for s, e in zip((keys, values), extra)]
    for a, b in zip(got, gather_split_torch(*joined, index, width)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="extra"):
        gather_split(keys, values, index, width, (extra[0], extra[1][:, :1]))


def test_gather_split_checks_arguments():
    keys = torch.zeros(1, 2, 5, 4, device=DEVICE)
    index = torch.zeros(1, 2, 3, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="alike"):
        gather_split(keys, keys.half(), index)
    with pytest.raises(ValueError, match="index"):
        gather_split(keys, keys, index.int())
    with pytest.raises(ValueError, match="index"):
        gather_split(keys, keys, index[:, :1])
    with pytest.raises(ValueError, match="width"):
        gather_split(keys, keys, index, 4)
    with pytest.raises(ValueError, match="backend"):
        kernels.set_backend("gather", "cuda")


@pytest.mark.parametrize("with_extra", [False, True])
def test_operator_passes_opcheck(with_extra):
    """zigzag::gather_split has a fake and mutates nothing: torch.compile can trace it."""
    from zigzag.kernels.gather_triton import gather_split_op

    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    keys, values = (_states(1, 2, 9, 16, torch.float32, True, gen) for _ in range(2))
    extra = [torch.randn(3, 1, 2, 16, generator=gen).to(DEVICE) for _ in range(2)] if with_extra else [None, None]
    index = _ranking(1, 2, 12 if with_extra else 9, 7, gen, empty=True)
    torch.library.opcheck(gather_split_op, (keys, values, index, 4, *extra))


def test_compress_cache_is_the_same_through_the_kernel(monkeypatch):
    """ZigZag budgets (provisional layers split into kept and parked tokens) and uniform budgets."""
    model = tiny_llama(layers=3).to(DEVICE)
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    for budget in ("zigzag", "uniform"):
        caches = {}
        for backend in ("torch", "triton"):
            monkeypatch.setattr(gather_module._SWITCH, "name", backend)
            caches[backend] = compress_cache(model, ids, 0.6, "knorm", budget)
        for a, b in zip(caches["torch"].layers, caches["triton"].layers):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
            assert torch.equal(a.kept_positions, b.kept_positions)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_kernel_at_llama_shape():
    """8 KV heads, head_dim 128, 32k tokens ranked, half kept: equal to torch.gather."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    keys, values = (_states(1, 8, 32768, 128, torch.bfloat16, True, gen) for _ in range(2))
    index = torch.rand(1, 8, 32768, device=DEVICE).argsort(dim=-1)
    from zigzag.kernels import gather_triton

    got = gather_triton.gather_split(keys, values, index, 16384)
    for a, b in zip(got, gather_split_torch(keys, values, index, 16384)):
        assert torch.equal(a, b)

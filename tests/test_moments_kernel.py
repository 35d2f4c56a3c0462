"""The shifted second-moment kernel of ExpectedAttention's query statistics (zigzag.kernels.moments_triton).

Without CUDA it runs in Triton's interpreter (float16 queries there: the interpreter's bfloat16
rounding is not the GPU's); on CUDA it is compared with the PyTorch path of query_moments_half.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from zigzag import kernels
from zigzag.kernels import moments
from zigzag.kernels.moments_triton import second_moment_op, shifted_second_moment

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _queries(batch, seq, heads, head_dim, dtype, strided, gen):
    """Queries with per-dimension means of a few standard deviations (as real ones have)."""
    q = torch.randn(batch, seq, heads, head_dim, generator=gen) + 3 * torch.randn(1, 1, heads, head_dim, generator=gen)
    if strided:  # a slice of the (batch, seq, heads * head_dim) projection, as the capture passes it
        q = torch.cat([torch.zeros(batch, 5, heads, head_dim), q], dim=1)[:, 5:]
    return q.to(DEVICE, dtype)


@pytest.mark.parametrize(("batch", "seq", "heads", "head_dim", "weighted", "strided"),
                         [(2, 150, 3, 32, True, False), (1, 70, 4, 64, False, True), (1, 33, 2, 80, True, True)])
def test_kernel_matches_float64(batch, seq, heads, head_dim, weighted, strided):
    dtype = torch.float16 if DEVICE == "cpu" else torch.bfloat16
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    q = _queries(batch, seq, heads, head_dim, dtype, strided, gen)
    shift = q.float().mean(dim=1).to(dtype)
    weights = None
    if weighted:
        weights = torch.ones(batch, seq, device=DEVICE)
        weights[0, :7] = 0
    got = shifted_second_moment(q, shift, weights, upcast=DEVICE == "cpu").double().cpu()
    c = (q.float() - shift.float()[:, None]).to(dtype).double().cpu()  # the shifted queries, rounded
    w = weights.double().cpu() if weighted else torch.ones(batch, seq, dtype=torch.float64)
    ref = torch.einsum("bshd,bshe,bs->bhde", c, c, w)
    # exact products, float32 sums of seq terms
    assert (got - ref).abs().max() <= 1e-6 * ref.abs().max() * seq**0.5


@pytest.mark.parametrize("weighted", [False, True])
def test_operator_passes_opcheck(weighted):
    """zigzag::shifted_second_moment has a fake and mutates nothing: torch.compile can trace it."""
    dtype = torch.float16 if DEVICE == "cpu" else torch.bfloat16
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    q = _queries(1, 20, 2, 16, dtype, True, gen)
    shift = q.float().mean(dim=1).to(dtype)
    weights = (torch.rand(1, 20, generator=gen) > 0.3).float().to(DEVICE) if weighted else None
    torch.library.opcheck(second_moment_op, (q, shift, weights, DEVICE == "cpu"))


def test_backend_switch(monkeypatch):
    with pytest.raises(ValueError, match="backend"):
        kernels.set_backend("moments", "cuda")
    monkeypatch.setattr(moments._MOMENTS_SWITCH, "name", "auto")
    assert not moments._MOMENTS_SWITCH.use_kernel(torch.device("cpu"), True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("masked", [False, True])
def test_query_moments_through_the_kernel_match_the_torch_path(monkeypatch, masked):
    """Llama-3.1-8B's query heads (32, head_dim 128) over 3000 tokens, with and without a 0/1 mask."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    q = _queries(1, 3000, 32, 128, torch.bfloat16, True, gen)
    use = count = None
    if masked:
        use = torch.ones(1, 3000, device=DEVICE)
        use[0, :4] = 0
        count = use.sum(-1)[:, None, None]
    out = {}
    for backend in ("torch", "triton"):
        monkeypatch.setattr(moments._MOMENTS_SWITCH, "name", backend)
        out[backend] = moments.query_moments_half(q, use, count)
    torch.testing.assert_close(out["triton"][0], out["torch"][0], atol=0, rtol=0)  # the mean is not the kernel's
    torch.testing.assert_close(out["triton"][1], out["torch"][1], atol=1e-5, rtol=1e-5)  # sums in another order

"""ExpectedAttention's Triton logits kernel (zigzag.kernels.ea_triton) against float64 and the torch path.

Without CUDA the kernel runs in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET), with IEEE float32 products: this checks the indexing, masking, column blocks and
strides on small shapes. The GPU tests at the end check the compiled kernel at Llama-3.1-8B's shape.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

triton = pytest.importorskip("triton")

import zigzag.scorers.expected_attention as ea
from zigzag import kernels
from zigzag.kernels.ea_triton import ea_group_logits, group_logits
from zigzag.kernels.precision import tf32_matmuls, tf32_matmuls_enabled
from zigzag.scorers import ExpectedAttention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _weights(batch: int, kv_heads: int, groups: int, head_dim: int, gen: torch.Generator) -> torch.Tensor:
    """Random ``(batch, kv_heads, head_dim, groups * head_dim + groups)`` float32 ``[Q_1 | ... | m_1 ...]``,
    built by the scorer's own ``_group_weights`` so that the layout is the one the kernel gets."""
    heads = kv_heads * groups
    mean = torch.randn(batch, heads, head_dim, generator=gen)
    quad = torch.randn(batch, heads, head_dim, head_dim, generator=gen) / head_dim
    return ea._group_weights(mean, quad, kv_heads)


def _reference(keys: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``z[b, h, g, i] = k_i^T Q_g k_i + m_g . k_i`` and the same sum over absolute values
    (the scale of float32 rounding), both ``(batch, kv_heads, groups, seq)``."""
    head_dim = keys.shape[-1]
    groups = weights.shape[-1] // (head_dim + 1)
    k, w = keys.double(), weights.double()
    out = []
    for kk, ww in ((k, w), (k.abs(), w.abs())):
        y = kk @ ww  # (batch, kv_heads, seq, groups * d + groups)
        quad = (y[..., : groups * head_dim].unflatten(-1, (groups, head_dim)) * kk[..., None, :]).sum(-1)
        out.append((quad + y[..., groups * head_dim :]).transpose(-1, -2))
    return out[0], out[1]


# (batch, kv_heads, groups, seq, head_dim, dtype, strided, config): seq never a multiple of BLOCK_N;
# head_dim 80 and 48 are masked inside a power-of-two tile; config None is _config's for IEEE, whose
# 32-column blocks re-read the keys' columns from head_dim 64 on; explicit configs cover one block
# of every column (the TF32 configs for head_dim <= 64) and the 64-column blocks of head_dim 128.
CASES = [
    (2, 2, 1, 37, 16, torch.float32, False, None),
    (1, 3, 3, 45, 16, torch.bfloat16, True, None),
    (2, 1, 4, 70, 64, torch.float32, True, None),
    (1, 2, 3, 19, 64, torch.bfloat16, False, (64, 64, 64, 4, 2)),
    (1, 2, 4, 33, 80, torch.bfloat16, True, None),
    (1, 1, 2, 21, 48, torch.float16, False, None),
    (1, 2, 4, 29, 128, torch.float32, True, (32, 128, 64, 8, 2)),
    (1, 1, 3, 17, 128, torch.bfloat16, False, None),
]


@pytest.mark.parametrize(("batch", "kv_heads", "groups", "seq", "head_dim", "dtype", "strided", "config"), CASES)
def test_kernel_matches_float64(batch, kv_heads, groups, seq, head_dim, dtype, strided, config):
    """Fresh random inputs every run; strided keys are a view of a (batch, seq, kv_heads, wider) buffer."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    if strided:
        wide = torch.randn(batch, seq, kv_heads, head_dim + 8, generator=gen).to(DEVICE, dtype)
        keys = wide[..., 4 : 4 + head_dim].transpose(1, 2)
        assert not keys.is_contiguous()
    else:
        keys = torch.randn(batch, kv_heads, seq, head_dim, generator=gen).to(DEVICE, dtype)
    keys[..., :2] *= 8  # outlier dimensions, as in real keys
    weights = _weights(batch, kv_heads, groups, head_dim, gen).to(DEVICE)
    z = group_logits(keys, weights, precision="ieee", config=config)
    ref, scale = _reference(keys.cpu(), weights.cpu())
    assert z.shape == (batch, kv_heads, groups, seq) and z.dtype == torch.float32
    # float32 products and sums: a few units of 2**-24 of the sum of absolute terms per term summed
    assert ((z.double().cpu() - ref).abs() <= 4e-6 * scale).all()


def test_kernel_writes_into_out_and_checks_arguments():
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 2, 9, 16, generator=gen).to(DEVICE)
    weights = _weights(1, 2, 3, 16, gen).to(DEVICE)
    out = torch.full((1, 2, 3, 9), float("nan"), device=DEVICE)
    assert group_logits(keys, weights, out=out, precision="ieee") is out
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="weights"):
        group_logits(keys, weights[..., :-1], precision="ieee")
    with pytest.raises(ValueError, match="out"):
        group_logits(keys, weights, out=out.transpose(-1, -2).contiguous().transpose(-1, -2), precision="ieee")
    with pytest.raises(ValueError, match="precision"):
        group_logits(keys, weights, precision="bf16")
    with pytest.raises(ValueError, match="head_dim"):
        group_logits(torch.zeros(1, 1, 2, 264, device=DEVICE), torch.zeros(1, 1, 264, 265, device=DEVICE))
    assert group_logits(keys[:, :, :0], weights, precision="ieee").shape == (1, 2, 3, 0)


def test_operator_passes_opcheck():
    """zigzag::ea_group_logits writes its ``out`` (declared) and has a fake: torch.compile can trace it."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    keys = torch.randn(1, 2, 9, 16, generator=gen).to(DEVICE)
    weights = _weights(1, 2, 2, 16, gen).to(DEVICE)
    out = torch.empty(1, 2, 2, 9, device=DEVICE)
    torch.library.opcheck(ea_group_logits, (keys, weights, out, "ieee", [64, 16, 16, 4, 2]))


def test_backend_switch(monkeypatch):
    with pytest.raises(ValueError, match="backend"):
        kernels.set_backend("ea", "cuda")
    monkeypatch.setattr(ea._SWITCH, "name", "auto")
    cpu = torch.zeros(1, 2, 5, 16)
    assert not ea._use_kernel(cpu)  # auto: the kernel for CUDA keys only, even under the interpreter
    assert not ea._use_kernel(cpu.double())
    monkeypatch.setattr(ea._SWITCH, "name", "torch")
    assert not ea._use_kernel(cpu)
    monkeypatch.setattr(ea._SWITCH, "name", "triton")
    assert ea._use_kernel(torch.zeros(1, 2, 5, 16, device=DEVICE))


@pytest.mark.parametrize(
    ("lengths", "groups", "kv_heads", "head_dim", "dtype", "strided"),
    [
        ((23, 17), 3, 2, 16, torch.float32, True),  # left padding, a strided cache
        ((30,), 4, 2, 32, torch.bfloat16, False),
        ((12, 19), 1, 3, 80, torch.float32, False),
    ],
)
def test_scorer_kernel_matches_torch_path(kit, monkeypatch, lengths, groups, kv_heads, head_dim, dtype, strided):
    """The whole score with the kernel forced on, against the PyTorch path (chunked, to cross a chunk edge)."""
    monkeypatch.setattr(ea, "_CHUNK", 8)
    scorer = ExpectedAttention(n_future=16, n_sink=2)
    rows = [kit.random_row(n, kv_heads * groups, kv_heads, head_dim) for n in lengths]
    layer = kit.build_for(scorer, rows, dtype=dtype)
    keys = layer.keys.transpose(1, 2).contiguous().transpose(1, 2) if strided else layer.keys
    layer = dataclasses.replace(
        layer,
        keys=keys.to(DEVICE),
        values=layer.values.to(DEVICE),
        valid=layer.valid.to(DEVICE),
        positions=layer.positions.to(DEVICE),
        query_mean=layer.query_mean.to(DEVICE),
        query_cov=layer.query_cov.to(DEVICE),
    )
    monkeypatch.setattr(ea._SWITCH, "name", "torch")
    expected = scorer.score(layer)
    monkeypatch.setattr(ea._SWITCH, "name", "triton")
    got = scorer.score(layer)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def _llama_layer(seq: int, dtype: torch.dtype, kit, heads: int = 32, kv_heads: int = 8, head_dim: int = 128):
    """One row at Llama-3.1-8B's layout, keys a strided view of a (batch, seq, kv_heads, head_dim) cache
    with outlier dimensions, query statistics with a non-zero mean."""
    from zigzag.scorers import LayerView

    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    keys = torch.randn(1, seq, kv_heads, head_dim, generator=gen)
    keys[..., : head_dim // 16] *= 8
    q = torch.randn(1, heads, 2048, head_dim, generator=gen) * 0.7 + torch.randn(1, heads, 1, head_dim, generator=gen)
    mean = q.mean(dim=2)
    centred = q - mean[:, :, None]
    return LayerView(
        keys=keys.to(DEVICE, dtype).transpose(1, 2),
        values=torch.randn(1, kv_heads, seq, head_dim, generator=gen).to(DEVICE, dtype),
        valid=torch.ones(1, seq, dtype=torch.bool, device=DEVICE),
        positions=torch.arange(seq, device=DEVICE)[None],
        scaling=head_dim**-0.5,
        query_mean=mean.to(DEVICE),
        query_cov=(centred.transpose(-1, -2) @ centred / q.shape[2]).to(DEVICE),
        rope=lambda p: kit.rope_cos_sin(p, head_dim),
        padded=False,
    )


LLAMA_SEQ = 32768 + 37  # a partial last block


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_kernel_matches_torch_path_at_llama_shape(kit, monkeypatch, dtype):
    """32k keys (plus a partial block), 8 KV heads of 4 query heads, head_dim 128, strided keys.

    IEEE float32 (TF32 off, PyTorch's default): the two paths agree to float32 rounding. TF32 (as under
    ``zigzag.pipeline.select.score_layer``): the kernel's logits stay within TF32 rounding of float64, and the
    scores of both paths keep the same top half up to near ties."""
    matmul = torch.backends.cuda.matmul
    new_api = hasattr(matmul, "fp32_precision")  # mixing it with allow_tf32 raises

    def tf32(on: bool) -> None:
        monkeypatch.setattr(matmul, *(("fp32_precision", "tf32" if on else "ieee") if new_api else ("allow_tf32", on)))
        assert tf32_matmuls_enabled() == on

    scorer = ExpectedAttention()
    layer = _llama_layer(LLAMA_SEQ, dtype, kit)
    scores = {}
    for backend in ("torch", "triton"):
        monkeypatch.setattr(ea._SWITCH, "name", backend)
        for on in (False, True):
            tf32(on)
            scores[backend, on] = scorer.score(layer)
    tf32(False)
    torch.testing.assert_close(scores["triton", False], scores["torch", False], rtol=2e-5, atol=1e-9)

    keep = layer.keys.shape[2] // 2
    kept = [
        torch.zeros_like(s, dtype=torch.bool).scatter_(-1, s.topk(keep, dim=-1).indices, True)
        for s in (scores["triton", True], scores["torch", True])
    ]
    assert (kept[0] & kept[1]).sum() / kept[0].sum() > 0.98  # TF32 noise reorders near ties at the cut

    gen = torch.Generator().manual_seed(1)
    weights = _weights(1, 8, 4, 128, gen).to(DEVICE)
    keys = layer.keys[:, :, :4099]
    ref, scale = _reference(keys, weights)  # float64 on the GPU
    # TF32 rounds each operand to 10 mantissa bits: about 1e-3 of each term at worst
    for precision, tol in (("ieee", 4e-6), ("tf32", 3e-3)):
        z = group_logits(keys, weights, precision=precision)
        assert ((z.double() - ref).abs() <= tol * scale).all(), precision


def test_tf32_state_reads_what_tf32_matmuls_sets():
    """The kernel picks its precision from tf32_matmuls_enabled(): inside tf32_matmuls() it is on, and
    afterwards it is whatever it was before."""
    before = tf32_matmuls_enabled()
    with tf32_matmuls():
        assert tf32_matmuls_enabled()
    assert tf32_matmuls_enabled() == before


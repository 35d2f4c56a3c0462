"""The ragged cache on CUDA: same logits as the masked reference, and memory really freed."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import tiny_llama
from tests.reference import keep_masks, masked_reference
from zigzag import cache_kwarg, compress_cache

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_compressed_matches_masked_reference(attn, dtype):
    model = tiny_llama(attn, layers=4).to("cuda", dtype)
    batch, seq, q = 2, 200, 7
    ids = torch.randint(0, 128, (batch, seq), device="cuda")
    mask = torch.ones(batch, seq, dtype=torch.long, device="cuda")
    mask[1, :37] = 0
    ctx = {"input_ids": ids, "attention_mask": mask}
    cache = compress_cache(model, ctx, ratio=0.7, scorer="snapkv", budget="zigzag")
    assert all(layer.keys.is_cuda for layer in cache.layers)
    question = torch.randint(0, 128, (batch, q), device="cuda")
    full_mask = torch.cat([mask, torch.ones_like(question)], dim=-1)
    positions = (full_mask.cumsum(-1) - 1)[:, -q:]

    from zigzag import prefill_context

    full = prefill_context(model, ctx, window=0, query_stats_skip=None).cache
    with torch.no_grad():
        ours = model(input_ids=question, attention_mask=full_mask, position_ids=positions, **cache_kwarg(model, cache)).logits
        with masked_reference(model, keep_masks(cache.kept_positions, seq)):
            ref = model(input_ids=question, attention_mask=full_mask, position_ids=positions, **cache_kwarg(model, full)).logits
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    assert (ours.float() - ref.float()).abs().max().item() < tol


def test_cuda_memory_is_freed_and_generate_runs():
    model = tiny_llama("sdpa", layers=4).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 128, (1, 4000), device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    cache = compress_cache(model, ids, ratio=0.75, scorer="knorm", budget="zigzag")
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - base
    full_bytes = 2 * 4 * 2 * 4000 * 16 * 2  # keys + values, 4 layers, 2 kv heads, head_dim 16, bf16
    assert cache.nbytes() <= 0.3 * full_bytes
    assert held <= cache.nbytes() + 64 * 1024  # nothing but the compressed cache stays allocated
    out = model.generate(input_ids=torch.cat([ids, ids[:, :5]], -1), **cache_kwarg(model, copy.copy(cache)), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 4010)


@pytest.mark.parametrize("budget", ["zigzag", "uniform"])
def test_cuda_layerwise_with_host_offload_equals_full_prefill(budget):
    """On CUDA the provisional layers go to pinned host memory on a side stream; nothing may change."""
    from zigzag import prefill_context
    from zigzag.merge import CosineMerge

    model = tiny_llama("sdpa", layers=4).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 128, (2, 3000), device="cuda")
    for merge in (None, CosineMerge(preserve_mass=True)):
        ours = compress_cache(model, ids, 0.6, "expected_attention", budget, merge=merge)
        ref = prefill_context(model, ids).compress(0.6, "expected_attention", budget, merge=merge)
        assert torch.equal(ours.budgets, ref.budgets)
        for a, b in zip(ours.layers, ref.layers):
            assert torch.equal(a.kept_positions, b.kept_positions)
            assert torch.equal(a.keys, b.keys)
            torch.testing.assert_close(a.values, b.values, rtol=1e-2, atol=1e-2)


def test_cuda_chunked_prefill_peak_memory_follows_the_budget():
    # Wide KV heads so that one layer's keys and values, not the tiny MLP, set the unchunked peak.
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=512, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=32768)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval().to("cuda", torch.bfloat16)
    model.set_attn_implementation("sdpa")
    ids = torch.randint(0, 128, (1, 16384), device="cuda")
    peaks = {}
    for chunk in (None, 1024):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        cache = compress_cache(model, ids, 0.875, "knorm", "uniform", chunk_size=chunk)
        torch.cuda.synchronize()
        peaks[chunk] = torch.cuda.max_memory_allocated() - base
        del cache
    assert peaks[1024] < 0.5 * peaks[None], peaks


# --------------------------------------------------------------------------------- varlen layout (head-wise budgets)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_adakv_varlen_matches_masked_reference(attn, dtype, backend, monkeypatch):
    """Head-wise budgets on CUDA: the varlen layout, attended by the Triton kernel (the default) or
    the PyTorch segment path, equals the masked reference through a multi-token continuation and
    decoding steps."""
    from zigzag import kernels, prefill_context
    from zigzag.cache.varlen import VarlenLayer, get_backend

    monkeypatch.setattr(kernels.kernel_switch("varlen"), "name", backend)

    model = tiny_llama(attn, layers=4).to("cuda", dtype)
    batch, seq, q = 2, 300, 7
    ids = torch.randint(0, 128, (batch, seq), device="cuda")
    mask = torch.ones(batch, seq, dtype=torch.long, device="cuda")
    mask[1, :41] = 0
    ctx = {"input_ids": ids, "attention_mask": mask}
    pre = prefill_context(model, ctx)
    cache = pre.compress(0.6, "knorm", "adakv")
    assert get_backend(torch.device("cuda")) == backend
    assert all(isinstance(layer, VarlenLayer) for layer in cache.layers)
    reference = copy.deepcopy(pre.cache)
    keep = keep_masks(cache.kept_positions, seq)
    new_ids = torch.randint(0, 128, (batch, q), device="cuda")
    mask = torch.cat([mask, torch.ones(batch, q, dtype=torch.long, device="cuda")], dim=-1)
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    for step in range(4):
        positions = (mask.cumsum(-1) - 1)[:, -new_ids.shape[1] :]
        kwargs = {"input_ids": new_ids, "attention_mask": mask, "position_ids": positions}
        with torch.no_grad():
            ours = model(**cache_kwarg(model, cache), **kwargs).logits
            with masked_reference(model, keep):
                ref = model(**cache_kwarg(model, reference), **kwargs).logits
        assert (ours.float() - ref.float()).abs().max().item() < tol, f"step {step}"
        new_ids = ref[:, -1:].argmax(-1)
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long, device="cuda")], dim=-1)


def test_cuda_random_varlen_cache_frees_memory_and_equals_dense():
    from zigzag.cache import ZigZagCache
    from zigzag.cache.varlen import VarlenLayer
    from zigzag.testing.random_cache import random_cache

    model = tiny_llama("sdpa", layers=4).to("cuda", torch.bfloat16)
    batch, kv_heads, head_dim, length = 2, 2, 16, 3000
    gen = torch.Generator().manual_seed(0)
    budgets = torch.randint(20, 2500, (batch, 4, kv_heads), generator=gen)
    dense = random_cache(batch, kv_heads, head_dim, budgets, device="cuda", layout="dense", original_length=length)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    varlen = ZigZagCache(
        [VarlenLayer.from_padded(l.keys, l.values, l.kept_positions, length) for l in dense.layers], budgets=dense.budgets
    )
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - base
    assert varlen.nbytes() < dense.nbytes()
    assert held <= varlen.nbytes() + 64 * 1024
    ids = torch.randint(0, 128, (batch, 5), device="cuda")
    mask = torch.ones(batch, length + 5, dtype=torch.long, device="cuda")
    positions = torch.arange(length, length + 5, device="cuda").expand(batch, -1)
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, position_ids=positions, **cache_kwarg(model, dense)).logits
        b = model(input_ids=ids, attention_mask=mask, position_ids=positions, **cache_kwarg(model, varlen)).logits
    assert (a.float() - b.float()).abs().max().item() < 5e-2
    prompt = torch.randint(0, 128, (batch, length + 5 + 3), device="cuda")  # the cache already holds length + 5
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **cache_kwarg(model, varlen),
                         max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (batch, length + 13)


# ---------------------------------------------------------------------------------------------- query statistics


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_query_moments_match_float64(dtype):
    """The half-precision moments (exact products, float32 sums, no float32 copy) against float64, on
    queries with a large mean (the cancellation case), with padding and skipped sinks."""
    from zigzag.kernels.moments import query_moments_half

    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    batch, seq, heads, d = 2, 3000, 4, 64
    q = (torch.randn(batch, seq, heads, d, generator=gen) + 4.0 * torch.randn(1, 1, heads, d, generator=gen)).to("cuda", dtype)
    use = torch.ones(batch, seq)
    use[1, :700] = 0  # padding
    use[:, 700:704] = 0  # sinks
    use = use.cuda()
    count = use.sum(-1)[:, None, None]
    mean, cov = query_moments_half(q, use, count)
    q64, w = q.double(), use.double()
    ref_mean = torch.einsum("bs,bshd->bhd", w, q64) / count.double()
    centered = (q64 - ref_mean[:, None]) * w[:, :, None, None]
    ref_cov = torch.einsum("bshd,bshe->bhde", centered, centered) / count.double()[..., None]
    torch.testing.assert_close(mean.double(), ref_mean, atol=1e-5, rtol=1e-5)
    # Within the queries' own precision (2^-9 relative) of the float64 covariance (variances ~1 here,
    # means up to ~12 standard deviations): what shifting before the float32 sums buys.
    torch.testing.assert_close(cov.double(), ref_cov, atol=4e-3, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_query_moments_without_padding_skip_the_mask(dtype):
    """Without padding the capture passes the columns after the sinks as a slice and no mask: the same
    moments as the masked path, and within the queries' precision of float64."""
    from zigzag.kernels.moments import query_moments_half
    from zigzag.pipeline.capture import QueryCapture

    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    batch, seq, heads, d, skip = 2, 2500, 4, 64, 4
    q = (torch.randn(batch, seq, heads, d, generator=gen) + 4.0 * torch.randn(1, 1, heads, d, generator=gen)).to("cuda", dtype)
    valid = torch.ones(batch, seq, dtype=torch.bool, device="cuda")
    fast = QueryCapture(window=0, stats_skip=skip, heads=heads, head_dim=d, valid=valid, padded=False)
    masked = QueryCapture(window=0, stats_skip=skip, heads=heads, head_dim=d, valid=valid, padded=True)
    projected = q.reshape(batch, seq, heads * d)  # what the query projection's hook sees
    fast.hook(0)(None, None, projected)
    masked.hook(0)(None, None, projected)
    torch.testing.assert_close(fast.mean[0], masked.mean[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.cov[0], masked.cov[0], atol=1e-4, rtol=1e-3)  # shifts may differ by an ulp
    q64 = q[:, skip:].double()
    ref_mean = q64.mean(dim=1)
    centred = q64 - ref_mean[:, None]
    ref_cov = torch.einsum("bshd,bshe->bhde", centred, centred) / (seq - skip)
    torch.testing.assert_close(fast.mean[0].double(), ref_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.cov[0].double(), ref_cov, atol=4e-3, rtol=0)
    with pytest.raises(ValueError, match="both use and count"):
        query_moments_half(q, torch.ones(batch, seq, device="cuda"))


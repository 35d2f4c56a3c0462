"""The varlen layout (head-wise budgets stored flat): exact against the masked float64 reference,
its memory, and its prefix backends (plain PyTorch segments, and the Triton kernel, interpreted
without CUDA)."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from tests.conftest import tiny_llama
from tests.reference import attention, keep_masks, masked_reference
from zigzag import cache_kwarg, kernels, prefill_context
from zigzag.cache import CompressedLayer, ZigZagCache, varlen
from zigzag.cache.varlen import VarlenKeys, VarlenLayer, segment_attention
from zigzag.merge import CosineMerge
from zigzag.pipeline.select import build_layer, gather_kept
from zigzag.testing.random_cache import random_cache

# The PyTorch reference ("segment" is its old name), and the Triton kernel in Triton's interpreter
# without CUDA (see tests/conftest.py).
MODEL_BACKENDS = ["torch"] + (["triton"] if importlib.util.find_spec("triton") else [])


def backend(name: str):
    """Use ``name`` for varlen prefixes inside the block."""
    return kernels.using("varlen", name)


def _naive(q, keys, values, offsets, bias, scale):
    """Per-segment float64 softmax, one Python loop (test only)."""
    outs, lses = [], []
    for z in range(q.shape[0]):
        s, e = int(offsets[z]), int(offsets[z + 1])
        if e == s:
            outs.append(torch.zeros(q.shape[1], q.shape[2], dtype=torch.float64))
            lses.append(torch.full((q.shape[1],), float("-inf"), dtype=torch.float64))
            continue
        logits = q[z].double() @ keys[s:e].double().T * scale
        if bias is not None:
            logits = logits + bias[s:e].double()
        outs.append(logits.softmax(-1) @ values[s:e].double())
        lses.append(logits.logsumexp(-1))
    return torch.stack(outs), torch.stack(lses)


def _prefill(model, ids, mask):
    return prefill_context(model, {"input_ids": ids, "attention_mask": mask}, window=0, query_stats_skip=None).cache


def _skewed_selection(mask: torch.Tensor, kv_heads: int, width: int, gen: torch.Generator) -> torch.Tensor:
    """Random kept columns per (row, head), head h keeping ``width - 5 h`` (row 1: 2 fewer): heads differ."""
    batch, _seq = mask.shape
    kept = torch.full((batch, kv_heads, width), -1, dtype=torch.long)
    for b in range(batch):
        real = mask[b].nonzero().flatten()
        for h in range(kv_heads):
            n = min(width - 5 * h - 2 * b, len(real))
            kept[b, h, width - n :] = real[torch.randperm(len(real), generator=gen)[:n]].sort().values
    return kept


@pytest.mark.parametrize("name", MODEL_BACKENDS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_varlen_layers_match_masked_reference_while_decoding(attn, name):
    model = tiny_llama(attn, seed=2)
    gen = torch.Generator().manual_seed(7)
    batch, seq, q = 2, 40, 5
    ids = torch.randint(0, 128, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, :6] = 0
    full = _prefill(model, ids, mask)
    layers, dense = [], []
    for layer, width in zip(full.layers, [20, 14, 26]):
        kept = _skewed_selection(mask, layer.keys.shape[1], width, gen)
        built = build_layer(layer.keys, layer.values, kept, mask.bool())
        assert isinstance(built, VarlenLayer) and torch.equal(built.kept_positions, kept)
        layers.append(built)
        dense.append(CompressedLayer(*gather_kept(layer.keys, layer.values, kept), kept, seq))
    cache = ZigZagCache(layers, budgets=torch.zeros(batch, 3, dtype=torch.long))
    dense_cache = ZigZagCache(dense, budgets=torch.zeros(batch, 3, dtype=torch.long))
    keep = keep_masks(cache.kept_positions, seq)
    reference = copy.deepcopy(full)
    new_ids = torch.randint(0, 128, (batch, q), generator=gen)
    mask = torch.cat([mask, torch.ones(batch, q, dtype=torch.long)], dim=-1)
    with backend(name):
        for step in range(3):  # a multi-token continuation, then single decoding steps
            positions = (mask.cumsum(-1) - 1)[:, -new_ids.shape[1] :]
            kwargs = {"input_ids": new_ids, "attention_mask": mask, "position_ids": positions}
            with torch.no_grad():
                ours = model(**cache_kwarg(model, cache), **kwargs).logits
                padded = model(**cache_kwarg(model, dense_cache), **kwargs).logits
                with masked_reference(model, keep):
                    ref = model(**cache_kwarg(model, reference), **kwargs).logits
            torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0, msg=f"step {step}")
            torch.testing.assert_close(ours, padded, atol=1e-4, rtol=0, msg=f"step {step}")
            new_ids = ours[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], dim=-1)
    assert cache.get_seq_length() == seq + q + 2
    assert [layer.appended for layer in cache.layers] == [q + 2] * 3


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_adakv_generate_and_merge_match_masked_reference(attn):
    """Stock greedy generate on AdaKV budgets, batch 2 with left padding; then merge with log(count)."""
    model = tiny_llama(attn, seed=4)
    gen = torch.Generator().manual_seed(3)
    batch, seq, q = 2, 48, 3
    ids = torch.randint(0, 128, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, :5] = 0
    ctx = {"input_ids": ids, "attention_mask": mask}
    pre = prefill_context(model, ctx)
    cache = pre.compress(0.5, "knorm", "adakv")
    assert all(isinstance(layer, VarlenLayer) for layer in cache.layers)
    keep = keep_masks(cache.kept_positions, seq)
    prompt = torch.cat([ids, torch.randint(0, 128, (batch, q), generator=gen)], dim=-1)
    prompt_mask = torch.cat([mask, torch.ones(batch, q, dtype=torch.long)], dim=-1)
    kwargs = {"input_ids": prompt, "attention_mask": prompt_mask, "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    ours = model.generate(**cache_kwarg(model, cache), **kwargs)
    with masked_reference(model, keep):
        ref = model.generate(**cache_kwarg(model, copy.deepcopy(pre.cache)), **kwargs)
    assert torch.equal(ours, ref)

    merged = pre.compress(0.5, "knorm", "adakv", merge=CosineMerge(preserve_mass=True))
    assert all(isinstance(layer, VarlenLayer) and layer.prefix_bias is not None for layer in merged.layers)
    reference, biases = _merged_reference(pre.cache, merged)
    new = torch.randint(0, 128, (batch, q), generator=gen)
    full_mask = torch.cat([mask, torch.ones(batch, q, dtype=torch.long)], dim=-1)
    positions = (full_mask.cumsum(-1) - 1)[:, -q:]
    with torch.no_grad():
        out = model(input_ids=new, attention_mask=full_mask, position_ids=positions, **cache_kwarg(model, merged)).logits
        with masked_reference(model, keep_masks(merged.kept_positions, seq), biases):
            ref = model(input_ids=new, attention_mask=full_mask, position_ids=positions, **cache_kwarg(model, reference)).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def _merged_reference(full, merged: ZigZagCache):
    """A copy of the full cache with each varlen layer's merged values written at its kept columns,
    and per layer the ``(batch, kv_heads, seq)`` log(count) bias at those columns."""
    reference, biases = copy.deepcopy(full), []
    for layer, ref_layer in zip(merged.layers, reference.layers):
        batch, kv_heads = layer.head_lengths.shape
        z = torch.arange(batch * kv_heads).repeat_interleave(layer.head_lengths.flatten().cpu())
        rows, heads, cols = z // kv_heads, z % kv_heads, layer.positions.long().cpu()
        ref_layer.values[rows, heads, cols] = layer.prefix_values  # merged values at the kept columns
        bias = torch.zeros(batch, kv_heads, ref_layer.keys.shape[2])
        bias[rows, heads, cols] = layer.prefix_bias
        biases.append(bias)
    return reference, biases


def test_uniform_budgets_keep_the_dense_layout():
    keys = torch.randn(2, 3, 10, 8)
    kept = torch.tensor([[[0, 2, 5]] * 3, [[-1, 4, 9]] * 3])  # rows differ, heads of a row agree
    assert isinstance(build_layer(keys, keys, kept, torch.ones(2, 10, dtype=torch.bool)), CompressedLayer)
    kept[1, 2, 0] = 7
    assert isinstance(build_layer(keys, keys, kept.sort(-1).values, torch.ones(2, 10, dtype=torch.bool)), VarlenLayer)


def test_varlen_memory_is_the_sum_of_budgets():
    batch, _layers, kv_heads, head_dim = 2, 3, 4, 16
    budgets = torch.tensor([[[100, 10, 10, 0], [30, 30, 30, 30], [5, 200, 1, 9]], [[1, 2, 3, 4], [60, 0, 0, 0], [7, 7, 7, 70]]])
    cache = random_cache(batch, kv_heads, head_dim, budgets, dtype=torch.bfloat16, device="cpu", original_length=300)
    dense = random_cache(batch, kv_heads, head_dim, budgets, dtype=torch.bfloat16, device="cpu", layout="dense", original_length=300)
    assert all(isinstance(layer, VarlenLayer) for layer in cache.layers)
    index = sum(layer.index_nbytes() for layer in cache.layers)
    assert index == sum(4 * int(b.sum()) + 8 * (batch * kv_heads + 1) + 8 * batch * kv_heads for b in budgets.unbind(1))
    assert cache.nbytes() == int(budgets.sum()) * 2 * head_dim * 2 + index
    assert cache.nbytes() < 0.5 * dense.nbytes()  # the dense layout pays for the widest head everywhere
    for a, b in zip(cache.kept_positions, dense.kept_positions):
        assert torch.equal(a, b)
    auto = random_cache(batch, kv_heads, head_dim, budgets[:, :, :1].expand(-1, -1, kv_heads), device="cpu")
    assert all(isinstance(layer, CompressedLayer) for layer in auto.layers)  # uniform heads: dense
    # Appending tokens grows the tail buffer by doubling, counted in nbytes.
    layer = cache.layers[0]
    before = layer.nbytes()
    layer.update(torch.randn(batch, kv_heads, 3, head_dim).bfloat16(), torch.randn(batch, kv_heads, 3, head_dim).bfloat16())
    assert layer.nbytes() == before + 2 * batch * kv_heads * 64 * head_dim * 2
    assert layer.get_seq_length() == 303 and layer.keys.shape == (batch, kv_heads, 3, head_dim)


def test_batch_selection_crop_and_kept_positions():
    gen = torch.Generator().manual_seed(0)
    kept = torch.tensor([[[-1, 1, 4], [0, 2, 3]], [[-1, -1, 5], [-1, 1, 2]]])
    keys = torch.randn(2, 2, 3, 8, generator=gen)
    layer = VarlenLayer.from_padded(keys, keys * 2, kept, original_length=6)
    assert torch.equal(layer.kept_positions, kept) and layer.width == 3
    layer.update(torch.randn(2, 2, 2, 8), torch.randn(2, 2, 2, 8))
    tail = layer.keys.clone()
    layer.batch_select_indices(torch.tensor([1]))
    assert torch.equal(layer.kept_positions, kept[1:, :, 1:]) and layer.width == 2
    assert torch.equal(layer.prefix_keys, keys[1][kept[1] >= 0]) and torch.equal(layer.keys, tail[1:])
    layer.batch_repeat_interleave(2)
    assert torch.equal(layer.kept_positions, kept[[1, 1], :, 1:]) and layer.keys.shape[0] == 2
    layer.crop(-1)
    assert layer.get_seq_length() == 7
    with pytest.raises(ValueError, match="appended after compression"):
        layer.crop(-2)


def test_crop_at_or_beyond_the_length_exposes_no_unwritten_slot():
    gen = torch.Generator().manual_seed(1)
    kept = torch.tensor([[[-1, 1, 4], [0, 2, 3]]])
    keys = torch.randn(1, 2, 3, 8, generator=gen)
    layer = VarlenLayer.from_padded(keys, keys * 2, kept, original_length=6)
    step = torch.randn(1, 2, 3, 8, generator=gen)
    layer.update(step, step * 2)  # the tail buffer now holds 64 slots, 3 of them written
    for length in (9, 10, 100):
        layer.crop(length)
        assert layer.get_seq_length() == 9 and layer.appended == 3 and torch.equal(layer.keys, step)
    layer.crop(8)  # the legacy positive form below the length: keep 8
    assert layer.appended == 2 and torch.equal(layer.values, 2 * step[:, :, :2])
    layer.crop(0)
    assert layer.appended == 2
    with pytest.raises(ValueError, match="appended after compression"):
        layer.crop(5)  # inside the context
    assert layer.appended == 2 and torch.equal(layer.kept_positions, kept)


# ---------------------------------------------------------------------------------------------- SmolLM2


def _batch(tok, lengths=(200, 140), seed=11):
    from zigzag.testing.needle import needle_prompt

    prompts = [needle_prompt(tok, n, depth=0.4, seed=seed + i) for i, n in enumerate(lengths)]
    ctx = tok([p.context for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
    question = tok(prompts[0].question, return_tensors="pt", add_special_tokens=False).input_ids
    return ctx, question.expand(len(prompts), -1)


def _continuation_logits(model, ctx, question, cache):
    ids = torch.cat([ctx.input_ids, question], dim=-1)
    mask = torch.cat([ctx.attention_mask, torch.ones_like(question)], dim=-1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -question.shape[1] :]
    with torch.no_grad():
        return model(input_ids=ids[:, -question.shape[1] :], attention_mask=mask, position_ids=positions, **cache_kwarg(model, cache)).logits


@pytest.mark.slow
@pytest.mark.parametrize(
    "attn, merge, name",
    [("sdpa", False, "torch"), ("eager", False, "torch"), ("sdpa", True, "torch")]
    + ([("sdpa", True, "triton"), ("eager", False, "triton")] if "triton" in MODEL_BACKENDS else []),
)
def test_smollm2_adakv_varlen_equals_masked_full_cache(smollm2, attn, merge, name):
    """SmolLM2, batch 2 with left padding, a multi-token continuation: the varlen AdaKV cache (merged
    with log(count) bias, or not) gives the logits of the masked float64 full cache, with the PyTorch
    segment path and with the Triton kernels."""
    model, tok = smollm2
    ctx, question = _batch(tok)
    seq = ctx.input_ids.shape[1]
    with attention(model, attn), backend(name):
        pre = prefill_context(model, ctx)
        cache = pre.compress(0.6, "snapkv", "adakv", merge=CosineMerge(preserve_mass=True) if merge else None)
        assert sum(isinstance(layer, VarlenLayer) for layer in cache.layers) > 20
        held = cache.nbytes()  # before any token is appended
        ours = _continuation_logits(model, ctx, question, cache)
        full, biases = _merged_reference(pre.cache, cache) if merge else (pre.cache, None)
        with masked_reference(model, keep_masks(cache.kept_positions, seq), biases):
            ref = _continuation_logits(model, ctx, question, full)
    assert (ours - ref).abs().max().item() < 1e-3
    padded_bytes = sum(2 * p.numel() * 64 * 4 for p in cache.kept_positions)  # head_dim 64, float32
    assert held < padded_bytes


@pytest.mark.parametrize("d", [16, 4])  # Z = 9 segments: <= d takes the masked dense product, > d the gather
def test_segment_attention_both_strategies_equal_a_per_segment_softmax(d):
    gen = torch.Generator()
    gen.seed()  # fresh inputs every run
    lengths = torch.randint(0, 40, (3, 3), generator=gen)
    lengths[0, 1] = 0  # an empty head
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.flatten().cumsum(0)])
    total, m = int(lengths.sum()), 5
    keys, values = torch.randn(total, d, generator=gen), torch.randn(total, d, generator=gen)
    q = torch.randn(lengths.numel(), m, d, generator=gen)
    bias = torch.rand(total, generator=gen)
    ref_out, ref_lse = _naive(q, keys, values, offsets, bias, 0.3)
    out, lse = segment_attention(q, keys, values, offsets, bias, scale=0.3)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif("triton" not in MODEL_BACKENDS, reason="needs triton")
def test_triton_step_state_follows_the_layer_and_the_mask(monkeypatch):
    """What a decoding step keeps from one call to the next (the kernel's view of the prefix, the
    backend, the model's mask cut to the appended tokens) follows beam reordering, batch selection,
    repetition and crop, a new mask of the same shape, a mask written in place and a backend change:
    SDPA through the Triton kernel equals the segment path called with the mask cut by hand. A mask
    above the size limit is not kept after the call."""
    from zigzag.kernels import varlen_triton as varlen_kernel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(4)
    kept = [[[-1, 1, 4, 6], [0, 2, 3, 5]], [[-1, -1, 5, 7], [-1, 1, 2, 3]], [[0, 1, 2, 3], [-1, -1, -1, 6]]]
    keys, values = torch.randn(2, 3, 2, 4, 16, generator=gen).to(device)
    layer = VarlenLayer.from_padded(keys, values, torch.tensor(kept, device=device), original_length=8)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device)

    def check(mask):
        query = rand(layer.batch, 1, 4, 16).transpose(1, 2)  # 4 query heads on 2 KV heads
        k, v = VarlenKeys.wrap(layer.keys, layer), layer.values
        with backend("triton"):
            assert layer._resolved_backend() == "triton"
            ours = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=mask, enable_gqa=True)
        with backend("segment"):  # the old name of "torch"
            assert layer._resolved_backend() == "torch"
            ref = layer.attend(query, layer.keys, layer.values, None if mask is None else mask[..., 1:], 0.25, False)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)

    def step():
        layer.update(rand(layer.batch, 2, 1, 16), rand(layer.batch, 2, 1, 16))
        mask = torch.rand(layer.batch, 1, 1, 1 + layer.appended, generator=gen).to(device) > 0.4
        mask[..., -1] = True  # each row sees its own new token
        check(mask)
        return mask

    layer.update(rand(3, 2, 2, 16), rand(3, 2, 2, 16))
    check(None)
    mask = step()
    check(torch.cat([~mask[..., :-1], mask[..., -1:]], dim=-1))  # another mask of the same shape
    mask[..., :-1] = ~mask[..., :-1]  # the same mask, written in place
    check(mask)
    layer.reorder_cache(torch.tensor([2, 0, 1]))
    step()
    with pytest.raises(RuntimeError, match="columns"):
        check(mask)  # the mask of the previous step: one column short
    layer.batch_select_indices(torch.tensor([0, 2]))
    step()
    layer.batch_repeat_interleave(2)
    step()
    layer.crop(-2)
    step()
    assert varlen._last_tail_mask[0] is not None and varlen_kernel._last_mask[0] is not None
    monkeypatch.setattr(varlen, "_MASK_KEPT", 0)
    monkeypatch.setattr(varlen_kernel, "MASK_KEPT", 0)
    step()
    assert varlen._last_tail_mask[0] is None and varlen_kernel._last_mask[0] is None

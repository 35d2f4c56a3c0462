"""Static-shape decoding (zigzag.static): the same logits and tokens as the compressed cache itself.

The compressed cache is checked against the float64 masked reference elsewhere (tests/test_cache.py,
tests/test_api.py); here the static decoder must give what that cache gives, fed the same tokens,
for every layout: dense uniform and ZigZag layers, head-wise varlen layers, merged survivors (a bias),
and left-padded rows. The CUDA graph and torch.compile variants are checked in tests/test_gpu.py.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import tiny_llama
from tests.reference import keep_masks, masked_reference
from zigzag import cache_kwarg, compress_cache, prefill_context
from zigzag.cache import VarlenLayer
from zigzag.kernels import using
from zigzag.static import StaticDecoder, StaticZigZagCache
from zigzag.static.attention import attend_reference, attend_static
from zigzag.static.cache import StaticLayer

LAYOUTS = [("uniform", None), ("zigzag", None), ("pyramid", None), ("adakv", None), ("zigzag_heads", "cosine"), ("uniform", "cosine")]


def _context(batch: int = 2, seq: int = 48, pad: int = 7):
    ids = torch.randint(0, 128, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, :pad] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _model_logits(model, cache, mask: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own last logits over ``cache`` for ``new (batch, n)`` after a context of ``mask``;
    returns them and the grown mask."""
    full = torch.cat([mask, torch.ones_like(new)], dim=-1)
    positions = (full.cumsum(-1) - 1)[:, -new.shape[1] :]
    with torch.no_grad():
        logits = model(input_ids=new, attention_mask=full, position_ids=positions, **cache_kwarg(model, cache)).logits
    return logits[:, -1], full


@pytest.mark.parametrize("budget,merge", LAYOUTS)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_static_decoder_gives_the_compressed_cache_logits(budget, merge, backend):
    torch.manual_seed(11)
    model = tiny_llama(layers=3)
    ctx = _context()
    cache = compress_cache(model, ctx, ratio=0.6, scorer="knorm", budget=budget, merge=merge)
    if budget in ("adakv", "zigzag_heads") and merge is None:
        assert any(isinstance(layer, VarlenLayer) for layer in cache.layers)
    expected_cache = copy.deepcopy(cache)
    decoder = StaticDecoder(model, cache, max_new_tokens=9, context_mask=ctx["attention_mask"])
    mask = ctx["attention_mask"]
    question = torch.randint(0, 128, (2, 4))
    with using("varlen", backend):
        ours = decoder.feed(question)
        expected, mask = _model_logits(model, expected_cache, mask, question)
        assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()
        for _ in range(4):  # single tokens: the decoding step's path (the kernel under "triton")
            token = torch.randint(0, 128, (2, 1))
            ours = decoder.feed(token)
            expected, mask = _model_logits(model, expected_cache, mask, token)
            assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()
    assert model.config._attn_implementation == "sdpa"  # the model's own implementation is back


def test_static_decoder_matches_the_float64_masked_reference():
    torch.manual_seed(3)
    model = tiny_llama(layers=3)
    ctx = _context()
    cache = compress_cache(model, ctx, ratio=0.5, scorer="snapkv", budget="adakv")
    kept = keep_masks(cache.kept_positions, ctx["input_ids"].shape[1])
    full = prefill_context(model, ctx, window=0, query_stats_skip=None).cache
    decoder = StaticDecoder(model, cache, max_new_tokens=6, context_mask=ctx["attention_mask"])
    question = torch.randint(0, 128, (2, 5))
    ours = decoder.feed(question)
    with masked_reference(model, kept):
        reference, _ = _model_logits(model.double(), full, ctx["attention_mask"], question)
    model.float()
    assert (ours.double() - reference).abs().max() < 1e-4


def test_generate_equals_model_generate():
    torch.manual_seed(5)
    model = tiny_llama(layers=3)
    ctx = _context()
    cache = compress_cache(model, ctx, ratio=0.5, scorer="knorm", budget="zigzag_heads")
    expected_cache = copy.deepcopy(cache)
    question = torch.randint(0, 128, (2, 3))
    tokens = StaticDecoder(model, cache, max_new_tokens=12, context_mask=ctx["attention_mask"]).generate(question, 9)
    mask = torch.cat([ctx["attention_mask"], torch.ones_like(question)], dim=-1)
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.cat([ctx["input_ids"], question], dim=-1), attention_mask=mask, max_new_tokens=9,
            do_sample=False, pad_token_id=0, **cache_kwarg(model, expected_cache),
        )  # fmt: skip
    assert tokens.shape == (2, 9)
    assert torch.equal(tokens, out[:, -9:])


def test_padded_question_rows_see_only_their_tokens():
    """A left-padded question: row 1's padding is hidden and its positions skip it, as if it were
    fed unpadded on its own."""
    torch.manual_seed(8)
    model = tiny_llama(layers=2)
    ctx = _context(batch=2, pad=0)
    cache = compress_cache(model, ctx, ratio=0.5, scorer="knorm", budget="zigzag")
    alone = StaticDecoder(model, copy.deepcopy(cache), max_new_tokens=8)
    batched = StaticDecoder(model, cache, max_new_tokens=8)
    question = torch.randint(0, 128, (2, 4))
    qmask = torch.ones(2, 4, dtype=torch.long)
    qmask[1, :2] = 0
    both = batched.feed(question, attention_mask=qmask)
    unpadded = alone.feed(torch.stack([question[0, 2:], question[1, 2:]]))  # row 1 alone, unpadded
    assert torch.allclose(both[1], unpadded[1], atol=1e-5)
    token = torch.randint(0, 128, (2, 1))
    assert torch.allclose(batched.feed(token)[1], alone.feed(token)[1], atol=1e-5)


def test_kernel_and_reference_attention_agree_on_random_buffers():
    torch.manual_seed(0)
    batch, kv_heads, group, slots, head_dim = 2, 3, 2, 150, 16
    keys = torch.randn(batch, kv_heads, slots, head_dim)
    values = torch.randn_like(keys)
    bias = torch.randn(batch, kv_heads, slots).masked_fill(torch.rand(batch, kv_heads, slots) < 0.3, float("-inf"))
    layer = StaticLayer(keys, values, bias, prefix_slots=slots - 10, original_length=400)
    query = torch.randn(batch, kv_heads * group, 1, head_dim)
    reference = attend_reference(layer, query, 0.25)
    layer.use_kernel = True
    kernel = attend_static(layer, query, 0.25)
    assert torch.allclose(kernel, reference, atol=1e-5)
    # And the reference against a plain float64 softmax over the visible slots.
    q = query.double().view(batch, kv_heads, group, head_dim)
    logits = torch.einsum("bhgd,bhsd->bhgs", q, keys.double()) * 0.25 + bias.double()[:, :, None]
    plain = torch.einsum("bhgs,bhsd->bhgd", logits.softmax(-1), values.double()).reshape(batch, -1, 1, head_dim)
    assert torch.allclose(reference.double(), plain, atol=1e-5)


def test_static_cache_shapes_and_memory():
    torch.manual_seed(1)
    model = tiny_llama(layers=3)
    ctx = _context()
    cache = compress_cache(model, ctx, ratio=0.6, scorer="knorm", budget="pyramid")
    static = StaticZigZagCache.from_cache(cache, headroom=16)
    for layer, source in zip(static.layers, cache.layers):
        assert layer.keys.shape[2] == source.prefix_length + 16
        assert int(layer.write_at) == source.prefix_length
        visible = torch.isfinite(layer.bias).sum(-1)
        assert torch.equal(visible, (source.kept_positions >= 0).sum(-1))
    assert static.headroom == 16
    widths = {layer.prefix_slots for layer in static.layers}
    assert len(widths) > 1  # layer budgets: each layer keeps its own width, not the widest


def test_errors_are_clear():
    torch.manual_seed(2)
    model = tiny_llama(layers=2)
    ctx = _context()
    cache = compress_cache(model, ctx, ratio=0.5, scorer="knorm")
    decoder = StaticDecoder(model, copy.deepcopy(cache), max_new_tokens=4)
    with pytest.raises(ValueError, match="do not fit"):
        decoder.generate(torch.zeros(2, 3, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="context_mask"):
        StaticDecoder(model, copy.deepcopy(cache), max_new_tokens=4, context_mask=torch.ones(2, 5))
    grown = copy.deepcopy(cache)
    _model_logits(model, grown, ctx["attention_mask"], torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="appended after compression"):
        StaticDecoder(model, grown, max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        StaticDecoder(model, copy.deepcopy(cache), max_new_tokens=0)
    with pytest.raises(RuntimeError, match="StaticDecoder"):
        from zigzag.static.attention import static_attention

        static_attention(model.model.layers[0].self_attn, torch.zeros(1, 4, 1, 16), None, None, None)


def test_generate_on_smollm2_equals_model_generate(smollm2):
    """The real model: greedy tokens from the static decoder equal model.generate over the same cache."""
    from zigzag.testing.needle import needle_prompt

    model, tok = smollm2
    prompt = needle_prompt(tok, context_tokens=600, depth=0.4, seed=2)
    ctx = tok(prompt.context, return_tensors="pt")
    question = tok(prompt.question, return_tensors="pt", add_special_tokens=False)["input_ids"]
    for budget in ("zigzag", "adakv"):
        cache = compress_cache(model, ctx, ratio=0.6, scorer="snapkv", budget=budget)
        expected_cache = copy.deepcopy(cache)
        tokens = StaticDecoder(model, cache, max_new_tokens=question.shape[1] + 12).generate(question, 12)
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.cat([ctx["input_ids"], question], dim=-1), max_new_tokens=12, do_sample=False,
                **cache_kwarg(model, expected_cache),
            )  # fmt: skip
        produced = out[:, ctx["input_ids"].shape[1] + question.shape[1] :]  # generate stops at the end token
        assert produced.shape[1] >= 3
        assert torch.equal(tokens[:, : produced.shape[1]], produced), budget

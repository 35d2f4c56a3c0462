"""The ragged cache against the independent masked reference, on a tiny random Llama.

Selections here are random (per row, per layer and per KV head), so these tests exercise the cache
and the attention interception alone; `test_api.py` does the same through `compress_cache` on the
real model.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from tests.conftest import tiny_llama
from tests.reference import keep_masks, masked_reference
from zigzag import cache_kwarg
from zigzag.cache import CompressedLayer, VarlenLayer, ZigZagCache
from zigzag.cache.refeed import check_mask, check_positions
from zigzag.pipeline.select import build_layer, gather_kept


def _prefill(model, ids, mask):
    full = DynamicCache(config=model.config)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=positions, **cache_kwarg(model, full), use_cache=True)
    return full


def _random_compression(full: DynamicCache, mask: torch.Tensor, widths: list[int], gen: torch.Generator):
    """Keep a random subset per (row, layer, kv head); row 1 keeps 3 fewer than row 0 (empty slots)."""
    batch, seq = mask.shape
    layers = []
    for layer, width in zip(full.layers, widths):
        kv_heads = layer.keys.shape[1]
        kept = torch.full((batch, kv_heads, width), -1, dtype=torch.long)
        for b in range(batch):
            real = mask[b].nonzero().flatten()
            n = min(width - 3 * b, len(real))
            for h in range(kv_heads):
                chosen = real[torch.randperm(len(real), generator=gen)[:n]].sort().values
                kept[b, h, width - n :] = chosen
        layers.append(
            CompressedLayer(*gather_kept(layer.keys, layer.values, kept), kept, seq)
        )
    return ZigZagCache(layers, budgets=torch.tensor([widths, [w - 3 for w in widths]]))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_continuation_and_decoding_match_masked_reference(attn):
    model = tiny_llama(attn)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    batch, seq, q = 2, 24, 5
    ids = torch.randint(0, 128, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, :6] = 0  # row 1 is left padded
    full = _prefill(model, ids, mask)
    cache = _random_compression(full, mask, widths=[14, 8, 17], gen=gen)
    reference = copy.deepcopy(full)
    keep = keep_masks(cache.kept_positions, seq)

    # Layers really hold different lengths.
    assert [layer.keys.shape[-2] for layer in cache.layers] == [14, 8, 17]
    assert cache.get_seq_length() == seq

    new_ids = torch.randint(0, 128, (batch, q), generator=gen)
    mask = torch.cat([mask, torch.ones(batch, q, dtype=torch.long)], dim=-1)
    for step in range(3):  # a multi-token continuation, then two single decoding steps
        positions = (mask.cumsum(-1) - 1)[:, -new_ids.shape[1] :]
        with torch.no_grad():
            out = model(input_ids=new_ids, attention_mask=mask, position_ids=positions, **cache_kwarg(model, cache)).logits
            with masked_reference(model, keep):
                ref = model(
                    input_ids=new_ids, attention_mask=mask, position_ids=positions, **cache_kwarg(model, reference)
                ).logits
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0, msg=f"step {step}")
        new_ids = out[:, -1:].argmax(-1)
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], dim=-1)
    assert cache.get_seq_length() == seq + q + 2


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generate_matches_masked_reference(attn):
    model = tiny_llama(attn, seed=1)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    batch, seq, q = 2, 30, 4
    ids = torch.randint(0, 128, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, :9] = 0
    full = _prefill(model, ids, mask)
    cache = _random_compression(full, mask, widths=[10, 20, 6], gen=gen)
    keep = keep_masks(cache.kept_positions, seq)
    prompt = torch.cat([ids, torch.randint(0, 128, (batch, q), generator=gen)], dim=-1)
    prompt_mask = torch.cat([mask, torch.ones(batch, q, dtype=torch.long)], dim=-1)
    kwargs = dict(input_ids=prompt, attention_mask=prompt_mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    ours = model.generate(**cache_kwarg(model, cache), **kwargs)
    with masked_reference(model, keep):
        ref = model.generate(**cache_kwarg(model, copy.deepcopy(full)), **kwargs)
    assert torch.equal(ours, ref)
    assert model.config._attn_implementation == attn


def test_memory_is_the_kept_tokens_only():
    model = tiny_llama()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (2, 40), generator=gen)
    mask = torch.ones_like(ids)
    full = _prefill(model, ids, mask)
    cache = _random_compression(full, mask, widths=[5, 9, 3], gen=gen)
    head_dim, kv_heads = 16, 2
    kv_bytes = sum(2 * 2 * kv_heads * w * head_dim * 4 for w in [5, 9, 3])  # keys + values, float32
    index_bytes = sum(l.kept_positions.nbytes + l.slot_valid.nbytes for l in cache.layers)
    assert cache.nbytes() == kv_bytes + index_bytes
    full_bytes = sum(l.keys.nbytes + l.values.nbytes for l in full.layers)
    assert cache.nbytes() < 0.3 * full_bytes


def test_crop_only_removes_appended_tokens():
    keys = torch.randn(1, 2, 4, 8)
    layer = CompressedLayer(keys, keys.clone(), torch.arange(4).expand(1, 2, 4), original_length=10)
    layer.update(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8))
    assert layer.get_seq_length() == 13
    for length in (13, 14, 100):  # at or beyond the length: nothing to remove (transformers' convention)
        layer.crop(length)
        assert layer.get_seq_length() == 13 and torch.equal(layer.keys[:, :, :4], keys)
    layer.crop(12)  # a positive length below the current one keeps that many
    assert layer.get_seq_length() == 12 and layer.keys.shape[-2] == 6
    layer.crop(-1)
    assert layer.get_seq_length() == 11 and layer.keys.shape[-2] == 5
    layer.crop(0)
    assert layer.get_seq_length() == 11
    with pytest.raises(ValueError, match="appended after compression"):
        layer.crop(-2)
    with pytest.raises(ValueError, match="appended after compression"):
        layer.crop(9)  # inside the context: the compressed prefix cannot be shortened
    assert layer.get_seq_length() == 11 and layer.keys.shape[-2] == 5


def test_batch_selection_keeps_slots_aligned():
    keys = torch.randn(2, 2, 3, 8)
    kept = torch.tensor([[[0, 1, 2], [0, 1, 2]], [[-1, 4, 5], [-1, 4, 5]]])
    layer = CompressedLayer(keys, keys.clone(), kept, original_length=6)
    assert not layer.prefix_full and layer.slot_valid.shape == (2, 1, 3)
    layer.batch_select_indices(torch.tensor([0]))
    assert layer.prefix_full and torch.equal(layer.kept_positions, kept[:1])
    assert torch.equal(layer.keys, keys[:1])


# ---------------------------------------------------------------------------------------------- crop and re-feeding


def _compressed(model, ids: torch.Tensor, mask: torch.Tensor, layout: str, gen: torch.Generator) -> ZigZagCache:
    """A random selection per (row, layer, KV head) through :func:`build_layer`: ``"dense"`` keeps as many
    tokens in every head of a row (CompressedLayer), ``"varlen"`` makes head h keep 3 h fewer (VarlenLayer)."""
    full = _prefill(model, ids, mask)
    layers = []
    for layer, width in zip(full.layers, [12, 8, 15]):
        batch, kv_heads = mask.shape[0], layer.keys.shape[1]
        kept = torch.full((batch, kv_heads, width), -1, dtype=torch.long)
        for b in range(batch):
            real = mask[b].nonzero().flatten()
            for h in range(kv_heads):
                n = min(width - (3 * h if layout == "varlen" else 0), len(real))
                kept[b, h, width - n :] = real[torch.randperm(len(real), generator=gen)[:n]].sort().values
        layers.append(build_layer(layer.keys, layer.values, kept, mask.bool()))
    kind = VarlenLayer if layout == "varlen" else CompressedLayer
    assert all(type(layer) is kind for layer in layers)
    return ZigZagCache(layers, budgets=torch.tensor([[12, 8, 15]] * mask.shape[0]))


def _forward(model, cache, new: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits of ``new (batch, q)`` fed after ``mask (batch, cached)``, positions from the mask."""
    mask = torch.cat([mask, torch.ones_like(new)], dim=-1)
    positions = (mask.cumsum(-1) - 1)[:, -new.shape[1] :]
    with torch.no_grad():
        return model(input_ids=new, attention_mask=mask, position_ids=positions, **cache_kwarg(model, cache)).logits


@pytest.mark.parametrize("layout", ["dense", "varlen"])
def test_crop_at_or_beyond_the_length_changes_nothing_and_negative_crop_rolls_back(layout):
    model = tiny_llama(seed=3)
    gen = torch.Generator().manual_seed(11)
    batch, seq, q = 2, 24, 4
    ids = torch.randint(0, 128, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, :5] = 0
    cache = _compressed(model, ids, mask, layout, gen)
    question = torch.randint(0, 128, (batch, q), generator=gen)
    first = _forward(model, cache, question, mask)
    mask = torch.cat([mask, torch.ones_like(question)], dim=-1)
    untouched = copy.deepcopy(cache)
    length = cache.get_seq_length()
    assert length == seq + q
    for n in (length, length + 1, length + 10):
        cache.crop(n)
        assert cache.get_seq_length() == length
        assert [layer.appended for layer in cache.layers] == [q] * 3
    step = torch.randint(0, 128, (batch, 2), generator=gen)
    torch.testing.assert_close(_forward(model, cache, step, mask), _forward(model, untouched, step, mask), atol=0, rtol=0)

    # Negative: the last tokens go, and feeding them again gives what they gave the first time.
    cache.crop(-2 - 2)  # the two step tokens and the last two question tokens
    assert cache.get_seq_length() == seq + q - 2
    again = _forward(model, cache, question[:, 2:], mask[:, :-2])
    torch.testing.assert_close(again, first[:, 2:], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="appended after compression"):
        cache.crop(-(q + 1))
    with pytest.raises(ValueError, match="appended after compression"):
        cache.crop(seq - 1)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("layout", ["dense", "varlen"])
def test_prompt_lookup_and_refed_context_are_refused(layout, attn):
    """Tokens fed where the compressed context already is raise instead of attending it twice."""
    model = tiny_llama(attn, seed=5)
    gen = torch.Generator().manual_seed(13)
    seq, q = 30, 6
    ids = torch.randint(0, 128, (1, 10), generator=gen).repeat(1, 3)  # repetitive: prompt lookup finds matches
    mask = torch.ones_like(ids)
    cache = _compressed(model, ids, mask, layout, gen)
    question = ids[:, :q]
    prompt = torch.cat([ids, question], dim=-1)
    kwargs = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt), "max_new_tokens": 5, "do_sample": False}
    plain = model.generate(**cache_kwarg(model, copy.deepcopy(cache)), pad_token_id=0, **kwargs)
    assert plain.shape[1] == seq + q + 5  # the compressed cache takes generate's own slicing
    with pytest.raises(ValueError, match="already covers"):
        model.generate(**cache_kwarg(model, copy.deepcopy(cache)), pad_token_id=0, prompt_lookup_num_tokens=3, **kwargs)

    # A forward over the context again: its mask is too short for the cache, its positions start at 0.
    expected = _forward(model, copy.deepcopy(cache), question, mask)
    with torch.no_grad(), pytest.raises(ValueError, match="already covers"):
        model(input_ids=prompt, attention_mask=torch.ones_like(prompt), **cache_kwarg(model, cache))
    # With positions that look right, the short mask alone is caught (all that transformers 5.17 passes on).
    positions = torch.arange(seq, seq + prompt.shape[1])[None]
    with torch.no_grad(), pytest.raises(ValueError, match="attention_mask has fewer columns"):
        model(input_ids=prompt, attention_mask=torch.ones_like(prompt), position_ids=positions, **cache_kwarg(model, cache))
    # The refused calls left the cache as it was: the question alone still gives the same logits.
    assert [layer.appended for layer in cache.layers] == [0] * 3
    torch.testing.assert_close(_forward(model, cache, question, mask), expected, atol=0, rtol=0)


def test_refeed_checks_read_only_multi_token_forwards():
    # Positions: every row's last new token must leave room for the context (one token at least).
    check_positions(torch.tensor([[7, 8, 9]]), appended=0, new=3)
    check_positions(torch.tensor([[0, 0, 0], [4, 5, 6]]), appended=2, new=3)  # one padded row is not an error
    with pytest.raises(ValueError, match="already covers"):
        check_positions(torch.tensor([[0, 1, 2], [0, 0, 1]]), appended=0, new=3)
    with pytest.raises(ValueError, match="already covers"):
        check_positions(torch.tensor([[3, 4, 5]]), appended=3, new=3)  # restarts after the appended tokens only
    check_positions(torch.tensor([[0]]), appended=0, new=1)  # one-token steps are not read
    check_positions(None, appended=0, new=3)
    # Mask: the last new token must see itself in some row; bool or additive.
    visible = torch.ones(2, 1, 3, 4, dtype=torch.bool)
    visible[0, ..., -1] = False
    check_mask(visible)
    hidden = visible.clone()
    hidden[1, ..., -1] = False
    with pytest.raises(ValueError, match="already covers"):
        check_mask(hidden)
    additive = torch.zeros(hidden.shape).masked_fill(~hidden, torch.finfo(torch.float32).min)
    with pytest.raises(ValueError, match="already covers"):
        check_mask(additive)
    check_mask(hidden[..., -1:, :])  # one query row: a decoding step, not read


def test_nbytes_and_kept_positions_follow_batch_selection_on_both_layouts():
    from zigzag.testing.random_cache import random_cache

    budgets = torch.tensor([[[6, 6], [3, 9], [0, 4]], [[2, 2], [5, 5], [7, 1]]])  # (batch, layers, kv_heads)
    cache = random_cache(2, 2, 8, budgets, dtype=torch.float32, device="cpu", original_length=12)
    assert [type(layer) for layer in cache.layers] == [CompressedLayer, VarlenLayer, VarlenLayer]
    assert cache.nbytes() == sum(layer.nbytes() for layer in cache.layers)
    before = [p.clone() for p in cache.kept_positions]
    for p, counts in zip(before, budgets.unbind(1)):
        assert torch.equal((p >= 0).sum(-1), counts)
    cache.batch_repeat_interleave(2)  # rows 0, 0, 1, 1
    assert [torch.equal(p, b.repeat_interleave(2, dim=0)) for p, b in zip(cache.kept_positions, before)] == [True] * 3
    cache.reorder_cache(torch.tensor([3, 0, 1, 2]))  # rows 1, 0, 0, 1
    assert [torch.equal(p, b[[1, 0, 0, 1]]) for p, b in zip(cache.kept_positions, before)] == [True] * 3
    full_bytes = cache.nbytes()
    cache.batch_select_indices(torch.tensor([1]))  # row 0 alone
    kept = cache.kept_positions
    assert [torch.equal(p, b[:1, :, b.shape[-1] - p.shape[-1] :]) for p, b in zip(kept, before)] == [True] * 3
    assert cache.nbytes() == sum(layer.nbytes() for layer in cache.layers) < full_bytes
    assert cache.get_seq_length() == 12

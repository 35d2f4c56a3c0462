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
from zigzag.pipeline.select import gather_kept
from zigzag.cache import CompressedLayer, ZigZagCache


def _prefill(model, ids, mask):
    full = DynamicCache(config=model.config)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=full, use_cache=True)
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
            out = model(input_ids=new_ids, attention_mask=mask, position_ids=positions, past_key_values=cache).logits
            with masked_reference(model, keep):
                ref = model(
                    input_ids=new_ids, attention_mask=mask, position_ids=positions, past_key_values=reference
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
    ours = model.generate(past_key_values=cache, **kwargs)
    with masked_reference(model, keep):
        ref = model.generate(past_key_values=copy.deepcopy(full), **kwargs)
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
    layer.crop(-2)
    assert layer.get_seq_length() == 11 and layer.keys.shape[-2] == 5
    with pytest.raises(ValueError, match="appended after compression"):
        layer.crop(-2)


def test_batch_selection_keeps_slots_aligned():
    keys = torch.randn(2, 2, 3, 8)
    kept = torch.tensor([[[0, 1, 2], [0, 1, 2]], [[-1, 4, 5], [-1, 4, 5]]])
    layer = CompressedLayer(keys, keys.clone(), kept, original_length=6)
    assert not layer.prefix_full and layer.slot_valid.shape == (2, 1, 3)
    layer.batch_select_indices(torch.tensor([0]))
    assert layer.prefix_full and torch.equal(layer.kept_positions, kept[:1])
    assert torch.equal(layer.keys, keys[:1])

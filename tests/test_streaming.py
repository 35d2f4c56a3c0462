"""Layer-wise compression during the prefill gives the same cache as compressing a full prefill."""

from __future__ import annotations

import zlib

import pytest
import torch

from tests.conftest import tiny_llama
from zigzag import cache_kwarg, compress_cache, prefill_context
from zigzag.cache.varlen import VarlenLayer
from zigzag.merge import CosineMerge


def _batch(seed: int, vocab: int, lengths=(40, 29)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    seq = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), seq), generator=g)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, seq - n :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _assert_same_cache(a, b) -> None:
    assert torch.equal(a.budgets, b.budgets)
    assert (a.lmba is None) == (b.lmba is None)
    if a.lmba is not None:
        torch.testing.assert_close(a.lmba, b.lmba, rtol=0, atol=0)
    for la, lb in zip(a.layers, b.layers):
        assert type(la) is type(lb)
        assert torch.equal(la.kept_positions, lb.kept_positions)
        for got, want in zip(_kept_states(la), _kept_states(lb)):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert (la.prefix_bias is None) == (lb.prefix_bias is None)
        if la.prefix_bias is not None:
            torch.testing.assert_close(la.prefix_bias, lb.prefix_bias)


def _kept_states(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """``(slots, head_dim)`` keys and values of the kept slots, row by row and head by head."""
    if isinstance(layer, VarlenLayer):
        return layer.prefix_keys, layer.prefix_values
    real = layer.kept_positions >= 0
    width = layer.kept_positions.shape[-1]
    return layer.keys[..., :width, :][real], layer.values[..., :width, :][real]


@pytest.mark.parametrize("budget", ["uniform", "pyramid", "zigzag", "adakv", "zigzag_heads"])
@pytest.mark.parametrize("scorer", ["snapkv", "expected_attention", "knorm", "tova", "streaming_llm"])
def test_layerwise_equals_full_prefill_tiny(scorer, budget):
    model = tiny_llama(layers=4, seed=3)
    inputs = _batch(seed=zlib.crc32(f"{scorer}|{budget}".encode()) % 1000, vocab=128)
    reference = prefill_context(model, inputs, window=64).compress(0.6, scorer, budget)
    _assert_same_cache(compress_cache(model, inputs, 0.6, scorer, budget), reference)


@pytest.mark.parametrize("budget", ["uniform", "zigzag"])
def test_layerwise_with_merge_equals_full_prefill(budget):
    model = tiny_llama(layers=3, seed=5)
    inputs = _batch(seed=11, vocab=128)
    merge = CosineMerge(preserve_mass=True)
    reference = prefill_context(model, inputs, window=64).compress(0.5, "knorm", budget, merge=merge)
    _assert_same_cache(compress_cache(model, inputs, 0.5, "knorm", budget, merge=merge), reference)


def test_layerwise_equals_full_prefill_smollm2(smollm2):
    model, tok = smollm2
    texts = ["The quick brown fox jumps over the lazy dog. " * 12, "A short second row of text, padded on the left."]
    tok.padding_side = "left"
    inputs = tok(texts, return_tensors="pt", padding=True)
    for scorer, budget in [("expected_attention", "zigzag"), ("snapkv", "uniform")]:
        reference = prefill_context(model, inputs).compress(0.7, scorer, budget)
        _assert_same_cache(compress_cache(model, inputs, 0.7, scorer, budget), reference)


# ---------------------------------------------------------------------------------------------- chunked prefill

_CHUNK_REF = "zigzag_test_chunked_reference"
_ALLOWED: dict[int, torch.Tensor] = {}


def _chunked_reference_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    allowed = _ALLOWED[module.layer_idx]  # (batch, kv_heads, queries, keys) bool
    groups = query.shape[1] // key.shape[1]
    scores = query.double() @ key.double().repeat_interleave(groups, dim=1).transpose(-1, -2) * scaling
    scores = scores.masked_fill(~allowed.repeat_interleave(groups, dim=1), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = probs @ value.double().repeat_interleave(groups, dim=1)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _allowed(valid: torch.Tensor, kv_heads: int, stages: list[tuple[int, list[torch.Tensor] | None]], layers: int):
    """Per layer ``(batch, kv_heads, n, n)``: causal, no padding keys, and each stage's queries (columns
    from its start on) see only the columns kept before it (``kept``: per layer (batch, kv_heads, k))."""
    batch, n = valid.shape
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    base = causal[None] & valid[:, None, :]
    base = base | torch.eye(n, dtype=torch.bool)[None]  # padded queries see themselves (no NaN)
    out = []
    for layer in range(layers):
        allowed = base[:, None].expand(batch, kv_heads, n, n).clone()
        for start, kept in stages:
            if kept is None:
                continue
            keep = torch.zeros(batch, kv_heads, n + 1, dtype=torch.bool)
            pos = kept[layer]
            keep.scatter_(-1, torch.where(pos >= 0, pos, n), True)
            prefix = torch.arange(n) < start
            # queries at columns >= start: the prefix is only what was kept
            allowed[:, :, start:, :] &= (~prefix | keep[..., :n])[:, :, None, :]
        out.append(allowed)
    return out


def _check_chunked_against_reference(model, inputs, ratio, scorer, budget, chunk):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    seq = ids.shape[1]
    assert seq % chunk == 0
    ends = list(range(chunk, seq + 1, chunk))
    # The kept sets after each chunk but the last: truncated inputs give the same chunks, and every
    # chunk but the last keeps the average in each layer, which is what uniform budgets do at the end.
    kept_after = [
        compress_cache(model, {"input_ids": ids[:, :e], "attention_mask": mask[:, :e]}, ratio, scorer, "uniform", chunk_size=chunk).kept_positions
        for e in ends[:-1]
    ]
    cache = compress_cache(model, inputs, ratio, scorer, budget, chunk_size=chunk)
    kept_after.append(cache.kept_positions)
    question = torch.randint(3, model.config.vocab_size, (ids.shape[0], 5), generator=torch.Generator().manual_seed(1))
    full_ids = torch.cat([ids, question], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(question)], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(input_ids=question, attention_mask=full_mask, position_ids=positions[:, seq:], **cache_kwarg(model, cache)).logits
    stages = [(e, kept_after[k]) for k, e in enumerate(ends)]  # chunk k+1 (and the question) start at ends[k]
    kv_heads = model.config.num_key_value_heads
    _ALLOWED.clear()
    _ALLOWED.update(enumerate(_allowed(full_mask.bool(), kv_heads, stages, model.config.num_hidden_layers)))
    AttentionInterface.register(_CHUNK_REF, _chunked_reference_attention)
    AttentionMaskInterface.register(_CHUNK_REF, eager_mask)
    original = model.config._attn_implementation
    model.set_attn_implementation(_CHUNK_REF)
    try:
        with torch.no_grad():
            ref = model(input_ids=full_ids, attention_mask=full_mask, position_ids=positions).logits[:, seq:]
    finally:
        model.set_attn_implementation(original)
        _ALLOWED.clear()
    assert (ours - ref).abs().max().item() < 1e-3
    return cache


@pytest.mark.parametrize("budget", ["uniform", "zigzag", "pyramid"])
@pytest.mark.parametrize("scorer", ["snapkv", "expected_attention", "streaming_llm"])
def test_chunked_prefill_equals_its_masked_reference_tiny(scorer, budget):
    model = tiny_llama(layers=3, seed=4)
    inputs = _batch(seed=7, vocab=128, lengths=(192, 150))
    cache = _check_chunked_against_reference(model, inputs, 0.5, scorer, budget, chunk=64)
    seen = inputs["attention_mask"].sum(-1)
    assert torch.equal(cache.budgets.sum(dim=1), 3 * ((0.5 * seen.double()).floor().long()))


def test_chunked_prefill_equals_its_masked_reference_smollm2(smollm2):
    model, tok = smollm2
    tok.padding_side = "left"
    sentence = "The quick brown fox jumps over the lazy dog, and then it runs away. "
    texts = [sentence * 18, "A second, shorter row. " + sentence * 15]
    inputs = tok(texts, return_tensors="pt", padding=True)
    keep = inputs["input_ids"].shape[1] // 64 * 64  # a multiple of the chunk: truncations then give the same chunks
    inputs = {k: inputs[k][:, -keep:] for k in ("input_ids", "attention_mask")}
    assert bool(inputs["attention_mask"][:, :64].any(dim=1).all())
    _check_chunked_against_reference(model, inputs, 0.6, "expected_attention", "zigzag", chunk=64)


def test_chunked_prefill_without_eviction_is_the_plain_model():
    model = tiny_llama(layers=2, seed=9)
    inputs = _batch(seed=3, vocab=128, lengths=(30, 30))
    ids = inputs["input_ids"]
    cache = compress_cache(model, inputs, 0.0, "knorm", "uniform", chunk_size=7)
    assert [layer.kept_positions.shape[-1] for layer in cache.layers] == [30, 30]
    nxt = torch.randint(3, 128, (2, 3))
    with torch.no_grad():
        ours = model(input_ids=nxt, **cache_kwarg(model, cache)).logits
        ref = model(input_ids=torch.cat([ids, nxt], dim=1)).logits[:, -3:]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_one_big_chunk_is_the_unchunked_prefill():
    model = tiny_llama(layers=3, seed=2)
    inputs = _batch(seed=5, vocab=128)
    _assert_same_cache(compress_cache(model, inputs, 0.5, "snapkv", "zigzag", chunk_size=1000), compress_cache(model, inputs, 0.5, "snapkv", "zigzag"))


def test_chunk_size_errors():
    model = tiny_llama(layers=2)
    inputs = _batch(seed=1, vocab=128)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size"):
            compress_cache(model, inputs, 0.5, chunk_size=bad)
    with pytest.raises(ValueError, match="at least the 64 last queries"):
        compress_cache(model, inputs, 0.5, "snapkv", "zigzag", chunk_size=8)
    with pytest.raises(ValueError, match="merge"):
        compress_cache(model, inputs, 0.5, "knorm", "uniform", merge="cosine", chunk_size=8)
    with pytest.raises(ValueError, match="head-wise"):
        compress_cache(model, inputs, 0.5, "knorm", budget="adakv", chunk_size=8)

"""Compression while generating: exact against the masked float64 reference after every event, memory
bounded by max_tokens + interval, exact totals, and stock generate (greedy, sampling, beam search)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.conftest import tiny_llama
from tests.reference import keep_masks, masked_reference
from zigzag import Decoding, cache_kwarg, compress_cache, prefill_context
from zigzag.cache import VarlenLayer
from zigzag.scorers import SnapKV

MAX_TOKENS, INTERVAL = 16, 6


def _inputs(model, batch: int = 2, seq: int = 40, pad: int = 7):
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, :pad] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _held(cache) -> float:
    """Tokens stored per KV head, on average over layers and rows, read off the storage itself."""
    total = 0.0
    for layer in cache.layers:
        if isinstance(layer, VarlenLayer):
            total += layer.prefix_keys.shape[0] / (layer.batch * layer.kv_heads) + layer.appended
        else:
            total += layer.keys.shape[-2]
    return total / len(cache.layers)


def _held_real(cache) -> float:
    """Real tokens per KV head (kept slots plus appended), on average over layers, rows and heads."""
    return sum(
        float((p >= 0).sum(-1).float().mean()) + layer.appended for p, layer in zip(cache.kept_positions, cache.layers)
    ) / len(cache.layers)


def lockstep(model, ctx, cache, steps, *, pad_continuation: bool = False):
    """Feed a continuation then one token at a time through ``cache`` and, in lockstep, through the full
    cache under the float64 reference that masks what ``cache`` holds at that step. Yields
    ``(ours, reference, cache)`` logits per step."""
    reference = prefill_context(model, ctx, window=0, query_stats_skip=None).cache
    mask = ctx["attention_mask"]
    batch = mask.shape[0]
    for n in steps:
        new = torch.randint(0, model.config.vocab_size, (batch, n))
        new_mask = torch.ones(batch, n, dtype=torch.long)
        if pad_continuation and n > 1:
            new_mask[0, :2] = 0  # padding inside the continuation: never attended, never kept
        mask = torch.cat([mask, new_mask], dim=-1)
        kwargs = {"input_ids": new, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)[:, -n:]}
        with torch.no_grad():
            ours = model(**kwargs, **cache_kwarg(model, cache)).logits
            with masked_reference(model, keep_masks(cache.kept_positions, cache.original_length)):
                ref = model(**kwargs, **cache_kwarg(model, reference)).logits
        yield ours, ref, cache


CASES = [
    ("knorm", "uniform", "sdpa"),
    ("tova", "zigzag", "sdpa"),
    ("expected_attention", "uniform", "eager"),
    ("expected_attention+pool5", "pyramid", "sdpa"),
    ("snapkv", "adakv", "sdpa"),
    ("snapkv", "adakv", "eager"),
    ("tova", "zigzag_heads", "sdpa"),
    ("streaming_llm", "uniform", "eager"),
]


@pytest.mark.parametrize(("scorer", "budget", "attn"), CASES)
def test_exact_after_every_event_and_bounded(scorer, budget, attn):
    model = tiny_llama(attn, seed=int(torch.randint(0, 1000, (1,))))
    ctx = _inputs(model)
    spec = SnapKV(window=4) if scorer == "snapkv" else scorer
    decoding = Decoding(max_tokens=MAX_TOKENS, interval=INTERVAL, sinks=2, recent=3)
    cache = compress_cache(model, ctx, ratio=0.5, scorer=spec, budget=budget, decoding=decoding)
    layers = model.config.num_hidden_layers
    events_seen = 0
    for ours, ref, _ in lockstep(model, ctx, cache, [5] + [1] * 30, pad_continuation=True):
        torch.testing.assert_close(ours.double(), ref.double(), atol=2e-5, rtol=1e-4)
        if cache.events:  # from the first event on (before it, the prompt's own budget)
            assert _held_real(cache) <= MAX_TOKENS + INTERVAL
            if budget == "uniform":  # rows keep as many: the dense storage itself is bounded
                assert _held(cache) <= MAX_TOKENS + INTERVAL
        if len(cache.events) > events_seen:  # an event ran in this step: its totals are exact
            events_seen = len(cache.events)
            budgets = torch.tensor(cache.events[-1]["budgets"])
            per_row = budgets.reshape(budgets.shape[0], -1).sum(-1)
            heads = budgets.shape[-1] if budgets.dim() == 3 else 1
            assert per_row.tolist() == [layers * heads * MAX_TOKENS] * budgets.shape[0]
            kept = cache.kept_positions
            assert all(int((p >= 0).sum(-1).min()) >= 5 for p in kept)  # sinks + recent always fit
    assert events_seen == 5
    steps = [e["step"] for e in cache.events]
    assert steps == [6, 12, 18, 24, 30]
    if budget == "adakv":
        assert any(isinstance(layer, VarlenLayer) for layer in cache.layers)


def test_sinks_and_recent_are_kept():
    model = tiny_llama()
    ctx = _inputs(model, pad=0)
    decoding = Decoding(max_tokens=8, interval=4, sinks=2, recent=3)
    cache = compress_cache(model, ctx, ratio=0.0, scorer="knorm", decoding=decoding)
    for _ in lockstep(model, ctx, cache, [1] * 9):
        pass
    length = cache.original_length
    for positions in cache.kept_positions:
        for row in positions.flatten(0, 1):
            real = row[row >= 0].tolist()
            assert real[:2] == [0, 1] and real[-3:] == list(range(length - 3, length))


def test_prompt_kept_whole_until_the_first_event():
    model = tiny_llama()
    ctx = _inputs(model, pad=0)
    cache = compress_cache(
        model, ctx, ratio=0.0, scorer="knorm", decoding=Decoding(max_tokens=10, interval=5, sinks=1, recent=2)
    )
    sizes = []
    for _ in lockstep(model, ctx, cache, [1] * 7):
        sizes.append(cache.layers[0].keys.shape[-2])
    assert sizes[:5] == [41, 42, 43, 44, 45] and sizes[5] == 11  # 40 + appended, then 10 kept + the new token
    assert cache.events[0]["held_before"] == [45.0, 45.0] and cache.events[0]["held_after"] == [10.0, 10.0]


@pytest.mark.parametrize("mode", ["greedy", "sampling", "beams"])
def test_generate(mode):
    model = tiny_llama()
    ctx = _inputs(model)
    question = torch.randint(0, model.config.vocab_size, (2, 4))
    ids = torch.cat([ctx["input_ids"], question], -1)
    mask = torch.cat([ctx["attention_mask"], torch.ones(2, 4, dtype=torch.long)], -1)
    cache = compress_cache(model, ctx, ratio=0.5, scorer="tova", budget="zigzag",
                           decoding=Decoding(max_tokens=12, interval=8, sinks=2, recent=3))  # fmt: skip
    kwargs = {
        "greedy": {"do_sample": False},
        "sampling": {"do_sample": True, "top_k": 5},
        "beams": {"num_beams": 3, "do_sample": False},
    }[mode]
    model.generation_config.eos_token_id = None  # 40 tokens in every row, as in the plain loop below
    if mode == "beams":
        cache.batch_repeat_interleave(3)  # generate expands the inputs, not a cache given to it
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=40, pad_token_id=0, **cache_kwarg(model, cache), **kwargs
    )
    assert out.shape == (2, ids.shape[1] + 40)
    assert len(cache.events) == 5 and cache.layers[0].batch == (6 if mode == "beams" else 2)
    assert _held(cache) <= 12 + 8
    if mode == "greedy":  # generate's tokens are the argmax of a plain loop over a fresh cache
        fresh = compress_cache(model, ctx, ratio=0.5, scorer="tova", budget="zigzag",
                               decoding=Decoding(max_tokens=12, interval=8, sinks=2, recent=3))  # fmt: skip
        seq, m = ids, mask
        with torch.no_grad():
            positions = lambda m, n: (m.cumsum(-1) - 1).clamp(min=0)[:, -n:]
            logits = model(
                input_ids=question, attention_mask=m, position_ids=positions(m, 4), **cache_kwarg(model, fresh)
            ).logits
            for _ in range(40):
                token = logits[:, -1].argmax(-1, keepdim=True)
                seq, m = torch.cat([seq, token], -1), torch.cat([m, torch.ones(2, 1, dtype=torch.long)], -1)
                logits = model(
                    input_ids=token, attention_mask=m, position_ids=positions(m, 1), **cache_kwarg(model, fresh)
                ).logits
        assert torch.equal(seq, out)


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="at least sinks"):
        Decoding(max_tokens=5, sinks=4, recent=2)
    with pytest.raises(ValueError, match="interval"):
        Decoding(max_tokens=64, interval=0)
    with pytest.raises(TypeError, match="int"):
        Decoding(max_tokens=64.0)
    model = tiny_llama()
    ctx = _inputs(model)
    with pytest.raises(TypeError, match="zigzag.Decoding"):
        compress_cache(model, ctx, ratio=0.5, decoding={"max_tokens": 8})
    with pytest.raises(ValueError, match="merge is not supported with decoding"):
        compress_cache(model, ctx, ratio=0.5, merge="cosine", decoding=Decoding(max_tokens=16, sinks=1, recent=1))
    with pytest.raises(ValueError, match="at least the 64 last queries"):
        compress_cache(
            model, ctx, ratio=0.5, scorer="snapkv", decoding=Decoding(max_tokens=16, interval=8, sinks=1, recent=1)
        )


@pytest.mark.slow
def test_real_model_exact_and_bounded(smollm2):
    """SmolLM2, batch 2 with left padding, TOVA with ZigZag budgets: exact after each of several events."""
    model, tok = smollm2
    from zigzag.testing.needle import needle_prompt

    prompts = [needle_prompt(tok, 300, depth=0.3, seed=1).context, needle_prompt(tok, 200, depth=0.6, seed=2).context]
    ctx = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    ctx = {"input_ids": ctx.input_ids, "attention_mask": ctx.attention_mask}
    cache = compress_cache(model, ctx, ratio=0.5, scorer="tova", budget="zigzag",
                           decoding=Decoding(max_tokens=96, interval=16, sinks=4, recent=16))  # fmt: skip
    for ours, ref, _ in lockstep(model, ctx, cache, [8] + [1] * 40):
        torch.testing.assert_close(ours.double(), ref.double(), atol=2e-4, rtol=1e-4)
        assert not cache.events or _held_real(cache) <= 96 + 16
    assert len(cache.events) >= 2


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_inside_a_continuation_on_head_wise_layers(attn):
    """A padded query at the start of a continuation sees no appended token; on a varlen layer its
    empty share of attention once came out NaN, which then spread through the row."""
    model = tiny_llama(attn, seed=5)
    ctx = _inputs(model)
    cache = compress_cache(model, ctx, ratio=0.5, scorer="knorm", budget="adakv")
    assert any(isinstance(layer, VarlenLayer) for layer in cache.layers)
    for ours, ref, _ in lockstep(model, ctx, cache, [5, 1, 1], pad_continuation=True):
        assert not ours.isnan().any()
        torch.testing.assert_close(ours.double(), ref.double(), atol=2e-5, rtol=1e-4)


@settings(max_examples=6, deadline=None)
@given(
    max_tokens=st.integers(6, 30),
    interval=st.integers(1, 9),
    sinks=st.integers(0, 3),
    recent=st.integers(0, 3),
    budget=st.sampled_from(["uniform", "zigzag", "pyramid", "adakv", "zigzag_heads"]),
    seed=st.integers(0, 10_000),
)
@example(max_tokens=6, interval=1, sinks=0, recent=0, budget="adakv", seed=0)  # heads that hold unequal counts
def test_totals_are_exact_at_every_event(max_tokens, interval, sinks, recent, budget, seed):
    torch.manual_seed(seed)
    model = tiny_llama(seed=seed % 7)
    ctx = _inputs(model, seq=30, pad=5)
    cache = compress_cache(model, ctx, ratio=0.3, scorer="knorm", budget=budget,
                           decoding=Decoding(max_tokens=max_tokens, interval=interval, sinks=sinks, recent=recent))  # fmt: skip
    layers = model.config.num_hidden_layers
    for _ in lockstep(model, ctx, cache, [1] * 10):
        pass
    assert len(cache.events) == 9 // interval  # an event runs before a token once `interval` were appended
    for event in cache.events:
        budgets = torch.tensor(event["budgets"])
        heads = budgets.shape[-1] if budgets.dim() == 3 else 1
        held = torch.tensor(event["held_before"])
        expected = torch.minimum(torch.tensor(max_tokens), held.floor().long())  # every row held at least that
        assert budgets.reshape(budgets.shape[0], -1).sum(-1).tolist() == (layers * heads * expected).tolist()
    for positions, layer in zip(cache.kept_positions, cache.layers):
        real = (positions >= 0).sum(-1)
        assert bool((real >= min(sinks + recent, max_tokens)).all() or layer.appended)

"""compress_cache on the real SmolLM2-135M-Instruct (float32, CPU), plus input validation.

The key test: logits of a continuation computed from the compressed cache equal those of the full
cache with the evicted positions masked per layer and KV head (tests/reference.py, float64).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from tests.conftest import continuation_logits, tiny_llama
from tests.reference import attention, keep_masks, masked_reference
from zigzag import UnsupportedModelError, cache_kwarg, compress_cache, prefill_context
from zigzag.scorers import window_attention
from zigzag.testing.needle import needle_prompt


def _batch(tok, lengths=(320, 230), seed=11):
    """Two needle contexts of different lengths, left padded, and a shared question."""
    prompts = [needle_prompt(tok, n, depth=0.4, seed=seed + i) for i, n in enumerate(lengths)]
    ctx = tok([p.context for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
    question = tok(prompts[0].question, return_tensors="pt", add_special_tokens=False).input_ids
    return ctx, question.expand(len(prompts), -1), prompts


def _continuation_logits(model, ctx, question, cache):
    ids = torch.cat([ctx.input_ids, question], dim=-1)
    mask = torch.cat([ctx.attention_mask, torch.ones_like(question)], dim=-1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -question.shape[1] :]
    with torch.no_grad():
        return model(
            input_ids=ids[:, -question.shape[1] :], attention_mask=mask, position_ids=positions, **cache_kwarg(model, cache)
        ).logits


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("budget", ["uniform", "zigzag"])
def test_compressed_logits_equal_masked_full_cache(smollm2, attn, budget):
    model, tok = smollm2
    ctx, question, _ = _batch(tok)
    with attention(model, attn):
        cache = compress_cache(model, ctx, ratio=0.6, scorer="snapkv", budget=budget)
        ours = _continuation_logits(model, ctx, question, cache)
        # Reference: the uncompressed prefill, masked per layer and head, in float64.
        full = prefill_context(model, ctx, window=0, query_stats_skip=None).cache
        with masked_reference(model, keep_masks(cache.kept_positions, ctx.input_ids.shape[1])):
            ref = _continuation_logits(model, ctx, question, full)
    assert (ours - ref).abs().max().item() < 1e-3
    if budget == "zigzag":  # the point of ZigZag: layers really differ
        assert len({layer.keys.shape[-2] for layer in cache.layers}) > 5


@pytest.mark.slow
def test_budgets_padding_and_positions(smollm2):
    model, tok = smollm2
    ctx, _, _ = _batch(tok)
    ratio = 0.75
    cache = compress_cache(model, ctx, ratio=ratio, scorer="knorm", budget="zigzag")
    lengths = ctx.attention_mask.sum(-1)
    num_layers = model.config.num_hidden_layers
    expected = [num_layers * int((1 - ratio) * int(t)) for t in lengths]
    assert cache.budgets.sum(dim=1).tolist() == expected
    assert cache.get_seq_length() == ctx.input_ids.shape[1]
    pad = (ctx.attention_mask == 0).sum(-1)
    for layer_idx, kept in enumerate(cache.kept_positions):
        for b in range(kept.shape[0]):
            real = kept[b][kept[b] >= 0]
            assert bool((real >= pad[b]).all()), "a padded position was kept"
            # every head keeps exactly its row's budget of distinct real tokens
            assert (kept[b] >= 0).sum(-1).tolist() == [int(cache.budgets[b, layer_idx])] * kept.shape[1]
    assert cache.lmba is not None and cache.lmba.shape == (2, num_layers)


@pytest.mark.slow
def test_one_prefill_serves_many_settings(smollm2):
    model, tok = smollm2
    ctx, _, _ = _batch(tok, lengths=(200, 150))
    pre = prefill_context(model, ctx)
    before = [layer.keys.clone() for layer in pre.cache.layers]
    for scorer, budget, ratio in [("snapkv", "zigzag", 0.5), ("expected_attention", "pyramid", 0.75)]:
        from_prefill = pre.compress(ratio, scorer, budget)
        direct = compress_cache(model, ctx, ratio, scorer, budget)
        assert all(torch.equal(a, b) for a, b in zip(from_prefill.kept_positions, direct.kept_positions))
    assert all(torch.equal(a, layer.keys) for a, layer in zip(before, pre.cache.layers))
    with pytest.raises(ValueError, match="window=64"):
        prefill_context(model, ctx, window=8).compress(0.5, "snapkv", "uniform")


@pytest.mark.slow
def test_ratio_zero_generates_like_no_compression(smollm2):
    model, tok = smollm2
    ctx, question, _ = _batch(tok, lengths=(260, 200))
    ids = torch.cat([ctx.input_ids, question], dim=-1)
    mask = torch.cat([ctx.attention_mask, torch.ones_like(question)], dim=-1)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    plain = model.generate(**kwargs)
    cache = compress_cache(model, ctx, ratio=0.0, scorer="snapkv", budget="zigzag")
    assert torch.equal(model.generate(**cache_kwarg(model, cache), **kwargs), plain)


@pytest.mark.slow
def test_captured_window_queries_are_the_models_queries(smollm2):
    """The pipeline's post-RoPE window queries reproduce the model's own (eager) attention rows."""
    model, tok = smollm2
    ctx, _, _ = _batch(tok, lengths=(150, 120))
    window = 16
    with attention(model, "eager"):
        pre = prefill_context(model, ctx, window=window, query_stats_skip=None)
        c = pre.context
        with torch.no_grad():
            out = model(**ctx, position_ids=c.positions, output_attentions=True)
    for layer in (0, 13, 29):
        ours = window_attention(pre.queries[layer].window, pre.cache.layers[layer].keys, c.valid, pre.scalings[layer])
        theirs = out.attentions[layer][:, :, -window:, :].float()
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def _hooks_of(model) -> dict[str, tuple]:
    """Every module's forward (pre-)hooks; transformers may own some, zigzag must leave none behind."""
    return {
        name: (tuple(m._forward_hooks.values()), tuple(m._forward_pre_hooks.values()))
        for name, m in model.named_modules()
    }


@pytest.mark.slow
def test_model_left_unchanged_also_on_error(smollm2):
    model, tok = smollm2
    ctx, _, _ = _batch(tok, lengths=(120, 100))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    hooks = _hooks_of(model)
    compress_cache(model, ctx, ratio=0.5)
    assert _hooks_of(model) == hooks

    class Broken:
        name, query_window, needs_query_stats, query_stats_skip = "broken", 8, True, 4

        def score(self, layer):
            raise RuntimeError("scorer failed midway")

    with pytest.raises(RuntimeError, match="midway"):
        compress_cache(model, ctx, ratio=0.5, scorer=Broken())
    assert _hooks_of(model) == hooks
    assert model.config.to_dict() == config
    assert not model.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# Chosen on development seeds 1-3, 2000 tokens, needle depth 0.3-0.7: ExpectedAttention with ZigZag
# budgets answered 3/3 at ratio 0.25, 2/3 at 0.5 and 0/3 at 0.75 (uniform budgets: 2/2 at 0.75).
NEEDLE_SCORER, NEEDLE_RATIO = "expected_attention", 0.25
NEEDLE_SEEDS = (101, 103, 104, 105)  # reported seeds: never used while choosing the settings above


def _answer(model, tok, prompt, cache=None) -> str:
    ctx = tok(prompt.context, return_tensors="pt", add_special_tokens=False).input_ids
    question = tok(prompt.question, return_tensors="pt", add_special_tokens=False).input_ids
    ids = torch.cat([ctx, question], dim=-1)
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), **cache_kwarg(model, cache), max_new_tokens=12, do_sample=False
    )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.slow
def test_needle_survives_zigzag_compression(smollm2):
    """A 2000-token haystack, one 7-digit needle; 3 of 4 reported samples must survive ZigZag at 0.25."""
    model, tok = smollm2
    correct = 0
    for seed in NEEDLE_SEEDS:
        prompt = needle_prompt(tok, 2000, depth=0.5, seed=seed)
        assert prompt.answer in _answer(model, tok, prompt), "the uncompressed model must answer"
        ctx = tok(prompt.context, return_tensors="pt", add_special_tokens=False)
        cache = compress_cache(model, ctx, ratio=NEEDLE_RATIO, scorer=NEEDLE_SCORER, budget="zigzag")
        assert cache.budgets.sum().item() == 30 * int(0.75 * ctx.input_ids.shape[1])
        correct += prompt.answer in _answer(model, tok, prompt, cache)
    assert correct >= 3, f"{correct}/{len(NEEDLE_SEEDS)} needles found"


# ---------------------------------------------------------------------------------------------- validation

@pytest.fixture(scope="module")
def tiny():
    return tiny_llama()


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_ratio(tiny, ratio):
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\)"):
        compress_cache(tiny, torch.ones(1, 8, dtype=torch.long), ratio=ratio)


def test_bad_inputs(tiny):
    ids = torch.ones(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="non-empty"):
        compress_cache(tiny, torch.ones(1, 0, dtype=torch.long), ratio=0.5)
    with pytest.raises(ValueError, match="does not match"):
        compress_cache(tiny, {"input_ids": ids, "attention_mask": torch.ones(2, 7, dtype=torch.long)}, ratio=0.5)
    right_padded = torch.ones(2, 8, dtype=torch.long)
    right_padded[1, -2:] = 0
    with pytest.raises(ValueError, match="left padding"):
        compress_cache(tiny, {"input_ids": ids, "attention_mask": right_padded}, ratio=0.5)
    with pytest.raises(TypeError, match="inputs must be"):
        compress_cache(tiny, "some text", ratio=0.5)
    with pytest.raises(ValueError, match="known scorers: cur, expected_attention"):
        compress_cache(tiny, ids, ratio=0.5, scorer="scissorhands")
    with pytest.raises(ValueError, match="pyramid"):
        compress_cache(tiny, ids, ratio=0.5, budget="adaptive")


def test_unsupported_architectures():
    config = MistralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=16,
    )
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        compress_cache(MistralForCausalLM(config), torch.ones(1, 8, dtype=torch.long), ratio=0.5)
    assert issubclass(UnsupportedModelError, ValueError)


def test_tiny_model_end_to_end_every_scorer_and_budget(tiny):
    from zigzag import BUDGETS, SCORERS

    ids = torch.randint(0, 128, (2, 70))
    mask = torch.ones_like(ids)
    mask[0, :10] = 0
    from zigzag.budget import get_budget

    for scorer, scorer_cls in SCORERS.items():
        if getattr(scorer_cls, "calibrated", False):  # built from a file (tests/test_qfilters.py)
            continue
        for name, cls in BUDGETS.items():
            profile = [[1.0, 3.0], [2.0, 0.5], [0.1, 4.0]] if cls.granularity == "head" else [1.0, 3.0, 2.0]
            budget = get_budget(name, profile=profile) if cls.calibrated else name  # per layer (and KV head)
            cache = compress_cache(tiny, {"input_ids": ids, "attention_mask": mask}, 0.5, scorer=scorer, budget=budget)
            assert cache.budgets.sum(1).tolist() == [3 * 30, 3 * 35]
            full = copy.deepcopy(cache)
            assert full.get_seq_length() == 70


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_head_wise_adakv_budgets_are_exact_on_a_tiny_model(attn):
    model = tiny_llama(attn, seed=4)
    batch, seq, q = 2, 48, 3
    ids = torch.randint(0, 128, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, :5] = 0
    ctx = {"input_ids": ids, "attention_mask": mask}
    cache = compress_cache(model, ctx, ratio=0.5, scorer="knorm", budget="adakv")
    lengths = mask.sum(-1)
    for layer, kept in enumerate(cache.kept_positions):
        per_head = (kept >= 0).sum(-1)  # (batch, kv_heads): heads keep different numbers of tokens
        assert per_head.sum(-1).tolist() == [2 * int(0.5 * int(n)) for n in lengths]
    assert any(len(set(k[b].ne(-1).sum(-1).tolist())) > 1 for k in cache.kept_positions for b in range(batch))
    ours, ref = continuation_logits(model, ctx, cache, q)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_unpadded_batches_skip_the_padding_mask_with_the_same_scores():
    """The context records whether any row is padded; without padding, SnapKV's and ZigZag's window
    attention skip the padding mask, and the scores are those of the fully masked path."""
    from dataclasses import replace

    from tests.conftest import tiny_llama
    from zigzag.scorers import get_scorer

    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 100))
    pre = prefill_context(model, {"input_ids": ids}, window=64, query_stats_skip=None)
    assert pre.context.padded is False
    padded_pre = prefill_context(
        model, {"input_ids": ids, "attention_mask": torch.cat([torch.zeros(2, 1), torch.ones(2, 99)], 1).long()},
        window=64, query_stats_skip=None,
    )  # fmt: skip
    assert padded_pre.context.padded is True
    scorer = get_scorer("snapkv")
    for layer in range(pre.num_layers):
        fast = pre.scores(scorer, layer)
        pre.context = replace(pre.context, padded=True)
        masked = pre.scores(scorer, layer)
        pre.context = replace(pre.context, padded=False)
        torch.testing.assert_close(fast, masked, rtol=0, atol=0)


NEW_METHODS = [
    ("keydiff", "uniform"),
    ("lagkv", "uniform"),
    ("leverage", "uniform"),
    ("cur", "uniform"),
    ("observed_attention", "uniform"),
    ("h2o", "uniform"),
    ("snapkv+chunk10", "uniform"),
    ("tova+critical", "uniform"),
    ("snapkv+critical", "adakv"),
    ("kvzip_plus", "uniform"),
    ("snapkv", "simlayerkv+recent64+threshold0.5"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("scorer", "budget"), NEW_METHODS, ids=[f"{s}-{b}" for s, b in NEW_METHODS])
def test_every_method_gives_the_masked_reference_on_smollm2(smollm2, scorer, budget):
    """Each method's cache on the real model: continuation logits equal the float64 masked full cache,
    and the method chose something other than plain recency."""
    model, tok = smollm2
    ctx, question, _ = _batch(tok, lengths=(260, 190))
    cache = compress_cache(model, ctx, ratio=0.6, scorer=scorer, budget=budget)
    ours = _continuation_logits(model, ctx, question, cache)
    full = prefill_context(model, ctx, window=0, query_stats_skip=None).cache
    with masked_reference(model, keep_masks(cache.kept_positions, ctx.input_ids.shape[1])):
        ref = _continuation_logits(model, ctx, question, full)
    assert (ours - ref).abs().max().item() < 1e-3
    recent = cache.kept_positions[5][0] >= ctx.input_ids.shape[1] - cache.kept_positions[5].shape[-1]
    assert not bool(recent.all())

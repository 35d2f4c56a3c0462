"""Edges of the pipeline that an adversarial user finds: scores that misbehave, allocators that
cheat, ratios that floating point rounds badly, models zigzag cannot compress, a model in train mode."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from tests.conftest import tiny_llama
from zigzag import UnsupportedModelError, cache_kwarg, compress_cache, prefill_context
from zigzag.pipeline.inputs import kept_tokens
from zigzag.scorers import Scorer

PAD = 6


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=2)


def _padded_pair(seq: int = 40, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two rows: row 0 left padded by PAD tokens, row 1 full."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (2, seq), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :PAD] = 0
    return {"input_ids": ids, "attention_mask": mask}


@dataclass
class Constant(Scorer):
    """Every real token gets the same score (``-inf`` by default): a scorer that gives no preference."""

    value: float = float("-inf")
    name: ClassVar[str] = "constant"

    def score(self, layer):
        return torch.full(layer.keys.shape[:3], self.value)


@pytest.mark.parametrize("budget", ["uniform", "zigzag", "adakv"])
@pytest.mark.parametrize("path", ["layerwise", "full"])
def test_padding_is_never_kept_whatever_the_scores(model, budget, path):
    inputs = _padded_pair()
    scorer = Constant()
    if path == "layerwise":
        cache = compress_cache(model, inputs, 0.5, scorer, budget)
    else:
        cache = prefill_context(model, inputs).compress(0.5, scorer, budget)
    for kept in cache.kept_positions:
        row = kept[0]
        assert bool(((row < 0) | (row >= PAD)).all()), "a padding column was kept"
        assert int((row >= 0).sum(-1).max()) <= 40 - PAD  # no head holds more than its row has
    if budget == "adakv":
        return  # its split between heads breaks ties by topk, whose order among equal scores is unspecified
    # The padded row's continuation is that of the same tokens without padding.
    alone = {k: v[:1, PAD:] for k, v in inputs.items()}
    single = compress_cache(model, alone, 0.5, scorer, budget)
    new = torch.randint(0, 128, (1, 3))
    mask = torch.cat([inputs["attention_mask"][:1], torch.ones_like(new)], dim=-1)
    cache.batch_select_indices(torch.tensor([0]))
    with torch.no_grad():
        padded = model(input_ids=new, attention_mask=mask, position_ids=torch.arange(34, 37)[None], **cache_kwarg(model, cache)).logits
        plain = model(input_ids=new, attention_mask=mask[:, PAD:], position_ids=torch.arange(34, 37)[None], **cache_kwarg(model, single)).logits
    torch.testing.assert_close(padded, plain, atol=1e-5, rtol=0)


@pytest.mark.parametrize("path", ["layerwise", "full"])
def test_nan_scores_raise(model, path):
    inputs = _padded_pair()
    scorer = Constant(float("nan"))
    with pytest.raises(ValueError, match="scorer constant returned NaN"):
        if path == "layerwise":
            compress_cache(model, inputs, 0.5, scorer, "uniform")
        else:
            prefill_context(model, inputs).compress(0.5, scorer, "uniform")


def test_a_wrongly_shaped_score_is_named(model):
    class Flat(Scorer):
        name = "flat"

        def score(self, layer):
            return layer.keys.norm(dim=-1).flatten()

    with pytest.raises(ValueError, match=r"scorer flat must return a \(batch, kv_heads, seq\)"):
        compress_cache(model, _padded_pair(), 0.5, Flat(), "uniform")


class Cheat:
    """An allocator written to the protocol that returns what it is told to."""

    name = "cheat"
    granularity = "layer"
    needs_lmba = False

    def __init__(self, make):
        self.make = make

    def allocate(self, avg_budget, seq_len, num_layers, lmba=None):
        return self.make(avg_budget, seq_len, num_layers)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda avg, seq, layers: avg[:, None].expand(-1, layers) + 1, "must keep exactly"),
        (lambda avg, seq, layers: torch.stack([2 * avg, 0 * avg], dim=1) - 1, "negative"),
        (lambda avg, seq, layers: torch.stack([seq + 1, 2 * avg - seq - 1], dim=1), "holds only"),
        (lambda avg, seq, layers: avg[:, None].expand(-1, layers).float(), "integer tensor"),
        (lambda avg, seq, layers: avg[:, None], "must return shape"),
    ],
)
def test_an_allocators_output_is_checked_and_named(model, make, match):
    for run in (lambda: compress_cache(model, _padded_pair(), 0.25, "knorm", Cheat(make)),
                lambda: prefill_context(model, _padded_pair()).compress(0.25, "knorm", Cheat(make))):  # fmt: skip
        with pytest.raises(ValueError, match=f"budget 'cheat'.*{match}|{match}.*"):
            run()


def test_an_allocator_split_is_checked(model):
    class BadSplit(Cheat):
        granularity = "split"

        def split_heads(self, scores, valid, layer_budget):
            return torch.stack([layer_budget * 2 + 1, -torch.ones_like(layer_budget)], dim=1)

    uniform = lambda avg, seq, layers: avg[:, None].expand(-1, layers)
    with pytest.raises(ValueError, match="budget 'cheat': split_heads must give each KV head"):
        compress_cache(model, _padded_pair(), 0.5, "knorm", BadSplit(uniform))


@pytest.mark.parametrize(("ratio", "length", "kept"), [(0.9, 100, 10), (0.8, 5, 1), (0.7, 10, 3), (1 / 3, 3, 2), (0.0, 7, 7)])
def test_budgets_have_no_float_error(model, ratio, length, kept):
    assert kept_tokens(torch.tensor([length]), ratio).tolist() == [kept]
    ids = torch.randint(0, 128, (1, length))
    cache = compress_cache(model, ids, ratio, "knorm", "uniform")
    assert cache.budgets.tolist() == [[kept, kept]]


def test_gpt_neox_is_unsupported_not_a_type_error():
    config = GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    with pytest.raises(UnsupportedModelError, match="model_type 'gpt_neox'"):
        compress_cache(GPTNeoXForCausalLM(config), torch.ones(1, 8, dtype=torch.long), ratio=0.5)


def test_a_scorer_missing_a_member_is_a_type_error(model):
    class NoWindow:
        name = "no_window"
        needs_query_stats = False
        query_stats_skip = 0

        def score(self, layer):
            return -layer.keys.norm(dim=-1)

    with pytest.raises(TypeError, match="scorer NoWindow has no attribute 'query_window'"):
        compress_cache(model, torch.ones(1, 8, dtype=torch.long), 0.5, NoWindow())


def test_a_model_in_train_mode_is_compressed_without_dropout():
    """Dropout would make the scores random; compression runs in eval mode and leaves train mode on."""
    model = tiny_llama(layers=2)
    model.config.attention_dropout = 0.5
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    inputs = _padded_pair()
    expected = compress_cache(model, inputs, 0.5, "snapkv", "zigzag")
    model.train()
    model.model.layers[0].eval()  # a mixed state must come back as it was
    cache = compress_cache(model, inputs, 0.5, "snapkv", "zigzag")
    pre = prefill_context(model, inputs)
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training
    for ours, theirs in zip(cache.layers, expected.layers):
        assert torch.equal(ours.kept_positions, theirs.kept_positions)
        torch.testing.assert_close(ours.keys, theirs.keys)
    torch.testing.assert_close(pre.cache.layers[1].keys, prefill_context(model.eval(), inputs).cache.layers[1].keys)


def test_zigzags_own_calls_do_not_warn_about_the_cache_argument(model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compress_cache(model, _padded_pair(), 0.5, "snapkv", "zigzag")
        compress_cache(model, _padded_pair(), 0.5, "kvzip", "uniform")
        prefill_context(model, _padded_pair())
    assert not [w for w in caught if "past_key_values" in str(w.message)]

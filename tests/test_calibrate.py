"""Sensitivity calibration: the one-layer compression it measures, the samples it cuts, its profile."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import tiny_llama
from zigzag import prefill_context
from zigzag.budget import Sensitivity
from zigzag.calibrate import SensitivityConfig, copy_samples, measure_sensitivity, save_profile
from zigzag.calibrate.sensitivity import _one_layer_max_tokens, _OneLayer
from zigzag.calibrate.texts import stdlib_docstrings

SMALL = SensitivityConfig(context_tokens=192, copy_tokens=32, cue_tokens=8, samples=3, batch_size=2)


def test_copy_samples_copy_their_own_context():
    ids = list(range(5000))
    samples = copy_samples(ids, SMALL)
    assert len(samples) == 3
    starts = set()
    for ctx, copy in samples:
        assert len(ctx) == 192 and len(copy) == 32
        at = ctx.index(copy[0])
        assert ctx[at : at + 32] == copy and 32 <= at <= 192 - 64
        starts.add(ctx[0])
    assert len(starts) == 3  # contexts come from different places of the text
    assert copy_samples(ids, SMALL) == samples  # the seed fixes them
    with pytest.raises(ValueError, match="calibration text has 100 tokens"):
        copy_samples(ids[:100], SMALL)


def test_one_layer_allocator_compresses_that_layer_only():
    model = tiny_llama()
    ids = torch.randint(0, model.config.vocab_size, (2, 96))
    layers = model.config.num_hidden_layers
    pre = prefill_context(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    max_tokens = _one_layer_max_tokens(96, 24, layers)
    for layer in range(layers):
        cache = pre.compress(max_tokens=max_tokens, scorer="knorm", budget=_OneLayer(layer=layer))
        kept = cache.budgets[0].tolist()
        expected = [96] * layers
        expected[layer] = layers * max_tokens - (layers - 1) * 96
        assert kept == expected and 24 - layers < expected[layer] <= 24


def test_profile_on_a_tiny_model(tmp_path):
    model = tiny_llama()
    ids = torch.randint(0, model.config.vocab_size, (2000,)).tolist()
    profile = measure_sensitivity(model, ids, SMALL)
    layers = model.config.num_hidden_layers
    assert len(profile["layers"]) == layers and all(x >= 0 for x in profile["layers"])
    assert torch.tensor(profile["per_sample"]).shape == (3, layers)
    assert torch.allclose(
        torch.tensor(profile["per_sample"], dtype=torch.float64).mean(0),
        torch.tensor(profile["layers"], dtype=torch.float64),
    )
    again = measure_sensitivity(model, ids, SMALL)
    assert torch.allclose(torch.tensor(again["layers"]), torch.tensor(profile["layers"]), rtol=1e-6, atol=1e-12)
    path = tmp_path / "p.json"
    save_profile(profile, path, model="tiny")
    saved = json.loads(path.read_text())
    assert saved["about"]["model"] == "tiny" and saved["config"]["context_tokens"] == 192
    allocator = Sensitivity.from_file(path)
    assert int(allocator.allocate(40, 192, layers).sum()) == 40 * layers


def test_stdlib_text_is_prose():
    text = stdlib_docstrings()
    assert len(text.split()) > 50_000
    assert "Return" in text and "def " not in text[:10_000]


@pytest.mark.slow
def test_real_model_profile(smollm2, tmp_path):
    """On SmolLM2 the calibration task is meaningful (the full model copies the span almost surely) and
    compressing single layers changes its predictions by different amounts."""
    model, tok = smollm2
    ids = tok(stdlib_docstrings()[:100_000], add_special_tokens=False)["input_ids"]
    config = SensitivityConfig(
        scorer="knorm", context_tokens=384, copy_tokens=48, cue_tokens=12, samples=2, batch_size=2
    )
    profile = measure_sensitivity(model, ids, config)
    layers = torch.tensor(profile["layers"])
    assert profile["uncompressed_nll"] < 0.5  # nats per copied token: it copies
    assert layers.shape == (30,) and bool((layers >= 0).all())
    assert float(layers.max()) > 10 * float(layers.median()) > 0  # some layers matter much more
    budgets = Sensitivity(weights=tuple(layers.tolist()), bound_fraction=0.5).allocate(96, 384, 30)[0]
    assert int(budgets.sum()) == 96 * 30 and int(budgets[layers.argmax()]) == int(budgets.max())

"""What a varlen cache computes on the host per step of ``model.generate``: nothing that grows with the
layers beyond the attention itself.

``generate`` hands attention a new mask object at every step (or none at all without padding after
the context), asks the cache for its mask sizes and length, and never reads its kept positions. Each
count below is of work that would cost host time per layer and step if a memo broke or a read crept
in: a varlen layer's dense index (rebuilt on each access), the tail of the model's mask (made once per
forward and shared by the layers), the backend switch (resolved once per layer).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from tests.conftest import tiny_llama
from zigzag import cache_kwarg, compress_cache
from zigzag.cache import varlen
from zigzag.cache.varlen import VarlenLayer

NEW_TOKENS = 4


class Counter:
    """Wraps a function (or, set on a class, a method); counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)

    def __get__(self, obj, owner=None):
        return self if obj is None else functools.partial(self, obj)


@pytest.fixture(scope="module")
def varlen_cache():
    """A tiny model and a one-row adakv cache of 48 tokens, with varlen layers."""
    model = tiny_llama(layers=3, seed=4)
    context = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(5))
    cache = compress_cache(model, context, ratio=0.5, scorer="expected_attention", budget="adakv")
    assert any(isinstance(layer, VarlenLayer) for layer in cache.layers)
    return model, context, cache


def _generate(model, context: torch.Tensor, cache, padded: bool) -> None:
    """``NEW_TOKENS`` greedy tokens after the context (2 rows), with a masked padding token before the
    new one when ``padded``: then the model passes attention a mask at every step."""
    new = [0, 7] if padded else [7]
    ids = torch.cat([context, torch.tensor([new])], dim=-1).repeat(2, 1)
    mask = torch.ones_like(ids)
    if padded:
        mask[:, -2] = 0
    cache.batch_repeat_interleave(2)
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                   do_sample=False, pad_token_id=0, **cache_kwarg(model, cache))  # fmt: skip


@pytest.mark.parametrize("padded", [False, True])
def test_a_generate_step_builds_no_index_and_one_tail_mask_per_forward(varlen_cache, monkeypatch, padded):
    model, context, one_row = varlen_cache
    cache = copy.deepcopy(one_row)
    kept = Counter(VarlenLayer.kept_positions.fget)
    monkeypatch.setattr(VarlenLayer, "kept_positions", property(kept))
    tails = Counter(varlen._tail_of)
    monkeypatch.setattr(varlen, "_tail_of", tails)
    backends = Counter(varlen.get_backend)
    monkeypatch.setattr(varlen, "get_backend", backends)
    attends = Counter(VarlenLayer.attend)
    monkeypatch.setattr(VarlenLayer, "attend", attends)

    _generate(model, context, cache, padded)
    layers = sum(isinstance(layer, VarlenLayer) for layer in cache.layers)
    assert attends.calls == NEW_TOKENS * layers  # one attention per varlen layer and forward
    assert kept.calls == 0  # the dense index is never rebuilt while generating
    assert tails.calls == (NEW_TOKENS if padded else 0)  # once per forward, shared by its layers
    assert backends.calls <= layers  # resolved once per layer, not per step

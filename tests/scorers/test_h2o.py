"""H2O against a float64 reference built from the full (seq x seq) causal attention."""

from __future__ import annotations

import math

import pytest
import torch

from zigzag.scorers.h2o import H2O
from zigzag.scorers.observed import ALL_QUERIES


def accumulated_reference(layer, window):
    """float64: each key's attention summed over the valid queries read (the last ``w``), from the
    whole causal attention matrix, then averaged over the query heads of each KV group."""
    keys = layer.keys.double()
    batch, kv_heads, seq, head_dim = keys.shape
    given = layer.window_queries.double()
    w = given.shape[2] if window is None else min(window, seq)
    heads = given.shape[1]
    groups = heads // kv_heads
    out = torch.zeros(batch, kv_heads, seq, dtype=torch.float64)
    for b in range(batch):
        valid = layer.valid[b]
        queries = torch.zeros(heads, seq, head_dim, dtype=torch.float64)
        queries[:, seq - w :] = given[b, :, given.shape[2] - w :]
        counted = (torch.arange(seq) >= seq - w) & valid
        visible = torch.ones(seq, seq, dtype=torch.bool).tril() & valid[None, :]
        for h in range(heads):
            probs = torch.softmax(
                (queries[h] @ keys[b, h // groups].T * layer.scaling).masked_fill(~visible, -math.inf), -1
            )
            out[b, h // groups] += probs[counted].sum(dim=0) / groups
    return out


def recent_mask(layer, ratio):
    """The last int(ratio * n) valid tokens of each row of n, as the authors' code counts them."""
    mask = torch.zeros_like(layer.valid)
    for b in range(layer.batch):
        n = int(layer.valid[b].sum())
        k = int(ratio * n)
        if k:
            mask[b, layer.seq - k :] = True
    return mask


@pytest.mark.parametrize(
    "lengths,ratio,window,block_size",
    [
        ((30, 21), 0.1, None, 4),
        ((20, 13, 2), 0.25, None, 256),
        ((16, 16), 0.0, None, 3),
        ((18, 9), 0.5, 5, 2),
        ((7,), 1.0, None, 1),
    ],
)
@pytest.mark.parametrize("groups", [1, 3])
def test_matches_full_attention_reference(kit, lengths, ratio, window, block_size, groups):
    kv_heads, head_dim = 2, 8
    rows = [kit.random_row(n, kv_heads * groups, kv_heads, head_dim) for n in lengths]
    scorer = H2O(recent_ratio=ratio, window=window, block_size=block_size)
    layer = kit.build_for(scorer, rows)
    scores = scorer.score(layer).double()
    ref = accumulated_reference(layer, window)
    recent = recent_mask(layer, ratio)
    for b in range(len(rows)):
        valid = layer.valid[b]
        others, protected = valid & ~recent[b], valid & recent[b]
        torch.testing.assert_close(scores[b][:, others], ref[b][:, others], rtol=1e-5, atol=1e-6)
        if others.any() and protected.any():
            # the recent window is lifted above every other token, keeping its own order
            assert (scores[b][:, protected].amin(-1) >= scores[b][:, others].amax(-1) + 1 - 1e-5).all()
            shift = scores[b][:, protected] - ref[b][:, protected]
            torch.testing.assert_close(shift, shift[:, :1].expand_as(shift), rtol=0, atol=1e-5)
        elif protected.any():  # everything is recent: nothing to lift above
            torch.testing.assert_close(scores[b][:, protected], ref[b][:, protected], rtol=1e-5, atol=1e-6)


def test_uniform_attention_is_the_harmonic_tail(kit):
    """Zero keys: query t gives 1 / (t + 1) to each key j <= t; summed, key j gets H(seq) - H(j)."""
    seq = 12
    layer = kit.build_for(H2O(), [kit.random_row(seq, 2, 2, 4)])
    layer.keys = torch.zeros_like(layer.keys)
    expected = torch.tensor([sum(1 / (t + 1) for t in range(j, seq)) for j in range(seq)])
    scores = H2O(recent_ratio=0.0, block_size=5).score(layer)[0]
    torch.testing.assert_close(scores, expected.float().expand(2, seq))
    assert (scores[:, :-1] > scores[:, 1:]).all()  # not normalized: earlier tokens accumulate more


def test_heavy_hitter_beats_its_neighbours(kit):
    """A key every later query attends to strongly outranks the early tokens that uniform attention favours."""
    seq, d = 40, 8
    layer = kit.build_for(H2O(), [kit.random_row(seq, 2, 1, d)])
    layer.window_queries = torch.zeros_like(layer.window_queries)
    layer.window_queries[..., 0] = 1.0
    layer.keys = torch.zeros_like(layer.keys)
    layer.keys[0, :, 17, 0] = 20.0  # logit 20 / sqrt(8) for every query that sees it
    scores = H2O().score(layer)[0, 0]
    assert int(scores[: seq - 4].argmax()) == 17
    assert scores[17] > 20  # about one unit of attention from each of the 23 queries that see it


def test_recent_count_follows_the_valid_length(kit):
    rows = [kit.random_row(n, 2, 1, 4) for n in (30, 9)]
    scorer = H2O(recent_ratio=0.1)
    layer = kit.build_for(scorer, rows, seq=33)
    scores = scorer.score(layer)[:, 0]
    # 0.1 * 30 keeps 3 (float 3.0000000000000004 floors to 3); 0.1 * 9 keeps none
    top = scores[0].argsort(descending=True)[:3].sort().values
    assert top.tolist() == [30, 31, 32]
    assert (scores[0, 30:].amin() >= scores[0, 3:30].amax() + 1 - 1e-6).item()
    assert scores[1, 24:].amax() < 10  # no lift: accumulated attention of 9 queries is at most 9


def test_query_window_and_errors(kit):
    assert H2O().query_window == ALL_QUERIES
    assert H2O(window=16).query_window == 16
    assert H2O.name == "h2o" and H2O().needs_query_stats is False
    with pytest.raises(ValueError, match="window_queries"):
        H2O().score(kit.build([kit.random_row(5, 2, 1, 4)]))


@pytest.mark.parametrize(
    "kwargs",
    [{"recent_ratio": -0.1}, {"recent_ratio": 1.01}, {"recent_ratio": True}, {"recent_ratio": "0.1"},
     {"window": 0}, {"block_size": 0}, {"block_size": 2.0}],
)  # fmt: skip
def test_bad_hyperparameters(kwargs):
    with pytest.raises(ValueError):
        H2O(**kwargs)

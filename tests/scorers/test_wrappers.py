"""Scorer wrappers (Protected, HeadShared, max span pooling) and the suffix syntax of get_scorer."""

from __future__ import annotations

import pytest
import torch

from zigzag.scorers import (
    ExpectedAttention,
    HeadShared,
    Knorm,
    LayerView,
    Protected,
    SnapKV,
    SpanPooled,
    get_scorer,
)


class Fixed:
    """A scorer returning given scores (batch, kv_heads, seq)."""

    name = "fixed"
    query_window = 0
    needs_query_stats = False
    query_stats_skip = 0

    def __init__(self, scores):
        self.scores = scores

    def score(self, layer):
        return self.scores.clone()


def _view(batch, kv_heads, seq, pads=None):
    valid = torch.ones(batch, seq, dtype=torch.bool)
    for b, p in enumerate(pads or []):
        valid[b, :p] = False
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    keys = torch.randn(batch, kv_heads, seq, 4)
    return LayerView(keys=keys, values=keys.clone(), valid=valid, positions=positions, scaling=0.5)


def _top(scores, valid, k):
    return set(scores.masked_fill(~valid, float("-inf")).topk(k).indices.tolist())


def test_protected_first_and_last_win_and_padding_does_not_move_them():
    scores = torch.rand(2, 3, 20)
    view = _view(2, 3, 20, pads=[0, 6])
    out = Protected(Fixed(scores), first=3, last=2).score(view)
    for b, pad in enumerate([0, 6]):
        for h in range(3):
            assert _top(out[b, h], view.valid[b], 5) == {pad, pad + 1, pad + 2, 18, 19}
    # unprotected tokens keep their inner scores and order
    torch.testing.assert_close(out[0, :, 3:18], scores[0, :, 3:18])
    assert Protected(Knorm(), first=64).name == "knorm+first64"
    assert Protected(Knorm(), first=0, last=8).name == "knorm+last8"
    with pytest.raises(ValueError):
        Protected(Knorm(), first=-1)


def test_head_shared_gives_every_head_the_same_scores_from_ranks():
    scores = torch.tensor([[[0.0, 1.0, 2.0, 3.0], [30.0, 20.0, 10.0, 0.0]]])  # opposite orders, other scales
    view = _view(1, 2, 4)
    mean = HeadShared(Fixed(scores)).score(view)
    assert torch.equal(mean[:, 0], mean[:, 1])
    torch.testing.assert_close(mean[0, 0], torch.full((4,), 0.5))  # ranks (0,1,2,3)/3 and (3,2,1,0)/3
    best = HeadShared(Fixed(scores), reduce="max").score(view)
    torch.testing.assert_close(best[0, 0], torch.tensor([1.0, 2 / 3, 2 / 3, 1.0]))
    assert HeadShared(Knorm()).name == "knorm+shared" and HeadShared(Knorm(), "max").name == "knorm+sharedmax"


def test_head_shared_ignores_padding_and_ties_share_ranks():
    scores = torch.tensor([[[9.0, 9.0, 1.0, 1.0, 2.0]]])
    view = _view(1, 1, 5, pads=[1])
    out = HeadShared(Fixed(scores)).score(view)
    # valid values 9, 1, 1, 2: ranks 1, 1/6, 1/6, 2/3 (ties share their mean rank)
    torch.testing.assert_close(out[0, 0, 1:], torch.tensor([1.0, 1 / 6, 1 / 6, 2 / 3]))
    padded = HeadShared(Fixed(scores[..., 1:])).score(_view(1, 1, 4))
    torch.testing.assert_close(out[..., 1:], padded)


def test_max_pooling_spreads_peaks_to_their_span():
    scores = torch.zeros(1, 1, 9)
    scores[0, 0, 4] = 5.0
    scores[0, 0, 0] = -1.0
    view = _view(1, 1, 9)
    out = SpanPooled(Fixed(scores), 3, mode="max").score(view)
    assert out[0, 0].tolist() == [0.0, 0.0, 0.0, 5.0, 5.0, 5.0, 0.0, 0.0, 0.0]
    assert SpanPooled(Knorm(), 9, mode="max").name == "knorm+maxpool9"
    # padding never wins a neighbour's max
    padded = torch.cat([torch.full((1, 1, 2), 100.0), scores], dim=-1)
    out_p = SpanPooled(Fixed(padded), 3, mode="max").score(_view(1, 1, 11, pads=[2]))
    torch.testing.assert_close(out_p[..., 2:], out)
    with pytest.raises(ValueError, match="mode"):
        SpanPooled(Knorm(), 3, mode="median")


def test_suffixes_build_the_wrappers_left_to_right():
    s = get_scorer("Expected-Attention+pool5+shared+first64+last32")
    assert s.name == "expected_attention+pool5+shared+first64+last32"
    assert isinstance(s, Protected) and s.last == 32 and isinstance(s.inner, Protected) and s.inner.first == 64
    assert isinstance(s.inner.inner, HeadShared) and isinstance(s.inner.inner.inner, SpanPooled)
    assert isinstance(s.inner.inner.inner.inner, ExpectedAttention)
    assert s.needs_query_stats and s.query_stats_skip == 4 and s.query_window == 0
    t = get_scorer("snapkv+maxpool9+sharedmax")
    assert t.query_window == SnapKV().query_window and t.inner.mode == "max" and t.reduce == "max"


@pytest.mark.parametrize(("spec", "match"), [("knorm+pool", "unknown suffix"), ("knorm+pool4", "odd"), ("knorm+median3", "unknown suffix"), ("scissorhands+pool5", "unknown scorer")])
def test_bad_suffixes(spec, match):
    with pytest.raises(ValueError, match=match):
        get_scorer(spec)

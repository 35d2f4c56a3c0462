from __future__ import annotations

import math

import pytest
import torch

from zigzag.scorers import LayerView
from zigzag.scorers.keydiff import KeyDiff


def keydiff_reference(layer) -> torch.Tensor:
    """float64 loops: anchor = mean over the valid tokens of k / |k|; score = -k . a / (|k| |a|)."""
    keys = layer.keys.double()
    batch, kv_heads, seq, d = keys.shape
    out = torch.zeros(batch, kv_heads, seq, dtype=torch.float64)
    for b in range(batch):
        seen = [j for j in range(seq) if layer.valid[b, j]]
        for h in range(kv_heads):
            norms = {j: math.sqrt(sum(float(x) ** 2 for x in keys[b, h, j])) for j in seen}
            anchor = [sum(float(keys[b, h, j, c]) / norms[j] for j in seen) / len(seen) for c in range(d)]
            anchor_norm = math.sqrt(sum(a * a for a in anchor))
            for j in seen:
                dot = sum(float(keys[b, h, j, c]) * anchor[c] for c in range(d))
                out[b, h, j] = -dot / (norms[j] * anchor_norm)
    return out


@pytest.mark.parametrize("lengths,seq", [((11, 7), None), ((16, 3, 1), 19), ((9,), None)])
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keydiff_matches_loop_reference(kit, lengths, seq, groups, dtype):
    kv_heads, head_dim = 2, 8
    rows = [kit.random_row(n, kv_heads * groups, kv_heads, head_dim) for n in lengths]
    layer = kit.build(rows, seq=seq, dtype=dtype)
    scores = KeyDiff().score(layer)
    assert scores.dtype == torch.float32
    ref = keydiff_reference(layer)
    mask = layer.valid[:, None, :].expand_as(scores)
    torch.testing.assert_close(scores[mask].double(), ref[mask], rtol=0, atol=2e-6)


def _layer(keys: torch.Tensor) -> LayerView:
    """One row, one KV head, no padding, from ``keys: (seq, d)``."""
    seq = keys.shape[0]
    return LayerView(
        keys[None, None],
        torch.zeros_like(keys)[None, None],
        torch.ones(1, seq, dtype=torch.bool),
        torch.arange(seq)[None],
        0.5,
    )


def test_distinct_key_scores_highest_whatever_its_norm():
    """The anchor averages *directions*: a huge key off the common direction does not pull the anchor to
    itself (a mean of raw keys would make it the most similar key, and the first evicted)."""
    torch.manual_seed(0)
    common = torch.tensor([1.0, 0.0, 0.0, 0.0]) + 0.05 * torch.randn(9, 4)
    keys = torch.cat([0.1 * common, torch.tensor([[0.0, 100.0, 0.0, 0.0]])])
    scores = KeyDiff().score(_layer(keys))[0, 0]
    assert scores.argmax().item() == 9
    # Scaling a key leaves every score unchanged: only directions count.
    scaled = keys.clone()
    scaled[3] *= 40.0
    torch.testing.assert_close(KeyDiff().score(_layer(scaled))[0, 0], scores)


def test_keys_along_the_anchor_score_minus_one_and_opposite_plus_one():
    keys = torch.tensor([[2.0, 0.0], [5.0, 0.0], [3.0, 0.0], [-1.0, 0.0]])  # anchor (1 + 1 + 1 - 1) / 4 along x
    scores = KeyDiff().score(_layer(keys))[0, 0]
    torch.testing.assert_close(scores, torch.tensor([-1.0, -1.0, -1.0, 1.0]))


def test_padding_does_not_move_the_anchor(kit):
    """Huge garbage on the padding would dominate an anchor that counted it."""
    row = kit.random_row(6, 2, 2, 8)
    padded = kit.build([row], seq=15)
    padded.keys[:, :, :9] = 1e4
    torch.testing.assert_close(KeyDiff().score(padded)[:, :, 9:], KeyDiff().score(kit.build([row])), rtol=0, atol=1e-6)


def test_zero_keys_are_finite():
    keys = torch.zeros(5, 4)
    keys[2] = torch.tensor([1.0, 2.0, 0.0, 0.0])
    scores = KeyDiff().score(_layer(keys))
    assert torch.isfinite(scores).all()
    assert scores[0, 0, 0] == 0.0
    assert abs(scores[0, 0, 2].item() + 1.0) < 1e-6
    assert torch.isfinite(KeyDiff().score(_layer(torch.zeros(3, 4)))).all()


def test_keydiff_attributes():
    scorer = KeyDiff()
    assert (scorer.name, scorer.query_window, scorer.needs_query_stats, scorer.query_stats_skip) == (
        "keydiff",
        0,
        False,
        0,
    )

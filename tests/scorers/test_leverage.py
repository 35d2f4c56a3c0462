from __future__ import annotations

import pytest
import torch

import zigzag.scorers.leverage as leverage_module
from zigzag.scorers import LayerView
from zigzag.scorers.leverage import LeverageScore, leverage_scores


def hat_diagonal(x: torch.Tensor, center: bool) -> torch.Tensor:
    """float64: the diagonal of X pinv(X), X = x (n, d) minus its mean when ``center``; an (n, n) matrix."""
    x = x.double()
    if center:
        x = x - x.mean(dim=0, keepdim=True)
    return torch.diagonal(x @ torch.linalg.pinv(x))


def leverage_reference(x: torch.Tensor, valid: torch.Tensor, center: bool) -> torch.Tensor:
    batch, heads, seq, _ = x.shape
    out = torch.zeros(batch, heads, seq, dtype=torch.float64)
    for b in range(batch):
        idx = valid[b].nonzero().flatten()
        for h in range(heads):
            out[b, h, idx] = hat_diagonal(x[b, h, idx], center)
    return out


@pytest.mark.parametrize("lengths,seq", [((20, 13), None), ((40, 9, 1), 43), ((5, 3), None), ((17,), 17)])
@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_leverage_matches_hat_matrix(kit, lengths, seq, center, dtype):
    rows = [kit.random_row(n, 6, 2, 8) for n in lengths]
    layer = kit.build(rows, seq=seq, dtype=dtype)
    scores = LeverageScore(center=center).score(layer)
    assert scores.dtype == torch.float32
    ref = leverage_reference(layer.keys, layer.valid, center)
    mask = layer.valid[:, None, :].expand_as(scores)
    torch.testing.assert_close(scores[mask].double(), ref[mask], rtol=0, atol=1e-5)


def test_chunked_passes_match(kit, monkeypatch):
    """Sequences longer than one chunk (here 5 tokens) accumulate the mean and the Gram matrix exactly."""
    rows = [kit.random_row(n, 2, 2, 4) for n in (23, 12)]
    layer = kit.build(rows, seq=26)
    whole = LeverageScore().score(layer)
    monkeypatch.setattr(leverage_module, "_CHUNK", 5)
    torch.testing.assert_close(LeverageScore().score(layer), whole, rtol=0, atol=1e-6)
    ref = leverage_reference(layer.keys, layer.valid, True)
    mask = layer.valid[:, None, :].expand_as(whole)
    torch.testing.assert_close(whole[mask].double(), ref[mask], rtol=0, atol=1e-5)


def test_pre_rope_scores_the_keys_before_rotation(kit):
    scorer = LeverageScore(pre_rope=True)
    assert scorer.needs_query_stats and scorer.query_stats_skip == 0
    rows = [kit.random_row(n, 4, 2, 8) for n in (19, 11)]
    layer = kit.build_for(scorer, rows)
    scores = scorer.score(layer)
    for b, row in enumerate(rows):
        for h in range(2):
            ref = hat_diagonal(row.k_pre[h], center=True)  # the row's own pre-RoPE keys
            torch.testing.assert_close(scores[b, h, 19 - row.length :].double(), ref, rtol=0, atol=1e-5)
    # After RoPE the leverage differs (RoPE rotates each key by its own angle).
    assert (LeverageScore().score(layer) - scores).abs().max() > 1e-3
    with pytest.raises(ValueError):
        scorer.score(kit.build(rows))  # no rope passed


def _layer(keys: torch.Tensor) -> LayerView:
    seq = keys.shape[0]
    return LayerView(
        keys[None, None], keys[None, None].clone(), torch.ones(1, seq, dtype=torch.bool), torch.arange(seq)[None], 0.5
    )


def test_outlier_direction_has_leverage_one():
    """Keys in a plane plus one sticking out of it: the outlier alone spans its direction (leverage 1)."""
    torch.manual_seed(0)
    keys = torch.zeros(12, 3)
    keys[:, :2] = torch.randn(12, 2) * 5
    keys[7, 2] = 0.01  # tiny, yet the only key off the plane
    scores = LeverageScore(center=False).score(_layer(keys))[0, 0]
    assert scores.argmax().item() == 7
    assert abs(scores[7].item() - 1.0) < 1e-5
    assert abs(scores.sum().item() - 3.0) < 1e-4  # leverages sum to the rank
    # Two copies of the outlier share its direction: 1/2 each.
    keys[8] = keys[7]
    scores = LeverageScore(center=False).score(_layer(keys))[0, 0]
    assert abs(scores[7].item() - 0.5) < 1e-5 and abs(scores[8].item() - 0.5) < 1e-5


def test_invariant_to_an_invertible_linear_map():
    torch.manual_seed(1)
    keys = torch.randn(30, 6)
    mixed = keys @ (torch.randn(6, 6) + 3 * torch.eye(6))
    torch.testing.assert_close(
        LeverageScore().score(_layer(mixed)), LeverageScore().score(_layer(keys)), rtol=0, atol=1e-5
    )


def test_centering_removes_the_mean():
    """Centred leverage ignores a common offset (the mean key); uncentred leverage does not."""
    torch.manual_seed(2)
    keys = torch.randn(25, 4)
    shifted = keys + torch.tensor([10.0, -3.0, 0.0, 7.0])
    torch.testing.assert_close(
        LeverageScore().score(_layer(shifted)), LeverageScore().score(_layer(keys)), rtol=0, atol=1e-5
    )
    assert (
        LeverageScore(center=False).score(_layer(shifted)) - LeverageScore(center=False).score(_layer(keys))
    ).abs().max() > 1e-2


def test_rank_deficient_rows():
    """Fewer tokens than head_dim: every token spans its own direction (1, or 1 - 1/n once centred); a
    constant row has no spread at all (0), never NaN."""
    keys = torch.randn(5, 16)
    torch.testing.assert_close(LeverageScore(center=False).score(_layer(keys))[0, 0], torch.ones(5), rtol=0, atol=1e-5)
    torch.testing.assert_close(LeverageScore().score(_layer(keys))[0, 0], torch.full((5,), 0.8), rtol=0, atol=1e-5)
    constant = LeverageScore().score(_layer(torch.ones(6, 4) * 3))
    assert torch.isfinite(constant).all() and (constant == 0).all()
    empty = leverage_scores(torch.randn(1, 2, 4, 8), torch.zeros(1, 4, dtype=torch.bool))
    assert (empty == 0).all()


def test_float32_rounding_does_not_add_directions():
    """Two key channels that are exact combinations of others (rank 4 of 6), rounded to float32: the
    rounding leaves tiny spurious directions that whitening would turn into whole units of leverage;
    the rank tolerance drops them, matching the hat matrix of the exact float64 data."""
    torch.manual_seed(3)
    for _ in range(20):
        x = torch.randint(-20, 20, (40, 6)).double()
        x[:, 3] = x[:, 0] + x[:, 1]
        x[:, 5] = x[:, 2] - 2 * x[:, 4]
        x = x * 0.37
        scores = LeverageScore(center=False).score(_layer(x.float()))[0, 0]
        torch.testing.assert_close(scores.double(), hat_diagonal(x, center=False), rtol=0, atol=1e-5)
        assert abs(scores.sum().item() - 4.0) < 1e-4


@pytest.mark.parametrize("kwargs", [{"center": 1}, {"pre_rope": "yes"}])
def test_bad_hyperparameters(kwargs):
    with pytest.raises((ValueError, TypeError)):
        LeverageScore(**kwargs)


def test_leverage_defaults():
    scorer = LeverageScore()
    assert (scorer.center, scorer.pre_rope) == (True, False)
    assert (scorer.name, scorer.query_window, scorer.needs_query_stats, scorer.query_stats_skip) == (
        "leverage",
        0,
        False,
        0,
    )

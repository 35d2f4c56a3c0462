from __future__ import annotations

import math

import pytest
import torch

from zigzag.scorers import LayerView
from zigzag.scorers.lagkv import LagKV


def _std(xs: list[float]) -> float:
    mean = sum(xs) / len(xs)
    return math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


def _softmax(xs: list[float]) -> list[float]:
    top = max(xs)
    exps = [math.exp(x - top) for x in xs]
    return [e / sum(exps) for e in exps]


def _chunk_score(x: torch.Tensor, chunk: list[int], ref: list[int]) -> list[float]:
    """softmax over the chunk of the channel std of (x - min_ref) / (max_ref - min_ref)."""
    d = x.shape[-1]
    low = [min(float(x[j, c]) for j in ref) for c in range(d)]
    high = [max(float(x[j, c]) for j in ref) for c in range(d)]
    spread = [_std([(float(x[j, c]) - low[c]) / (high[c] - low[c]) for c in range(d)]) for j in chunk]
    return _softmax(spread)


def lagkv_reference(layer, n_sink: int, lag: int, chunk_ranks: bool):
    """float64 loops over each row's valid tokens, chunks counted from the first valid one.

    Returns (scores of the scored tokens, {(b, token): score}, and per row the kept tokens in the
    order they must rank: sinks first, then the rest latest first)."""
    keys, values = layer.keys.double(), layer.values.double()
    batch, kv_heads, seq, _ = keys.shape
    scored, kept = {}, []
    for b in range(batch):
        idx = [j for j in range(seq) if layer.valid[b, j]]
        n = len(idx)
        full = max(0, (n - n_sink) // lag)
        n_scored = max(0, full - 1)
        for h in range(kv_heads):
            for p in range(n_scored):
                chunk = idx[n_sink + p * lag : n_sink + (p + 1) * lag]
                ref = idx[n_sink + (p + 1) * lag : n_sink + (p + 2) * lag]
                k = _chunk_score(keys[b, h], chunk, ref)
                v = _chunk_score(values[b, h], chunk, ref)
                total = [a + c for a, c in zip(k, v)]
                if chunk_ranks:
                    total = [sum(t < s for t in total) / lag for s in total]  # rank inside the chunk
                for j, s in zip(chunk, total):
                    scored[(b, h, j)] = s
        tail = idx[n_sink + n_scored * lag :]
        kept.append(idx[:n_sink] + tail[::-1])
    return scored, kept


@pytest.mark.parametrize(
    "n_sink,lag,lengths,seq",
    [
        (2, 4, (23, 17, 9), None),
        (0, 5, (31, 16), 37),
        (3, 3, (20, 4), 26),
        (16, 128, (40,), None),
        (1, 2, (12, 11), None),
    ],
)
@pytest.mark.parametrize("chunk_ranks", [True, False])
@pytest.mark.parametrize("groups", [1, 3])
def test_lagkv_matches_loop_reference(kit, n_sink, lag, lengths, seq, chunk_ranks, groups):
    kv_heads, head_dim = 2, 8
    rows = [kit.random_row(n, kv_heads * groups, kv_heads, head_dim) for n in lengths]
    layer = kit.build(rows, seq=seq)
    scores = LagKV(n_sink=n_sink, lag_size=lag, chunk_ranks=chunk_ranks).score(layer).double()
    scored, kept = lagkv_reference(layer, n_sink, lag, chunk_ranks)
    for (b, h, j), s in scored.items():
        assert abs(scores[b, h, j].item() - s) < 1e-6, (b, h, j)
    for b, order in enumerate(kept):
        for h in range(kv_heads):
            others = [scores[b, h, j].item() for (bb, hh, j) in scored if (bb, hh) == (b, h)]
            ranked = [scores[b, h, j].item() for j in order]
            assert ranked == sorted(ranked, reverse=True) and len(set(ranked)) == len(ranked)
            if others and ranked:
                assert min(ranked) >= max(others) + 1 - 1e-6


def _layer(keys: torch.Tensor, values: torch.Tensor) -> LayerView:
    seq = keys.shape[0]
    valid = torch.ones(1, seq, dtype=torch.bool)
    return LayerView(keys[None, None], values[None, None], valid, torch.arange(seq)[None], 0.5)


def test_token_that_varies_across_channels_wins_its_chunk():
    """Reference chunk spans [0, 1] in every channel: a flat token (all channels equal) normalizes to a
    flat vector (std 0), a token alternating 0, 1 keeps its spread and ranks first."""
    lag, d = 4, 6
    chunk = torch.full((lag, d), 0.5)
    chunk[2] = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    reference = torch.rand(lag, d)
    reference[0], reference[1] = 0.0, 1.0
    tail = torch.rand(lag - 1, d)  # a partial chunk: the reference chunk is the last full one
    keys = torch.cat([chunk, reference, tail])
    scores = LagKV(n_sink=0, lag_size=lag).score(_layer(keys, keys.clone()))[0, 0]
    assert scores[:lag].argmax().item() == 2
    assert scores[2].item() == (lag - 1) / lag  # top rank inside the chunk
    assert (scores[lag:] > scores[:lag].max()).all()  # the reference and the partial chunk are kept


def test_reference_is_the_next_chunk_not_the_chunk_itself():
    """Normalized by its own min/max, chunk 0 would put its token 0 first; against the next chunk,
    whose channel 0 spans 100x more, token 1 (spread in the other channels) wins."""
    chunk = torch.tensor([[0.0, 0.0, 0.0], [0.5, 1.0, 0.0], [1.0, 0.5, 0.5]])
    reference = torch.tensor([[-50.0, 0.0, 0.0], [50.0, 1.0, 1.0], [0.0, 0.5, 0.5]])
    keys = torch.cat([chunk, reference, torch.zeros(3, 3)])
    scores = LagKV(n_sink=0, lag_size=3, chunk_ranks=False).score(_layer(keys, keys.clone()))[0, 0]
    spread = [
        _std(
            [
                (float(chunk[j, c]) - float(reference[:, c].min()))
                / float(reference[:, c].max() - reference[:, c].min())
                for c in range(3)
            ]
        )
        for j in range(3)
    ]
    expected = [2 * p for p in _softmax(spread)]
    torch.testing.assert_close(scores[:3].double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-6)
    assert scores[:3].argmax().item() == 1


def test_chunks_count_from_the_first_valid_token(kit):
    """Left padding of 3 (not a multiple of lag_size) must not shift the chunk boundaries."""
    scorer = LagKV(n_sink=1, lag_size=4)
    row = kit.random_row(18, 2, 2, 8)
    alone = scorer.score(kit.build([row]))
    padded = scorer.score(kit.build([row, kit.random_row(21, 2, 2, 8)]))
    torch.testing.assert_close(padded[0, :, 3:], alone[0], rtol=0, atol=1e-6)


def test_short_row_is_all_kept_sinks_then_recency(kit):
    scorer = LagKV(n_sink=3, lag_size=4)  # 10 tokens < 3 + 2 * 4: no chunk has a reference
    layer = kit.build([kit.random_row(10, 2, 2, 8)], seq=13)
    scores = scorer.score(layer)[0, :, 3:]
    expected_order = [0, 1, 2, 9, 8, 7, 6, 5, 4, 3]
    for h in range(2):
        assert scores[h].argsort(descending=True).tolist() == expected_order


def test_constant_reference_channel_is_finite():
    keys = torch.ones(9, 4)
    scores = LagKV(n_sink=1, lag_size=4).score(_layer(keys, keys.clone()))
    assert torch.isfinite(scores).all()


@pytest.mark.parametrize(
    "kwargs", [{"n_sink": -1}, {"lag_size": 1}, {"lag_size": 0}, {"n_sink": 2.0}, {"chunk_ranks": 1}]
)
def test_bad_hyperparameters(kwargs):
    with pytest.raises((ValueError, TypeError)):
        LagKV(**kwargs)


def test_lagkv_defaults():
    scorer = LagKV()
    assert (scorer.n_sink, scorer.lag_size, scorer.chunk_ranks) == (16, 128, True)
    assert (scorer.name, scorer.query_window, scorer.needs_query_stats, scorer.query_stats_skip) == (
        "lagkv",
        0,
        False,
        0,
    )

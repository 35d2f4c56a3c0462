from __future__ import annotations

import pytest
import torch

from zigzag.scorers import LayerView
from zigzag.scorers.cur import CUR


def _hat_diagonal(x: torch.Tensor) -> list[float]:
    """float64, uncentred: the diagonal of X pinv(X)."""
    x = x.double()
    return torch.diagonal(x @ torch.linalg.pinv(x)).tolist()


def cur_reference(layer, n_sink: int, window: int, combine: str, leverage: str) -> torch.Tensor:
    """float64 loops over each row's valid tokens: leverage (or squared norm) of keys and values,
    divided by its sum over windows of ``window`` valid tokens, combined, divided by its row sum.
    No sink protection."""
    batch, kv_heads, seq, _ = layer.keys.shape
    out = torch.zeros(batch, kv_heads, seq, dtype=torch.float64)
    for b in range(batch):
        idx = [j for j in range(seq) if layer.valid[b, j]]
        for h in range(kv_heads):
            per = {}
            for name, x in (("key", layer.keys[b, h, idx]), ("value", layer.values[b, h, idx])):
                if leverage == "exact":
                    lev = _hat_diagonal(x)
                else:
                    lev = [sum(float(c) ** 2 for c in row) for row in x.double()]
                if window:
                    sums = [sum(lev[w - w % window : w - w % window + window]) for w in range(len(lev))]
                    lev = [v / s for v, s in zip(lev, sums)]
                per[name] = lev
            if combine == "product":
                total = [k * v for k, v in zip(per["key"], per["value"])]
            elif combine == "mean":
                total = [(k + v) / 2 for k, v in zip(per["key"], per["value"])]
            else:
                total = per[combine]
            row_sum = sum(total)
            for j, s in zip(idx, total):
                out[b, h, j] = s / row_sum
    return out


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"n_sink": 0, "local_window": 0},
        {"n_sink": 2, "local_window": 5, "combine": "mean"},
        {"n_sink": 1, "local_window": 4, "combine": "key"},
        {"n_sink": 3, "local_window": 3, "combine": "value"},
        {"n_sink": 4, "local_window": 16, "leverage": "norm"},
    ],
)
@pytest.mark.parametrize("lengths,seq", [((30, 19), None), ((12, 5, 1), 14)])
@pytest.mark.parametrize("groups", [1, 3])
def test_cur_matches_loop_reference(kit, kwargs, lengths, seq, groups):
    kv_heads, head_dim = 2, 4
    rows = [kit.random_row(n, kv_heads * groups, kv_heads, head_dim) for n in lengths]
    layer = kit.build(rows, seq=seq)
    scorer = CUR(**kwargs)
    scores = scorer.score(layer).double()
    ref = cur_reference(layer, scorer.n_sink, scorer.local_window, scorer.combine, scorer.leverage)
    for b in range(len(rows)):
        valid = layer.valid[b]
        sinks = valid & (layer.positions[b] < scorer.n_sink)
        others = valid & ~sinks
        torch.testing.assert_close(scores[b][:, others], ref[b][:, others], rtol=1e-5, atol=1e-6)
        if others.any() and sinks.any():
            assert (scores[b][:, sinks].amin(-1) >= scores[b][:, others].amax(-1) + 1 - 1e-6).all()
            shift = scores[b][:, sinks] - ref[b][:, sinks]  # one shift per head: the sinks keep their order
            torch.testing.assert_close(shift, shift[:, :1].expand_as(shift), rtol=0, atol=1e-6)


def _layer(keys: torch.Tensor, values: torch.Tensor) -> LayerView:
    seq = keys.shape[0]
    return LayerView(
        keys[None, None], values[None, None], torch.ones(1, seq, dtype=torch.bool), torch.arange(seq)[None], 0.5
    )


def test_key_and_value_outlier_wins_over_key_only_outlier():
    """Token 5 is off the common subspace in its key *and* its value; token 9 only in its key. The product
    keeps the token that matters for the attention output (its value is not spanned by the others)."""
    torch.manual_seed(0)
    seq, d = 16, 4
    keys, values = torch.zeros(seq, d), torch.zeros(seq, d)
    keys[:, :2], values[:, :2] = torch.randn(seq, 2), torch.randn(seq, 2)
    keys[5, 2], values[5, 2] = 0.5, 0.5
    keys[9, 3] = 0.5
    scores = CUR(n_sink=0, local_window=0).score(_layer(keys, values))[0, 0]
    assert scores.argmax().item() == 5
    assert scores[5] > scores[9]
    key_only = CUR(n_sink=0, local_window=0, combine="key").score(_layer(keys, values))[0, 0]
    assert abs(key_only[5].item() - key_only[9].item()) < 1e-5  # keys alone cannot tell them apart
    torch.testing.assert_close(scores.sum(), torch.tensor(1.0))  # a distribution over the tokens


def test_zero_value_scores_zero_under_the_product():
    torch.manual_seed(1)
    keys, values = torch.randn(10, 4), torch.randn(10, 4)
    values[3] = 0.0
    scores = CUR(n_sink=0).score(_layer(keys, values))[0, 0]
    assert scores[3] == 0.0 and (scores[torch.arange(10) != 3] > 0).all()


def test_local_windows_make_tokens_compete_with_neighbours():
    """Norm leverage with windows of 2: every window sums to 1 per key and value, whatever its scale."""
    keys = torch.tensor([[1.0], [3.0], [100.0], [100.0], [2.0], [0.0]])
    scores = CUR(n_sink=0, local_window=2, combine="key", leverage="norm").score(_layer(keys, keys.clone()))[0, 0]
    expected = torch.tensor([1 / 10, 9 / 10, 1 / 2, 1 / 2, 1.0, 0.0]) / 3  # 3 windows, each summing to 1
    torch.testing.assert_close(scores, expected)


def test_windows_count_from_the_first_valid_token(kit):
    scorer = CUR(n_sink=1, local_window=4)
    row = kit.random_row(11, 2, 2, 4)
    alone = scorer.score(kit.build([row]))
    padded = scorer.score(kit.build([row, kit.random_row(14, 2, 2, 4)]))  # 3 tokens of padding
    torch.testing.assert_close(padded[0, :, 3:], alone[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_sink": -1},
        {"local_window": 1},
        {"local_window": -4},
        {"local_window": 2.0},
        {"combine": "sum"},
        {"leverage": "sketch"},
    ],
)
def test_bad_hyperparameters(kwargs):
    with pytest.raises(ValueError):
        CUR(**kwargs)


def test_cur_defaults():
    scorer = CUR()
    assert (scorer.n_sink, scorer.local_window, scorer.combine, scorer.leverage) == (4, 16, "product", "exact")
    assert (scorer.name, scorer.query_window, scorer.needs_query_stats, scorer.query_stats_skip) == ("cur", 0, False, 0)

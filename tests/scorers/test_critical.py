"""CriticalKV against a float64 reference of its two stages, and the wrapper contract."""

from __future__ import annotations

import math

import pytest
import torch

from zigzag.scorers import TOVA, CriticalKV, Knorm, SnapKV, get_scorer


def _reference(inner_scores, values, valid, weight, mean_budget, first_stage=0.5, epsilon=1e-4):
    """Per (row, KV head), in float64 loops: the valid tokens' final order, and the stage-two scores.

    ``weight``: ``(hidden, heads * head_dim)``, query head ``h`` owning columns ``h*d:(h+1)*d``."""
    batch, kv_heads, seq, d = values.shape
    heads = weight.shape[1] // d
    group = heads // kv_heads
    w = weight.double()
    orders, stage_two = {}, torch.zeros(batch, kv_heads, seq, dtype=torch.float64)
    for b in range(batch):
        tokens = [i for i in range(seq) if valid[b, i]]
        first = math.floor(first_stage * int(mean_budget[b]))
        for k in range(kv_heads):
            for i in tokens:
                v = values[b, k, i].double()
                norms = [float((w[:, h * d : (h + 1) * d] @ v).abs().sum()) for h in range(k * group, (k + 1) * group)]
                stage_two[b, k, i] = (float(inner_scores[b, k, i]) + epsilon) * sum(norms) / group
            by_inner = sorted(tokens, key=lambda i: -float(inner_scores[b, k, i]))
            chosen = set(by_inner[:first])
            rest = [i for i in tokens if i not in chosen]
            orders[b, k] = sorted(chosen, key=lambda i: -stage_two[b, k, i]) + sorted(rest, key=lambda i: -stage_two[b, k, i])
    return orders, stage_two


@pytest.mark.parametrize("inner", [SnapKV(window=4, kernel_size=3), TOVA()], ids=["snapkv", "tova"])
@pytest.mark.parametrize("groups", [1, 3])
def test_scores_follow_the_two_stage_reference(kit, inner, groups):
    kv_heads, head_dim = 2, 8
    rows = [kit.random_row(n, kv_heads * groups, kv_heads, head_dim) for n in (30, 19, 6)]
    scorer = CriticalKV(inner)
    view = kit.build_for(scorer, rows)
    ours = scorer.score(view)
    weight = kit.output_weight(kv_heads * groups, kv_heads, head_dim)
    orders, stage_two = _reference(inner.score(view), view.values, view.valid, weight, view.mean_budget)
    for (b, k), order in orders.items():
        got = ours[b, k].double()
        mine = sorted(order, key=lambda i: -float(got[i]))
        assert mine == order, (b, k)
        first = math.floor(0.5 * int(view.mean_budget[b]))
        for i in order[first:]:  # stage two, unlifted: exactly (s + eps) * n
            torch.testing.assert_close(got[i], stage_two[b, k, i], rtol=1e-5, atol=1e-9)


def test_without_a_budget_it_is_stage_two_only(kit):
    rows = [kit.random_row(12, 4, 2, 8)]
    view = kit.build_for(TOVA(), rows)
    view.mean_budget = None
    weight = kit.output_weight(4, 2, 8)
    _, stage_two = _reference(TOVA().score(view), view.values, view.valid, weight, [0])
    torch.testing.assert_close(CriticalKV(TOVA()).score(view).double(), stage_two, rtol=1e-5, atol=1e-9)


def test_a_large_value_beats_a_slightly_higher_attention(kit):
    """The paper's point: attention alone would keep token 3; its value writes almost nothing."""
    row = kit.random_row(8, 2, 1, 4)
    view = kit.build_for(TOVA(), [row])
    view.mean_budget = None
    view.values[0, 0, 3] = 1e-3
    view.values[0, 0, 5] = 10.0

    class Fixed:
        name, query_window, needs_query_stats, query_stats_skip = "fixed", 0, False, 0

        def score(self, layer):
            s = torch.full((1, 1, 8), 0.01)
            s[0, 0, 3], s[0, 0, 5] = 0.3, 0.2
            return s

    scores = CriticalKV(Fixed()).score(view)
    assert scores[0, 0, 5] > scores[0, 0, 3]


def test_left_padding_and_other_rows_do_not_matter(kit):
    scorer = CriticalKV(SnapKV(window=4, kernel_size=3))
    rows = [kit.random_row(n, 6, 2, 8) for n in (20, 11)]
    batch = scorer.score(kit.build_for(scorer, rows, seq=24))
    for b, row in enumerate(rows):
        alone = scorer.score(kit.build_for(scorer, [row]))
        torch.testing.assert_close(batch[b, :, 24 - row.length :], alone[0], rtol=1e-5, atol=1e-6)


def test_name_suffix_needs_and_errors(kit):
    scorer = get_scorer("snapkv+critical")
    assert isinstance(scorer, CriticalKV) and scorer.name == "snapkv+critical"
    assert scorer.query_window == SnapKV().query_window
    with pytest.raises(ValueError, match="negative"):
        CriticalKV(Knorm()).score(kit.build_for(Knorm(), [kit.random_row(5, 2, 2, 4)]))
    view = kit.build_for(TOVA(), [kit.random_row(5, 2, 2, 4)])
    view.output_weight = None
    with pytest.raises(ValueError, match="output_weight"):
        CriticalKV(TOVA()).score(view)
    for bad in ({"first_stage": 1.5}, {"first_stage": -0.1}, {"epsilon": -1.0}, {"epsilon": float("nan")}):
        with pytest.raises(ValueError):
            CriticalKV(TOVA(), **bad)

from __future__ import annotations

import pytest
import torch

from zigzag.scorers import LayerView
from zigzag.scorers.qfilters import QFilters


def qfilters_reference(layer, filters, scales, kv_heads):
    """float64 loops: scaling * (1/G) * sum over the group's query heads of kappa_h * <k, u_h / |u_h|>."""
    keys = layer.keys.double()
    batch, kvh, seq, head_dim = keys.shape
    heads = filters.shape[1]
    groups = heads // kv_heads
    out = torch.zeros(batch, kvh, seq, dtype=torch.float64)
    for b in range(batch):
        for g in range(kvh):
            for j in range(seq):
                total = 0.0
                for h in range(g * groups, (g + 1) * groups):
                    u = filters[layer.layer_idx, h].double()
                    u = u / u.norm()
                    kappa = 1.0 if scales is None else float(scales[layer.layer_idx, h])
                    total += kappa * sum(float(keys[b, g, j, d]) * float(u[d]) for d in range(head_dim))
                out[b, g, j] = layer.scaling * total / groups
    return out


def random_filters(layers, heads, head_dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    filters = torch.randn(layers, heads, head_dim, generator=gen) * 3  # not unit: the scorer normalizes
    scales = torch.rand(layers, heads, generator=gen) * 2
    return filters, scales


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("lengths", [(15, 11), (9, 1), (6, 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [True, False])
def test_matches_loop_reference(kit, groups, lengths, dtype, weighted):
    kv_heads, head_dim, layer_idx = 2, 8, 2
    heads = kv_heads * groups
    filters, scales = random_filters(layer_idx + 1, heads, head_dim)
    scales = scales if weighted else None
    scorer = QFilters(filters=filters, kv_heads=kv_heads, scales=scales)
    rows = [kit.random_row(n, heads, kv_heads, head_dim) for n in lengths]
    layer = kit.build_for(scorer, rows, dtype=dtype, layer_idx=layer_idx)
    scores = scorer.score(layer)
    assert scores.dtype == torch.float32 and scores.shape == (len(rows), kv_heads, layer.seq)
    ref = qfilters_reference(layer, filters, scales, kv_heads)
    valid = layer.valid[:, None, :].expand_as(scores)
    torch.testing.assert_close(scores.double()[valid], ref[valid], rtol=1e-5, atol=1e-6)


def test_other_layers_use_their_own_filters(kit):
    filters, scales = random_filters(3, 4, 8, seed=1)
    scorer = QFilters(filters=filters, kv_heads=2, scales=scales)
    rows = [kit.random_row(12, 4, 2, 8)]
    for layer_idx in range(3):
        layer = kit.build(rows, layer_idx=layer_idx)
        layer.num_layers = 3
        ref = qfilters_reference(layer, filters, scales, 2)
        torch.testing.assert_close(scorer.score(layer).double(), ref, rtol=1e-5, atol=1e-6)


def test_hand_built_keys_rank_by_their_projection():
    """u = e0 for both query heads of the one KV head: a key along u comes first, one against it last;
    the per-head scales weigh the group's heads."""
    filters = torch.zeros(1, 2, 4)
    filters[0, 0, 0] = 2.0  # normalized to e0
    filters[0, 1, 1] = 1.0  # e1
    keys = torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 5.0, 0]])[None, None]
    layer = LayerView(keys, keys.clone(), torch.ones(1, 4, dtype=torch.bool), torch.arange(4)[None], scaling=0.5)
    scores = QFilters(filters=filters, kv_heads=1, scales=torch.tensor([[3.0, 1.0]])).score(layer)
    # (kappa_0 <k, e0> + kappa_1 <k, e1>) / 2 * scaling
    torch.testing.assert_close(scores[0, 0], torch.tensor([0.75, -0.75, 0.25, 0.0]))
    only_first = QFilters(filters=filters, kv_heads=1, scales=torch.tensor([[1.0, 0.0]])).score(layer)
    torch.testing.assert_close(only_first[0, 0], torch.tensor([0.25, -0.25, 0.0, 0.0]))


def test_sinks_are_lifted_above_the_rest(kit):
    filters, scales = random_filters(1, 6, 8, seed=2)
    plain = QFilters(filters=filters, kv_heads=2, scales=scales)
    sinks = QFilters(filters=filters, kv_heads=2, scales=scales, n_sink=3)
    rows = [kit.random_row(n, 6, 2, 8) for n in (14, 9, 2)]
    layer = kit.build(rows, seq=16)
    base, lifted = plain.score(layer), sinks.score(layer)
    for b, row in enumerate(rows):
        real = torch.zeros(16, dtype=torch.bool)
        real[16 - row.length :] = True
        sink = real & (layer.positions[b] < 3)
        others = real & ~sink
        torch.testing.assert_close(lifted[b][:, others], base[b][:, others])
        if others.any():
            assert (lifted[b][:, sink].amin(-1) >= lifted[b][:, others].amax(-1) + 1 - 1e-5).all()
        shift = lifted[b][:, sink] - base[b][:, sink]  # one constant per head: their order is kept
        torch.testing.assert_close(shift, shift[:, :1].expand_as(shift))


def test_folded_rows_of_chunked_prefill_read_their_kv_head(kit):
    """Chunked prefill folds (batch, kv_heads) into rows with one KV head each: row r is KV head
    r % kv_heads, so the folded scores equal the unfolded ones."""
    filters, scales = random_filters(2, 6, 8, seed=3)
    scorer = QFilters(filters=filters, kv_heads=3, scales=scales, n_sink=1)
    rows = [kit.random_row(n, 6, 3, 8) for n in (10, 7)]
    layer = kit.build(rows, layer_idx=1)
    layer.num_layers = 2
    batch, kv_heads, seq, d = layer.keys.shape
    folded = LayerView(
        layer.keys.reshape(batch * kv_heads, 1, seq, d), layer.values.reshape(batch * kv_heads, 1, seq, d),
        layer.valid.repeat_interleave(kv_heads, 0), layer.positions.repeat_interleave(kv_heads, 0),
        layer.scaling, layer_idx=1, num_layers=2,
    )  # fmt: skip
    torch.testing.assert_close(scorer.score(folded).reshape(batch, kv_heads, seq), scorer.score(layer))


def test_the_layer_must_match_the_filters(kit):
    filters, _ = random_filters(2, 4, 8)
    scorer = QFilters(filters=filters, kv_heads=2)
    rows = [kit.random_row(6, 4, 2, 8)]
    with pytest.raises(ValueError, match="2 layers; got layer 0 of 1"):
        scorer.score(kit.build(rows))  # num_layers 1
    wrong_index = kit.build(rows, layer_idx=2)  # layer 2 of 3
    with pytest.raises(ValueError, match="2 layers; got layer 2 of 3"):
        scorer.score(wrong_index)
    good = kit.build(rows, layer_idx=1)
    assert scorer.score(good).shape == (1, 2, 6)
    with pytest.raises(ValueError, match="head_dim 8"):
        scorer.score(kit.build([kit.random_row(6, 4, 2, 16)], layer_idx=1))
    with pytest.raises(ValueError, match="2 KV heads; the layer has 4"):
        scorer.score(kit.build([kit.random_row(6, 4, 4, 8)], layer_idx=1))
    with pytest.raises(ValueError, match="2 KV heads; the layer has 1"):  # one KV head, batch 1: not folded
        scorer.score(kit.build([kit.random_row(6, 4, 1, 8)], layer_idx=1))
    with pytest.raises(ValueError, match="4 query heads"):
        scorer.score(kit.build([kit.random_row(6, 6, 2, 8)], layer_idx=1, window=2))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({}, "calibrated filters"),
        ({"filters": torch.randn(4, 8), "kv_heads": 1}, "layers, heads, head_dim"),
        ({"filters": torch.ones(1, 2, 4, dtype=torch.long), "kv_heads": 1}, "float tensor"),
        ({"filters": torch.full((1, 2, 4), float("nan")), "kv_heads": 1}, "finite"),
        ({"filters": torch.zeros(1, 2, 4), "kv_heads": 1}, "non-zero"),
        ({"filters": torch.randn(1, 4, 8)}, "kv_heads must be a positive int"),
        ({"filters": torch.randn(1, 4, 8), "kv_heads": 0}, "kv_heads must be a positive int"),
        ({"filters": torch.randn(1, 4, 8), "kv_heads": True}, "kv_heads must be a positive int"),
        ({"filters": torch.randn(1, 4, 8), "kv_heads": 3}, "multiple of kv_heads"),
        ({"filters": torch.randn(1, 4, 8), "kv_heads": 2, "scales": torch.ones(4)}, "scales must be a tensor"),
        ({"filters": torch.randn(1, 4, 8), "kv_heads": 2, "scales": -torch.ones(1, 4)}, ">= 0"),
        ({"filters": torch.randn(1, 4, 8), "kv_heads": 2, "scales": torch.full((1, 4), float("inf"))}, "finite"),
        ({"filters": torch.randn(1, 4, 8), "kv_heads": 2, "n_sink": -1}, "n_sink"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QFilters(**kwargs)


def test_declares_no_queries():
    scorer = QFilters(filters=torch.randn(1, 2, 4), kv_heads=1)
    assert (scorer.name, scorer.query_window, scorer.needs_query_stats, scorer.query_stats_skip) == (
        "qfilters",
        0,
        False,
        0,
    )
    assert QFilters.calibrated
    torch.testing.assert_close(scorer.filters.norm(dim=-1), torch.ones(1, 2))

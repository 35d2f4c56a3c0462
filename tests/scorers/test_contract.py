"""Every scorer against the contract of zigzag.scorers.base, from one table (easy to hard)."""

from __future__ import annotations

import pytest
import torch

from zigzag.scorers import (
    CUR,
    H2O,
    SCORERS,
    TOVA,
    ExpectedAttention,
    KeyDiff,
    Knorm,
    KVzip,
    KVzipPlus,
    LagKV,
    LeverageScore,
    ObservedAttention,
    QFilters,
    RandomScorer,
    Scorer,
    SnapKV,
    StreamingLLM,
)

SCORER_TABLE = [
    {"cls": Knorm, "kwargs": {}},
    {"cls": RandomScorer, "kwargs": {"seed": 3}},
    {"cls": StreamingLLM, "kwargs": {"n_sink": 2}},
    {"cls": TOVA, "kwargs": {}},
    {"cls": SnapKV, "kwargs": {"window": 8, "kernel_size": 3}},
    {"cls": SnapKV, "kwargs": {}},  # window 64 > every seq below
    {"cls": ExpectedAttention, "kwargs": {"n_future": 16, "n_sink": 2}},
    {"cls": ExpectedAttention, "kwargs": {"n_future": 5, "n_sink": 0, "use_vnorm": False}},
    {"cls": KVzip, "kwargs": {}},
    {"cls": KVzipPlus, "kwargs": {}},
    {"cls": ObservedAttention, "kwargs": {}},
    {"cls": ObservedAttention, "kwargs": {"window": 5, "block_size": 3}},
    {"cls": H2O, "kwargs": {}},
    {"cls": H2O, "kwargs": {"recent_ratio": 0.25, "block_size": 7}},
    {"cls": KeyDiff, "kwargs": {}},
    {"cls": LagKV, "kwargs": {}},  # n_sink 16, lag 128: every row below is kept whole
    {"cls": LagKV, "kwargs": {"n_sink": 2, "lag_size": 4}},
    {"cls": LagKV, "kwargs": {"n_sink": 0, "lag_size": 3, "chunk_ranks": False}},
    {"cls": LeverageScore, "kwargs": {}},
    {"cls": LeverageScore, "kwargs": {"center": False, "pre_rope": True}},
    {"cls": CUR, "kwargs": {}},
    {"cls": CUR, "kwargs": {"n_sink": 0, "local_window": 0, "combine": "mean", "leverage": "norm"}},
]
IDS = [f"{row['cls'].__name__}({','.join(f'{k}={v}' for k, v in row['kwargs'].items())})" for row in SCORER_TABLE]

BAD_KWARGS = [
    (StreamingLLM, {"n_sink": -1}),
    (SnapKV, {"window": 0}),
    (SnapKV, {"kernel_size": 4}),
    (SnapKV, {"kernel_size": 0}),
    (ExpectedAttention, {"n_future": 0}),
    (ExpectedAttention, {"n_sink": -2}),
    (ExpectedAttention, {"epsilon": -1.0}),
    (RandomScorer, {"seed": 1.5}),
    (ObservedAttention, {"window": 0}),
    (ObservedAttention, {"block_size": 0}),
    (H2O, {"recent_ratio": -0.1}),
    (H2O, {"recent_ratio": 1.5}),
    (H2O, {"window": 0}),
    (LagKV, {"n_sink": -1}),
    (LagKV, {"lag_size": 1}),
    (LagKV, {"lag_size": 0}),
    (CUR, {"n_sink": -1}),
    (CUR, {"local_window": 1}),
    (CUR, {"local_window": -4}),
    (CUR, {"combine": "sum"}),
    (CUR, {"leverage": "sketch"}),
]


@pytest.fixture(params=SCORER_TABLE, ids=IDS)
def scorer(request):
    return request.param["cls"](**request.param["kwargs"])


def test_every_registered_scorer_is_in_the_table():
    calibrated = {cls for cls in SCORERS.values() if getattr(cls, "calibrated", False)}  # below, per shape
    assert set(SCORERS.values()) - calibrated <= {row["cls"] for row in SCORER_TABLE}


@pytest.mark.parametrize("n_sink", [0, 2])
@pytest.mark.parametrize("groups", [1, 3])
def test_calibrated_qfilters_keep_the_contract(kit, groups, n_sink):
    """QFilters are built for one model's shapes: one per shape here, then the table's checks."""
    kv_heads, head_dim = 2, 8
    heads = kv_heads * groups
    scorer = QFilters(filters=torch.randn(1, heads, head_dim), kv_heads=kv_heads, scales=torch.rand(1, heads), n_sink=n_sink)
    assert SCORERS[scorer.name] is QFilters and scorer.query_window == 0
    rows = [kit.random_row(n, heads, kv_heads, head_dim) for n in (30, 26, 5, 1)]
    batch_scores = scorer.score(kit.build_for(scorer, rows, seq=32))
    assert batch_scores.shape == (4, kv_heads, 32) and batch_scores.dtype == torch.float32
    for b, row in enumerate(rows):
        alone = scorer.score(kit.build_for(scorer, [row]))
        assert torch.isfinite(alone).all()
        torch.testing.assert_close(batch_scores[b, :, 32 - row.length :], alone[0], rtol=1e-5, atol=1e-5)


def test_attributes(scorer):
    assert isinstance(scorer, Scorer)
    assert SCORERS[scorer.name] is type(scorer)
    assert isinstance(scorer.query_window, int) and scorer.query_window >= 0
    assert isinstance(scorer.needs_query_stats, bool)
    assert isinstance(scorer.query_stats_skip, int) and scorer.query_stats_skip >= 0


@pytest.mark.parametrize("cls,kwargs", BAD_KWARGS)
def test_bad_hyperparameters_raise_value_error(cls, kwargs):
    with pytest.raises(ValueError):
        cls(**kwargs)


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shape_dtype_finite(scorer, kit, groups, dtype):
    kv_heads, head_dim = 2, 16
    rows = [kit.random_row(n, kv_heads * groups, kv_heads, head_dim) for n in (20, 13)]
    layer = kit.build_for(scorer, rows, dtype=dtype)
    scores = scorer.score(layer)
    assert scores.shape == (2, kv_heads, 20)
    assert scores.dtype == torch.float32
    assert torch.isfinite(scores[layer.valid[:, None, :].expand_as(scores)]).all()
    torch.testing.assert_close(scorer.score(layer), scores, rtol=0, atol=0)  # deterministic


@pytest.mark.parametrize("seq", [1, 3])
def test_seq_shorter_than_window(scorer, kit, seq):
    layer = kit.build_for(scorer, [kit.random_row(seq, 6, 2, 8)])
    scores = scorer.score(layer)
    assert scores.shape == (1, 2, seq)
    assert torch.isfinite(scores).all()


def test_left_padded_rows_score_like_unpadded(scorer, kit):
    """Each row of a left-padded GQA batch scores its real tokens like the same row alone."""
    heads, kv_heads, head_dim = 6, 2, 16
    rows = [kit.random_row(n, heads, kv_heads, head_dim) for n in (30, 26, 5, 1)]
    batch_scores = scorer.score(kit.build_for(scorer, rows, seq=32))
    assert batch_scores.shape == (4, kv_heads, 32)
    for b, row in enumerate(rows):
        alone = scorer.score(kit.build_for(scorer, [row]))
        torch.testing.assert_close(batch_scores[b, :, 32 - row.length :], alone[0], rtol=1e-5, atol=1e-5)


def test_rows_do_not_depend_on_other_rows(scorer, kit):
    heads, kv_heads, head_dim = 6, 2, 16
    rows = [kit.random_row(n, heads, kv_heads, head_dim) for n in (24, 17)]
    first = scorer.score(kit.build_for(scorer, rows))
    rows[1] = kit.random_row(24, heads, kv_heads, head_dim)
    second = scorer.score(kit.build_for(scorer, rows))
    torch.testing.assert_close(first[0], second[0], rtol=1e-5, atol=1e-5)

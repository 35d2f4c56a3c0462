"""get_scorer and the SCORERS registry of zigzag.scorers.__init__."""

from __future__ import annotations

import pytest

from zigzag.scorers import SCORER_CLASSES, SCORERS, ExpectedAttention, Scorer, SnapKV, StreamingLLM, get_scorer


def test_names_build_defaults():
    assert set(SCORERS.values()) == set(SCORER_CLASSES)
    for name, cls in SCORERS.items():
        if getattr(cls, "calibrated", False):  # built from a file: the name alone says how
            with pytest.raises(ValueError, match="from_file"):
                get_scorer(name)
            continue
        scorer = get_scorer(name)
        assert type(scorer) is cls and scorer.name == name
    assert type(get_scorer("Expected-Attention")) is ExpectedAttention
    assert type(get_scorer("STREAMING-LLM")) is StreamingLLM


def test_objects_pass_through():
    scorer = SnapKV(window=8)
    assert get_scorer(scorer) is scorer

    class Custom:  # the documented members, no base class
        name = "custom"
        query_window = 0
        needs_query_stats = False
        query_stats_skip = 0

        def score(self, layer):
            return layer.keys[..., 0]

    custom = Custom()
    assert get_scorer(custom) is custom


@pytest.mark.parametrize("missing", ["name", "query_window", "needs_query_stats", "query_stats_skip"])
def test_a_missing_member_is_named(missing):
    members = {"name": "custom", "query_window": 0, "needs_query_stats": False, "query_stats_skip": 0}
    del members[missing]
    custom = type("Custom", (), {**members, "score": lambda self, layer: layer.keys[..., 0]})()
    with pytest.raises(TypeError, match=f"has no attribute '{missing}'"):
        get_scorer(custom)


def test_a_wrongly_typed_member_is_named():
    bad = type("Bad", (Scorer,), {"name": "bad", "query_window": -1, "score": lambda self, layer: layer.keys[..., 0]})()
    with pytest.raises(TypeError, match="query_window must be >= 0"):
        get_scorer(bad)
    with pytest.raises(TypeError, match="needs_query_stats must be a bool"):
        get_scorer(type("Bad", (Scorer,), {"name": "bad", "needs_query_stats": 1, "score": lambda s, x: x.keys[..., 0]})())


def test_the_base_class_gives_defaults():
    class Mine(Scorer):
        name = "mine"

        def score(self, layer):
            return -layer.keys.norm(dim=-1)

    mine = get_scorer(Mine())
    assert (mine.query_window, mine.needs_query_stats, mine.query_stats_skip, mine.reconstruction) == (0, False, 0, None)


def test_errors():
    with pytest.raises(ValueError, match="knorm"):
        get_scorer("scissorhands")
    with pytest.raises(TypeError):
        get_scorer(3)
    with pytest.raises(TypeError):
        get_scorer(SnapKV)  # a class, not an instance

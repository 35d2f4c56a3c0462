"""get_scorer and the SCORERS registry of zigzag.scorers.__init__."""

from __future__ import annotations

import pytest

from zigzag.scorers import SCORERS, ExpectedAttention, SnapKV, StreamingLLM, get_scorer


def test_names_build_defaults():
    for name, cls in SCORERS.items():
        scorer = get_scorer(name)
        assert type(scorer) is cls and scorer.name == name
    assert type(get_scorer("Expected-Attention")) is ExpectedAttention
    assert type(get_scorer("STREAMING-LLM")) is StreamingLLM


def test_objects_pass_through():
    scorer = SnapKV(window=8)
    assert get_scorer(scorer) is scorer

    class Custom:
        def score(self, layer):
            return layer.keys[..., 0]

    custom = Custom()
    assert get_scorer(custom) is custom


def test_errors():
    with pytest.raises(ValueError, match="knorm"):
        get_scorer("h2o")
    with pytest.raises(TypeError):
        get_scorer(3)
    with pytest.raises(TypeError):
        get_scorer(SnapKV)  # a class, not an instance

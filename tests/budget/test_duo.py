"""DuoAttention budgets: exact totals and caps on random inputs, the streaming / retrieval rule against a
plain-integer reference, hand-built cases, and the profile file."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zigzag.budget.duo import DUO_OPTIONS, DuoAttention, duo_head_budgets, read_duo_profile


def reference(weights: list[list[float]], avg: int, seq: int, n_sink: int, recent: int) -> tuple[int, int, list[int]]:
    """``(streaming heads, their budget, the retrieval budgets sorted)``, by search over the count in
    Python integers: the most streaming heads at ``min(n_sink + recent, avg)`` for which the rest,
    shared as evenly as integers allow, leaves no retrieval head above ``seq``."""
    n = sum(len(row) for row in weights)
    s = min(n_sink + recent, avg)
    total = n * avg
    k = next(k for k in range(n, -1, -1) if (k == n and total == n * s) or (k < n and total - k * s <= (n - k) * seq))
    if k == n:
        return k, s, []
    rest, heads = total - k * s, n - k
    return k, s, sorted([rest // heads + 1] * (rest % heads) + [rest // heads] * (heads - rest % heads))


@st.composite
def problems(draw):
    layers, heads = draw(st.integers(1, 6)), draw(st.integers(1, 4))
    weights = [
        [draw(st.sampled_from([0.0, 0.5, 1.0, 2.0]) | st.floats(0.0, 5.0)) for _ in range(heads)] for _ in range(layers)
    ]
    batch = draw(st.integers(1, 3))
    seq = [draw(st.integers(0, 300)) for _ in range(batch)]
    avg = [draw(st.integers(0, t)) for t in seq]
    return weights, avg, seq, draw(st.integers(0, 40)), draw(st.integers(1, 80))


@settings(max_examples=150, deadline=None)
@given(problems())
def test_exact_totals_caps_and_the_rule(problem):
    weights, avg, seq, n_sink, recent = problem
    allocator = DuoAttention(weights=weights, n_sink=n_sink, recent=recent)
    layers, heads = len(weights), len(weights[0])
    out = allocator.allocate(torch.tensor(avg), torch.tensor(seq), layers)
    assert out.shape == (len(avg), layers, heads) and out.dtype == torch.long
    flat_w = [w for row in weights for w in row]
    for b, (a, t) in enumerate(zip(avg, seq)):
        row = out[b].reshape(-1).tolist()
        assert sum(row) == layers * heads * a  # the pipeline's exact total
        assert all(0 <= x <= t for x in row)  # and its caps
        k, s, retrieval = reference(weights, a, t, n_sink, recent)
        if s == t:  # every head keeps the whole row: streaming and retrieval are the same
            assert row == [t] * len(row)
            continue
        ranked = sorted(range(len(row)), key=lambda i: (flat_w[i], i))
        streaming, kept = ranked[:k], ranked[k:]
        assert all(row[i] == s for i in streaming)
        assert sorted(row[i] for i in kept) == retrieval
        # the heads that stream are those that deviate least
        if streaming and kept:
            assert max(flat_w[i] for i in streaming) <= min(flat_w[i] for i in kept)


def test_hand_built_one_full_head():
    # 4 heads, 100 tokens, 40 on average, windows of 20: three heads stream (60 tokens), the fourth keeps
    # all 100. A fourth streaming head would leave 80 to nobody; two retrieval heads would not be full.
    weights = [[0.3, 0.01], [0.9, 0.2]]
    out = DuoAttention(weights=weights, n_sink=4, recent=16).allocate(40, 100, 2)
    assert out.tolist() == [[[20, 20], [100, 20]]]


def test_hand_built_retrieval_heads_share_what_is_left():
    # 6 heads, T=100, B=20, S=16: floor(6 * 80 / 84) = 5 stream, the last head takes 120 - 80 = 40.
    weights = [[0.1, 0.5], [0.05, 0.9], [0.3, 0.2]]
    assert DuoAttention(weights=weights, n_sink=4, recent=12).allocate(20, 100, 3).tolist() == [
        [[16, 16], [16, 40], [16, 16]]
    ]
    # T=100, B=60, S=16: floor(6 * 40 / 84) = 2 stream (the two smallest deviations), the other four share
    # 360 - 32 = 328: 82 each.
    assert DuoAttention(weights=weights, n_sink=4, recent=12).allocate(60, 100, 3).tolist() == [
        [[16, 82], [16, 82], [82, 82]]
    ]


def test_small_and_full_budgets():
    weights = [[0.3, 0.01], [0.9, 0.2]]
    allocator = DuoAttention(weights=weights, n_sink=4, recent=16)
    # an average below the window: every head streams with what there is
    assert allocator.allocate(7, 100, 2).tolist() == [[[7, 7], [7, 7]]]
    assert allocator.allocate(0, 100, 2).tolist() == [[[0, 0], [0, 0]]]
    # nothing to compress, or a row shorter than the window
    assert allocator.allocate(100, 100, 2).tolist() == [[[100, 100], [100, 100]]]
    assert allocator.allocate(12, 12, 2).tolist() == [[[12, 12], [12, 12]]]
    # one token short of the whole row: no head can give up 79 tokens that the others could take
    assert allocator.allocate(99, 100, 2).tolist() == [[[99, 99], [99, 99]]]


def test_ties_stream_the_lower_index_first():
    out = DuoAttention(weights=[[1.0, 1.0], [1.0, 1.0]], n_sink=4, recent=16).allocate(40, 100, 2)
    assert out.tolist() == [[[20, 20], [20, 100]]]


def test_batch_rows_are_independent():
    allocator = DuoAttention(weights=[[0.3, 0.01, 0.5], [0.9, 0.2, 0.0]], n_sink=2, recent=6)
    both = allocator.allocate(torch.tensor([10, 50]), torch.tensor([20, 300]), 2)
    assert torch.equal(both[0], allocator.allocate(10, 20, 2)[0])
    assert torch.equal(both[1], allocator.allocate(50, 300, 2)[0])


def test_weights_forms():
    nested = DuoAttention(weights=[[1, 2], [3, 0]])
    assert nested.weights == ((1.0, 2.0), (3.0, 0.0)) and nested.kv_heads == 2
    assert DuoAttention(weights=torch.tensor([[1.0, 2.0], [3.0, 0.0]])) == nested
    flat = DuoAttention(weights=(1.0, 2.0, 3.0))  # one KV head per layer
    assert flat.weights == ((1.0,), (2.0,), (3.0,)) and flat.allocate(5, 10, 3).shape == (1, 3, 1)
    assert flat == DuoAttention(weights=[1.0, 2.0, 3.0])


def test_declares_a_calibrated_head_allocator():
    assert DuoAttention.name == "duo" and DuoAttention.granularity == "head" and DuoAttention.calibrated
    assert not DuoAttention.needs_lmba
    assert DuoAttention.options == DUO_OPTIONS == {"sink": ("n_sink", int), "recent": ("recent", int)}
    defaults = DuoAttention(weights=[[1.0]])
    assert (defaults.n_sink, defaults.recent) == (128, 256)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="calibrated head patterns"):
        DuoAttention()
    for bad in ([], [[]], [[1.0, 2.0], [3.0]], [[1.0, float("nan")]], [[1.0, -1.0]], [[True]], "ab"):
        with pytest.raises(ValueError, match="weights"):
            DuoAttention(weights=bad)
    with pytest.raises(ValueError, match="n_sink"):
        DuoAttention(weights=[[1.0]], n_sink=-1)
    with pytest.raises(ValueError, match="recent"):
        DuoAttention(weights=[[1.0]], recent=0)
    with pytest.raises(ValueError, match="recent"):
        DuoAttention(weights=[[1.0]], recent=2.5)
    with pytest.raises(ValueError, match="2 layers, the model 3"):
        DuoAttention(weights=[[1.0], [2.0]]).allocate(5, 10, 3)
    with pytest.raises(ValueError, match="avg_budget"):
        DuoAttention(weights=[[1.0], [2.0]]).allocate(11, 10, 2)
    with pytest.raises(ValueError, match="deviations"):
        duo_head_budgets(torch.ones(3), 5, 10)


def test_profile_file(tmp_path):
    path = tmp_path / "duo.json"
    path.write_text(
        json.dumps({"method": "duo", "layers": [[0.2, 0.1], [0.0, 0.5]], "config": {"n_sink": 8, "recent": 24}})
    )
    assert read_duo_profile(path)["layers"] == [[0.2, 0.1], [0.0, 0.5]]
    allocator = DuoAttention.from_file(path)
    assert allocator == DuoAttention(weights=[[0.2, 0.1], [0.0, 0.5]], n_sink=8, recent=24)
    assert DuoAttention.from_file(path, recent=40).recent == 40
    path.write_text(json.dumps({"layers": [0.1, 0.2], "config": {}}))
    assert DuoAttention.from_file(path) == DuoAttention(weights=[[0.1], [0.2]])
    for bad in ({"nothing": 1}, {"layers": []}, {"layers": [[0.1], [0.1, 0.2]]}, [1, 2]):
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match="not a DuoAttention profile"):
            read_duo_profile(path)


def test_registry_parses_a_profile_and_the_window_suffixes(tmp_path, monkeypatch):
    """What ``get_budget`` does with a calibrated name once ``duo`` is registered (simulated here): the
    profile's ``"layers"`` become the weights and ``+sink`` / ``+recent`` set the window."""
    from zigzag import budget

    monkeypatch.setitem(budget.BUDGETS, "duo", DuoAttention)
    monkeypatch.setitem(budget.BUDGET_OPTIONS, "duo", DuoAttention.options)
    path = tmp_path / "duo.json"
    path.write_text(json.dumps({"method": "duo", "layers": [[0.2, 0.1], [0.0, 0.5]]}))
    allocator = budget.get_budget("duo+sink16+recent64", profile=path)
    assert allocator == DuoAttention(weights=[[0.2, 0.1], [0.0, 0.5]], n_sink=16, recent=64)
    assert budget.get_budget("duo", profile=[1.0, 2.0, 3.0]) == DuoAttention(weights=(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="pass profile="):
        budget.get_budget("duo")
    with pytest.raises(ValueError, match="needs an integer"):
        budget.get_budget("duo+sink1.5", profile=path)

"""The RULER statistics: a bootstrap of a mean of group means, resampled within each (task, family) cell,
and the paired lift of one setting over another, checked by hand and by its properties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.ruler.stats import CORE_TASKS, bootstrap_ci, core5_ci, families, paired_lift


def _records(scores: dict[str, dict[tuple[str, str], list[float]]], protocol: str = "agnostic") -> list[dict]:
    """Records of ``{setting: {(task, family): [score of sample 0, 1, ...]}}``."""
    return [{"task": task, "haystack": family, "index": i, "protocol": protocol, "setting": setting, "score": score}
            for setting, cells in scores.items() for (task, family), values in cells.items()
            for i, score in enumerate(values)]


def test_the_estimate_is_the_mean_of_the_group_means_not_of_the_samples():
    estimate, low, high = bootstrap_ci({("a", "x"): [0.0, 100.0, 100.0], ("b", "x"): [50.0]}, n_boot=500)
    assert estimate == pytest.approx((200 / 3 + 50) / 2)  # 58.33; the pooled mean would be 62.5
    assert low <= estimate <= high


def test_the_interval_is_the_quantiles_of_the_resampled_means():
    # One group {0, 100}: a resample's mean is 0, 50 or 100 with probabilities 1/4, 1/2, 1/4. The 30% and
    # 70% quantiles are both 50 (the CDF jumps from 1/4 to 3/4 there); the 5% and 95% ones are 0 and 100.
    assert bootstrap_ci({"g": [0.0, 100.0]}, n_boot=4000, level=0.4) == (50.0, 50.0, 50.0)
    assert bootstrap_ci({"g": [0.0, 100.0]}, n_boot=4000, level=0.9) == (50.0, 0.0, 100.0)


def test_samples_are_resampled_within_their_group_only():
    # Two one-sample groups: every resample is the same, so there is no width; resampling the four
    # samples as one pool would give some.
    assert bootstrap_ci({"x": [30.0], "y": [70.0, 70.0, 70.0]}) == (50.0, 50.0, 50.0)


def test_the_same_seed_gives_the_same_interval_whatever_the_group_order():
    # Spread-out scores, so that another seed moves the quantiles (0/100 scores would land on the same atoms).
    groups = {("niah_single_1", "essays"): [3.1, 7.4, 12.9, 55.0, 81.3], ("niah_single_1", "noise"): [0.0, 41.7, 100.0]}
    reordered = dict(reversed(list(groups.items())))
    assert bootstrap_ci(groups, seed=3) == bootstrap_ci(reordered, seed=3)
    assert bootstrap_ci(groups, seed=3) != bootstrap_ci(groups, seed=4)


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        bootstrap_ci({})
    with pytest.raises(ValueError):
        bootstrap_ci({"g": []})
    with pytest.raises(ValueError):
        bootstrap_ci({"g": [1.0]}, level=1.0)


# Two families, the five core tasks, four samples each: a hand-checkable lift.
A = {(t, f): [100.0, 100.0, 0.0, 100.0] for t in CORE_TASKS for f in ("essays", "noise")}
B = {(t, f): [100.0, 0.0, 0.0, 100.0] if f == "essays" else [100.0, 100.0, 0.0, 100.0] for t in CORE_TASKS
     for f in ("essays", "noise")}


def test_paired_lift_by_hand():
    records = _records({"a": A, "b": B})
    lift, low, high, n = paired_lift(records, "a", "b", n_boot=1000)
    # essays: a 75, b 50 on every task; noise: both 75. core5 over families: 75 - 62.5 = 12.5.
    assert lift == pytest.approx(12.5) and n == 2 * 5 * 4
    # Per essays cell the differences are (0, 100, 0, 0): the lift is half their resampled mean, at least 0.
    assert 0.0 <= low < lift < high <= 50.0
    assert core5_ci(records, "a")[:1] == (75.0,) and core5_ci(records, "b")[0] == 62.5


def test_paired_lift_pairs_samples_by_index():
    # The same scores, listed in another order for b, but paired by index: a constant difference of 10.
    a = {(t, "essays"): [10.0, 50.0, 90.0, 30.0] for t in CORE_TASKS}
    records = _records({"a": a, "b": {cell: [v - 10 for v in values] for cell, values in a.items()}})
    shuffled = sorted(records, key=lambda r: (r["setting"] == "b" and -r["index"], r["setting"]))
    assert paired_lift(shuffled, "a", "b") == (10.0, 10.0, 10.0, 20)
    # Unpaired, the same two settings have a wide interval of their own.
    _, low, high, _ = core5_ci(records, "a")
    assert high - low > 10


def test_paired_lift_needs_every_task_on_every_family():
    records = _records({"a": A, "b": B})
    partial = [r for r in records
               if not (r["setting"] == "b" and r["task"] == CORE_TASKS[0] and r["haystack"] == "noise")]
    with pytest.raises(ValueError, match="niah_single_1 on noise"):
        paired_lift(partial, "a", "b")
    # ... counted over the families asked for: essays alone is complete.
    assert paired_lift(partial, "a", "b", haystacks=("essays",))[0] == pytest.approx(25.0)
    assert families(records) == ("essays", "noise")


def test_records_without_a_haystack_are_the_default_family():
    essays = [r for r in _records({"a": A, "b": B}) if r["haystack"] == "essays"]
    records = [{k: v for k, v in r.items() if k != "haystack"} for r in essays]
    assert families(records) == ("ruler",)
    assert paired_lift(records, "a", "b")[0] == pytest.approx(25.0)


_cell_scores = st.lists(st.sampled_from([0.0, 25.0, 50.0, 100.0]), min_size=1, max_size=6)


@settings(max_examples=30, deadline=None)
@given(a=st.lists(_cell_scores, min_size=2, max_size=2), b_shift=st.lists(_cell_scores, min_size=2, max_size=2),
       seed=st.integers(0, 5), constant=st.sampled_from([-25.0, 0.0, 12.5]))
def test_lift_properties(a, b_shift, seed, constant):
    """On two families of one task: the interval holds the estimate, swapping the settings negates
    everything, a constant difference has no width."""
    tasks = ("niah_single_1",)
    cells_a = {("niah_single_1", f): values for f, values in zip(("essays", "novels"), a)}
    # b: as many samples as a per cell (pairs), otherwise unrelated scores.
    cells_b = {cell: (b_shift[i] * len(values))[: len(values)] for i, (cell, values) in enumerate(cells_a.items())}
    records = _records({"a": cells_a, "b": cells_b})
    lift, low, high, n = paired_lift(records, "a", "b", tasks=tasks, n_boot=300, seed=seed)
    assert low <= lift <= high and n == sum(len(v) for v in a)
    back = paired_lift(records, "b", "a", tasks=tasks, n_boot=300, seed=seed)
    assert back[0] == pytest.approx(-lift) and back[1] == pytest.approx(-high) and back[2] == pytest.approx(-low)
    assert back[3] == n
    shifted = _records({"a": cells_a, "c": {cell: [v - constant for v in values] for cell, values in cells_a.items()}})
    assert paired_lift(shifted, "a", "c", tasks=tasks, n_boot=300, seed=seed) == (constant, constant, constant, n)

"""The tables of a cut run: complete cells per scorer, scores and paired lifts over them."""

import random

import pytest

from benchmarks.ruler.complete import complete_cells, complete_rows, format_complete


def _record(scorer, budget, ratio, task, family, index, score):
    setting = "none" if scorer == "none" else f"{scorer}|{budget}|{ratio}|off"
    return {"protocol": "agnostic", "setting": setting, "scorer": scorer, "budget": budget, "ratio": ratio,
            "merge": "off", "task": task, "haystack": family, "index": index, "score": score}


def _run(rng, cut):
    """Three cells of 4 samples; scorer a runs everywhere, scorer b misses what ``cut`` names."""
    records = []
    cells = [("t1", "f1"), ("t2", "f1"), ("t1", "f2")]
    for task, family in cells:
        for i in range(4):
            records.append(_record("none", "none", 0.0, task, family, i, 100.0))
            for scorer in ("a", "b"):
                for budget in ("uniform", "other"):
                    if scorer == "b" and (task, family, budget, i) in cut:
                        continue
                    records.append(_record(scorer, budget, 0.5, task, family, i, rng.choice([0.0, 50.0, 100.0])))
    rng.shuffle(records)
    return records


def test_complete_cells_drop_a_cell_missing_one_sample_of_one_setting():
    rng = random.Random()
    records = _run(rng, cut={("t2", "f1", "other", 3)})
    a = ["a|uniform|0.5|off", "a|other|0.5|off"]
    b = ["b|uniform|0.5|off", "b|other|0.5|off"]
    assert complete_cells(records, "agnostic", a, "none") == [("t1", "f1"), ("t1", "f2"), ("t2", "f1")]
    assert complete_cells(records, "agnostic", b, "none") == [("t1", "f1"), ("t1", "f2")]


def test_rows_are_means_over_each_scorers_cells_and_lifts_are_their_differences():
    rng = random.Random()
    records = _run(rng, cut={("t2", "f1", "other", 0)})
    rows = {(r["scorer"], r["budget"]): r for r in complete_rows(records, n_boot=200)}

    def mean(scorer, budget, cells):
        per_cell = []
        for cell in cells:
            vals = [r["score"] for r in records if r["scorer"] == scorer and r["budget"] == budget
                    and (r["task"], r["haystack"]) == cell]
            per_cell.append(sum(vals) / len(vals))
        return sum(per_cell) / len(per_cell)

    b_cells = [("t1", "f1"), ("t1", "f2")]
    assert rows[("b", "other")]["cells"] == 2 and rows[("a", "other")]["cells"] == 3
    assert rows[("b", "other")]["score"] == pytest.approx(mean("b", "other", b_cells))
    assert rows[("b", "other")]["lift"] == pytest.approx(mean("b", "other", b_cells) - mean("b", "uniform", b_cells))
    assert rows[("b", "uniform")]["lift"] is None
    for r in rows.values():
        assert r["low"] <= r["score"] <= r["high"] and r["full"] == 100.0
    assert "**b**" in format_complete(list(rows.values()))


def test_a_scorer_without_a_complete_cell_has_no_rows():
    rng = random.Random()
    cut = {(t, f, "other", i) for t, f in [("t1", "f1"), ("t2", "f1"), ("t1", "f2")] for i in (1,)}
    rows = complete_rows(_run(rng, cut), n_boot=50)
    assert {r["scorer"] for r in rows} == {"a"}


def test_records_without_a_baseline_are_refused():
    records = [r for r in _run(random.Random(), set()) if r["scorer"] != "none"]
    with pytest.raises(ValueError, match="uncompressed"):
        complete_rows(records)

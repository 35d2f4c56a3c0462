"""The RULER report's accuracy plot: one line per (scorer, budget, merge) setting, a legend per panel,
and --plot-top keeps only the best settings in the plot while summary.csv keeps them all."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from benchmarks.ruler import report
from benchmarks.ruler.report import CORE_TASKS, load_records, plot_accuracy, summarize

# (protocol, scorer, budget, merge, {ratio: score on every core task})
SETTINGS = [
    ("agnostic", "ea", "uniform", "off", {0.5: 60.0, 0.75: 50.0}),
    ("agnostic", "ea", "uniform", "cosine", {0.5: 58.0, 0.75: 40.0}),
    ("agnostic", "ea", "uniform", "cosine+mass", {0.5: 55.0, 0.75: 45.0}),
    ("agnostic", "knorm", "zigzag", "off", {0.5: 30.0, 0.75: 10.0}),
    ("agnostic", "snapkv", "pyramid", "off", {0.5: 20.0}),
    ("aware", "ea", "uniform", "off", {0.5: 62.0, 0.75: 52.0}),
    ("aware", "ea", "uniform", "cosine", {0.5: 61.0, 0.75: 30.0}),
]


def _fake_run(out: Path) -> Path:
    out.mkdir()
    with open(out / "samples.rank0.jsonl", "w") as f:
        for protocol in ("agnostic", "aware"):
            rows = [(protocol, "none", "none", "off", {0.0: 70.0})] + [s for s in SETTINGS if s[0] == protocol]
            for _, scorer, budget, merge, scores in rows:
                for ratio, score in scores.items():
                    f.writelines(json.dumps({
                            "task": task, "index": 0, "protocol": protocol, "setting": f"{scorer}|{budget}|{ratio:g}|{merge}",
                            "scorer": scorer, "budget": budget, "ratio": ratio, "merge": merge, "score": score,
                        }) + "\n" for task in CORE_TASKS)
    with open(out / "budgets.rank0.jsonl", "w") as f:
        for budget, merge, budgets in [("uniform", "off", [4.0, 4.0, 4.0]), ("uniform", "cosine", [4.0, 4.0, 4.0]),
                                       ("zigzag", "off", [2.0, 6.0, 4.0])]:
            f.write(json.dumps({"task": CORE_TASKS[0], "protocol": "agnostic", "setting": f"ea|{budget}|0.75|{merge}",
                                "budgets": budgets}) + "\n")
    return out


def test_merge_modes_are_separate_lines_and_every_line_is_in_its_panels_legend(tmp_path):
    rows = summarize(load_records(_fake_run(tmp_path / "run")))
    drawn = plot_accuracy(rows, tmp_path / "acc.png", top=None)
    assert (tmp_path / "acc.png").stat().st_size > 0
    assert set(drawn) == {"agnostic", "aware"}

    agnostic = drawn["agnostic"]["lines"]
    assert agnostic[0]["label"].startswith("no compression")
    merges = {ln["label"]: ln for ln in agnostic if ln["label"].startswith("ea / uniform / ")}
    assert [label.split(" / ")[2].split(" (")[0] for label in merges] == ["merge off", "merge cosine+mass", "merge cosine"]
    # Each merge mode is its own line, with only its own points (no jumps between modes at one ratio) ...
    for ln in merges.values():
        assert ln["x"] == [0.5, 0.75]
    assert sorted(tuple(ln["y"]) for ln in merges.values()) == [(55.0, 45.0), (58.0, 40.0), (60.0, 50.0)]
    # ... that shares its setting's colour but not its line style and marker.
    assert len({ln["color"] for ln in merges.values()}) == 1
    assert len({(ln["linestyle"], ln["marker"]) for ln in merges.values()}) == 3
    assert len({ln["marker"] for ln in merges.values()}) == 3
    # Every line drawn in a panel, the reference included, is in that panel's legend.
    for panel in drawn.values():
        assert panel["legend"] == [ln["label"] for ln in panel["lines"]]
    assert len(drawn["agnostic"]["lines"]) == 1 + 5 and len(drawn["aware"]["lines"]) == 1 + 2
    # The same setting has the same colour in both panels.
    colour = {p: {ln["label"].split(" (")[0]: ln["color"] for ln in drawn[p]["lines"]} for p in drawn}
    assert colour["agnostic"]["ea / uniform / merge cosine"] == colour["aware"]["ea / uniform / merge cosine"]


def test_plot_top_keeps_the_best_settings_by_mean_and_summary_keeps_all(tmp_path, monkeypatch):
    out = _fake_run(tmp_path / "run")
    seen = {}

    def spy(*args, **kwargs):
        seen.update(plot_accuracy(*args, **kwargs))
        return seen

    monkeypatch.setattr(report, "plot_accuracy", spy)
    report.main([str(out), "--task", "core5", "--plot-top", "2"])

    # Means over the ratios each setting ran: off 55, cosine+mass 50, cosine 49, knorm 20, snapkv 20.
    labels = [ln["label"].split(" (")[0] for ln in seen["agnostic"]["lines"]]
    assert labels == ["no compression", "ea / uniform / merge off", "ea / uniform / merge cosine+mass"]
    assert "top 2 of 5 settings by mean score" in seen["agnostic"]["title"]
    assert len(seen["aware"]["lines"]) == 1 + 2 and "all 2 settings" in seen["aware"]["title"]

    with open(out / "summary.csv") as f:
        core5 = [r for r in csv.DictReader(f) if r["task"] == "core5"]
    assert len(core5) == 2 + sum(len(s[4]) for s in SETTINGS)  # two baselines + every (setting, ratio)
    assert (out / "accuracy_vs_ratio.png").stat().st_size > 0
    assert (out / "budget_profile.png").stat().st_size > 0

    # --plot-top 0 draws them all.
    report.main([str(out), "--plot-top", "0"])
    assert len(seen["agnostic"]["lines"]) == 1 + 5


def test_plot_top_must_not_be_negative(tmp_path):
    with pytest.raises(SystemExit):
        report.main([str(tmp_path), "--plot-top", "-1"])


def _fewer_tasks_run(out: Path, tasks: tuple[str, ...]) -> Path:
    """A run of ``tasks`` only (fewer than the five core tasks), per-task scores differing."""
    out.mkdir()
    with open(out / "samples.rank0.jsonl", "w") as f:
        for protocol in ("agnostic", "aware"):
            for scorer, budget, scores in [("none", "none", {0.0: 80.0}), ("ea", "uniform", {0.5: 60.0, 0.75: 40.0}),
                                           ("knorm", "zigzag", {0.5: 30.0})]:
                for ratio, score in scores.items():
                    f.writelines(json.dumps({
                            "task": task, "index": 0, "protocol": protocol, "setting": f"{scorer}|{budget}|{ratio:g}|off",
                            "scorer": scorer, "budget": budget, "ratio": ratio, "merge": "off", "score": score - 10 * i,
                        }) + "\n" for i, task in enumerate(tasks))
    return out


def test_with_fewer_than_the_core_tasks_the_plot_shows_their_average(tmp_path):
    tasks = ("niah_single_1", "niah_single_2")
    rows = summarize(load_records(_fewer_tasks_run(tmp_path / "run", tasks)))
    assert not [r for r in rows if r["task"] == "core5"]  # no core5 average exists ...
    drawn = plot_accuracy(rows, tmp_path / "acc.png", task="core5", top=8)
    assert (tmp_path / "acc.png").stat().st_size > 0
    for panel in drawn.values():  # ... so each panel plots the average of the two tasks, and says so
        assert panel["task"] == "avg"
        assert "average of the 2 tasks that ran" in panel["title"]
        assert "niah_single_1, niah_single_2" in panel["title"]
        by_label = {ln["label"].split(" (")[0]: ln for ln in panel["lines"]}
        assert by_label["no compression"]["y"] == [75.0, 75.0]  # the reference line: mean of 80 and 70
        assert by_label["ea / uniform / merge off"]["x"] == [0.5, 0.75]
        assert by_label["ea / uniform / merge off"]["y"] == [55.0, 35.0]
        assert by_label["knorm / zigzag / merge off"]["y"] == [25.0]
        assert panel["legend"] == [ln["label"] for ln in panel["lines"]]


def test_with_the_core_tasks_the_plot_stays_on_core5(tmp_path):
    rows = summarize(load_records(_fake_run(tmp_path / "run")))
    drawn = plot_accuracy(rows, tmp_path / "acc.png", task="core5", top=None)
    for panel in drawn.values():
        assert panel["task"] == "core5" and panel["title"].startswith(f"{panel['title'].split(':')[0]}: core5 average")


def test_report_main_never_writes_a_blank_plot_for_a_partial_run(tmp_path, monkeypatch):
    out = _fewer_tasks_run(tmp_path / "run", ("niah_multikey_1",))
    seen = {}

    def spy(*args, **kwargs):
        seen.update(plot_accuracy(*args, **kwargs))
        return seen

    monkeypatch.setattr(report, "plot_accuracy", spy)
    report.main([str(out)])
    assert seen and all(len(panel["lines"]) == 1 + 2 for panel in seen.values())
    assert all("average of the 1 task that ran" in panel["title"] for panel in seen.values())

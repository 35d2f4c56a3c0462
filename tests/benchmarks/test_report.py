"""The RULER report's accuracy plot: one line per (scorer, budget, merge) setting, a legend per panel,
and --plot-top keeps only the best settings in the plot while summary.csv keeps them all. With haystack
families: summary rows per family and over all of them, the --lift, --families and --table tables, the
lift bars; a folder of older records (no haystack) reads as one family."""

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


# --- haystack families ---------------------------------------------------------------------------------

FAMILIES = ("essays", "noise", "novels")
U, Z_GOOD = [100.0, 0.0, 100.0, 0.0], [100.0, 100.0, 100.0, 0.0]
HALF, QUARTER = [50.0] * 4, [25.0] * 4  # partial credit (multi-value tasks), for a constant difference


def _every(families: tuple[str, ...], scores: list[float]) -> dict[str, list[float]]:
    return {family: scores for family in families}


# (scorer, budget, ratio) -> family -> the four samples' scores on every core task.
FAMILY_SETTINGS = {
    ("none", "none", 0.0): _every(FAMILIES, [100.0, 100.0, 100.0, 0.0]),
    ("ea", "uniform", 0.5): _every(FAMILIES, U),
    ("ea", "zigzag", 0.5): {"essays": Z_GOOD, "noise": U, "novels": Z_GOOD},  # lift 25, 0, 25: mean 16.67
    ("ea", "uniform", 0.75): _every(FAMILIES, HALF),
    ("ea", "zigzag", 0.75): _every(FAMILIES, QUARTER),  # lift -25 on every sample
    ("knorm", "uniform", 0.5): _every(FAMILIES, U),
    ("knorm", "zigzag", 0.5): _every(FAMILIES, U),  # lift 0, no width
    ("snapkv", "uniform", 0.5): {"essays": U},  # one family only: no "all" row, no lift
    ("snapkv", "zigzag", 0.5): {"essays": Z_GOOD},
}


def _family_run(out: Path, settings: dict = FAMILY_SETTINGS) -> Path:
    out.mkdir()
    with open(out / "samples.rank0.jsonl", "w") as f:
        for (scorer, budget, ratio), by_family in settings.items():
            for family, scores in by_family.items():
                f.writelines(json.dumps({
                        "task": task, "haystack": family, "index": i, "protocol": "agnostic",
                        "setting": f"{scorer}|{budget}|{ratio:g}|off", "scorer": scorer, "budget": budget,
                        "ratio": ratio, "merge": "off", "score": score,
                    }) + "\n" for task in CORE_TASKS for i, score in enumerate(scores))
    return out


def test_load_records_keys_by_haystack_and_old_records_get_the_default_family(tmp_path):
    out = _family_run(tmp_path / "run")
    records = load_records(out)
    assert len(records) == 5 * 4 * sum(len(v) for v in FAMILY_SETTINGS.values())  # same index, other family: kept
    old = load_records(_fake_run(tmp_path / "old"))
    assert {r["haystack"] for r in old} == {"ruler"}


def test_summary_has_a_row_per_family_and_all_rows_for_settings_on_every_family(tmp_path):
    out = _family_run(tmp_path / "run")
    report.main([str(out), "--no-plots"])
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    core5 = {(r["haystack"], r["scorer"], r["budget"], r["ratio"]): float(r["score"])
             for r in rows if r["task"] == "core5"}
    assert core5[("essays", "ea", "zigzag", "0.5")] == 75.0 and core5[("noise", "ea", "zigzag", "0.5")] == 50.0
    assert core5[("all", "ea", "zigzag", "0.5")] == round((75 + 50 + 75) / 3, 2)
    assert core5[("all", "none", "none", "0.0")] == 75.0
    assert ("essays", "snapkv", "zigzag", "0.5") in core5 and ("all", "snapkv", "zigzag", "0.5") not in core5
    per_task_all = [r for r in rows if r["haystack"] == "all" and r["task"] == CORE_TASKS[0] and r["scorer"] == "ea"]
    assert len(per_task_all) == 4 and all(r["n"] == "3" for r in per_task_all)


def test_an_old_single_family_folder_gets_no_all_rows(tmp_path):
    out = _fake_run(tmp_path / "run")
    report.main([str(out), "--no-plots"])
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["haystack"] for r in rows} == {"ruler"}
    assert len([r for r in rows if r["task"] == "core5"]) == 2 + sum(len(s[4]) for s in SETTINGS)


def test_the_plot_and_the_table_show_the_mean_over_families(tmp_path, capsys):
    out = _family_run(tmp_path / "run")
    rows = summarize(load_records(out))
    drawn = plot_accuracy(rows, tmp_path / "acc.png", top=None)
    by_label = {ln["label"].split(" (")[0]: ln for ln in drawn["agnostic"]["lines"]}
    assert by_label["ea / zigzag / merge off"]["y"] == [round(200 / 3, 2), 25.0]
    assert "snapkv / zigzag / merge off" not in by_label  # it ran on one family only
    assert "mean over the 3 haystack families essays, noise, novels" in drawn["agnostic"]["title"]
    report.main([str(out), "--no-plots", "--table"])
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "core5: all protocols, mean over the 3 haystack families essays, noise, novels"
    assert "| agnostic | ea | zigzag | off | 66.7 | 25.0 |" in table


def test_lift_table_compares_each_budget_with_uniform_paired(tmp_path, capsys):
    out = _family_run(tmp_path / "run")
    report.main([str(out), "--no-plots", "--lift", "--n-boot", "500"])
    text = capsys.readouterr().out
    assert (out / "lift.md").read_text() == text
    lines = text.splitlines()
    assert lines[0].startswith("agnostic: core5 lift over uniform (same scorer, ratio, merge), points, the mean over 3")
    assert lines[1:3] == ["| scorer | zigzag 0.5 | zigzag 0.75 |", "|---|---|---|"]
    ea, knorm = lines[3].split(" | "), lines[4].split(" | ")
    # One difference of 100 in each of the 10 essays and novels cells of 4: a resample with none of them
    # (0.75 ** 40) is too rare to reach the interval, which excludes 0.
    assert ea[0] == "| ea" and ea[1].startswith("**+16.7 [") and ea[1].endswith("]**")
    assert ea[2] == "**-25.0 [-25.0, -25.0]** |"  # a constant difference: no width, excludes 0
    assert knorm == ["| knorm", "+0.0 [0.0, 0.0]", " |"]  # knorm never ran 0.75: an empty cell
    assert len(lines) == 5  # snapkv ran one family only: no lift over the families
    with open(out / "lift.csv") as f:
        rows = {(r["scorer"], r["ratio"]): r for r in csv.DictReader(f)}
    assert rows[("ea", "0.5")]["lift"] == "16.67" and rows[("ea", "0.5")]["n"] == str(3 * 5 * 4)
    assert rows[("knorm", "0.5")]["excludes_zero"] == "False" and rows[("ea", "0.75")]["excludes_zero"] == "True"
    assert rows[("ea", "0.5")]["families"] == "essays noise novels"


def test_lift_with_another_reference_and_on_an_old_folder(tmp_path, capsys):
    out = _family_run(tmp_path / "run")
    report.main([str(out), "--no-plots", "--lift", "--reference", "zigzag", "--n-boot", "200"])
    assert "| scorer | uniform 0.5 | uniform 0.75 |" in capsys.readouterr().out
    old = _fake_run(tmp_path / "old")  # one budget per scorer: no lift to print
    with pytest.raises(SystemExit):
        report.main([str(old), "--no-plots", "--lift"])


def test_families_table_lists_each_family_the_mean_with_an_interval_and_the_worst(tmp_path, capsys):
    out = _family_run(tmp_path / "run")
    report.main([str(out), "--no-plots", "--families", "--n-boot", "300"])
    tables = capsys.readouterr().out.split("\n\n")
    assert len(tables) == 2  # ratios 0.5 and 0.75
    lines = tables[0].splitlines()
    assert lines[0].startswith("agnostic, ratio 0.5: core5 per haystack family")
    assert lines[1] == "| setting | essays | noise | novels | all | min |"
    cells = lines[3].split(" | ")
    assert cells[:4] == ["| uncompressed", "75.0", "75.0", "75.0"] and cells[-1] == "75.0 essays |"
    low, high = (float(x) for x in cells[4].removeprefix("75.0 [").removesuffix("]").split(", "))
    assert low < 75.0 < high
    assert lines[4].startswith("| ea / zigzag | 75.0 | 50.0 | 75.0 | 66.7 [") and lines[4].endswith(" | 50.0 noise |")
    assert lines[-1] == "| snapkv / zigzag | 75.0 |  |  |  |  |"  # incomplete: no mean, no min, listed last


def test_write_report_draws_the_lift_bars_when_several_budgets_ran(tmp_path, monkeypatch):
    out = _family_run(tmp_path / "run")
    seen = {}

    def spy(*args, **kwargs):
        seen.update(real(*args, **kwargs))
        return seen

    real = report.plot_lift
    monkeypatch.setattr(report, "plot_lift", spy)
    report.write_report(out)
    assert (out / "lift_by_scorer.png").stat().st_size > 0
    assert set(seen) == {"agnostic 0.5", "agnostic 0.75"}
    bars = {(b["scorer"], b["series"]): b for b in seen["agnostic 0.5"]["bars"]}
    assert set(bars) == {("ea", "zigzag"), ("knorm", "zigzag")}
    assert bars[("ea", "zigzag")]["height"] == pytest.approx(16.67)
    assert seen["agnostic 0.75"]["bars"][0]["height"] == -25.0
    # One budget per scorer (the old fake run): no lift, no figure.
    old = _fake_run(tmp_path / "old")
    report.write_report(old)
    assert not (old / "lift_by_scorer.png").exists()

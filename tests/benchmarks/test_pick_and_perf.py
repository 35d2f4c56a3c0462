"""The development-seed picker chooses by the dev records only, and the GPU benchmark script runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.ruler.pick import pick
from benchmarks.ruler.report import CORE_TASKS


def _write(out: Path, rows: list[tuple[str, str, float, float]]) -> None:
    """rows: (scorer, budget, ratio, score for every core task)."""
    with open(out / "samples.rank0.jsonl", "w") as f:
        for scorer, budget, ratio, score in rows:
            for task in CORE_TASKS:
                setting = f"{scorer}|{budget}|{ratio:g}|off"
                record = {"task": task, "index": 0, "protocol": "agnostic", "setting": setting, "scorer": scorer,
                          "budget": budget, "ratio": ratio, "merge": "off", "score": score}
                f.write(json.dumps(record) + "\n")


def test_pick_takes_the_best_mean_of_half_and_three_quarters(tmp_path):
    _write(tmp_path, [
        ("none", "none", 0.0, 90.0),
        ("a", "uniform", 0.5, 60.0), ("a", "uniform", 0.75, 40.0),  # mean 50
        ("b", "uniform", 0.5, 55.0), ("b", "uniform", 0.75, 50.0),  # mean 52.5: best overall
        ("a", "zigzag+skip2", 0.5, 58.0), ("a", "zigzag+skip2", 0.75, 30.0),  # mean 44: best zigzag
        ("b", "zigzag", 0.5, 50.0), ("b", "zigzag", 0.75, 30.0),
        ("c", "zigzag", 0.5, 99.0),  # 0.75 missing: not eligible
    ])
    assert pick(tmp_path) == ("b", "uniform", "off", 52.5)
    assert pick(tmp_path, "zigzag") == ("a", "zigzag+skip2", "off", 44.0)
    with pytest.raises(SystemExit, match="pyramid"):
        pick(tmp_path, "pyramid")


def test_perf_script_runs_on_a_tiny_model(tmp_path, capsys):
    from benchmarks.perf.run import main

    main(["--tiny", "--lengths", "128", "--sections", "overhead,chunked", "--chunk-size", "64",
          "--long-length", "256", "--decode-steps", "2", "--out", str(tmp_path)])
    rows = [json.loads(line) for line in (tmp_path / "perf.jsonl").read_text().splitlines()]
    methods = {(r.get("section"), r.get("method")) for r in rows}
    assert ("overhead", "none") in methods and ("overhead", "expected_attention/zigzag") in methods
    assert ("chunked", "expected_attention/zigzag chunk=64") in methods
    compressed = [r for r in rows if r.get("method") == "knorm/uniform"][0]
    uncompressed = [r for r in rows if r.get("method") == "none"][0]
    assert 0.45 < compressed["kv_bytes"] / uncompressed["kv_bytes"] < 0.6  # ratio 0.5, plus the slot index
    assert "| overhead | none | 128 |" in capsys.readouterr().out

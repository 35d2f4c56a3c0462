"""The per-call sweep (benchmarks/perf/sweep.py) runs on a tiny model on the CPU and reports every setting."""

from __future__ import annotations

import json

import pytest

from benchmarks.perf import sweep


def test_sweep_runs_on_a_tiny_model(tmp_path, capsys):
    sweep.main(["--tiny", "--calls", "2", "--warmup", "1", "--settings", "knorm/uniform,knorm/zigzag", "--out", str(tmp_path)])
    rows = [json.loads(line) for line in (tmp_path / "sweep.rank0.jsonl").read_text().splitlines()]
    assert [(r["call"], r["setting"]) for r in rows] == [
        (0, "none"), (0, "knorm/uniform"), (0, "knorm/zigzag"), (1, "knorm/uniform"), (1, "knorm/zigzag"), (1, "none"),
    ]  # interleaved call by call, the order rotated
    assert all(300 <= r["tokens"] <= 340 and r["ms"] > 0 for r in rows)
    assert rows[0]["tokens"] == rows[1]["tokens"] == rows[2]["tokens"]  # one context per call, for every setting
    table = capsys.readouterr().out.split("\n\n")[-1]
    zigzag_row = next(line for line in table.splitlines() if line.startswith("| knorm/zigzag |"))
    ms = sorted(r["ms"] for r in rows if r["setting"] == "knorm/zigzag")
    uniform = sorted(r["ms"] for r in rows if r["setting"] == "knorm/uniform")
    cells = [c.strip() for c in zigzag_row.strip("|").split("|")]
    assert cells[1] == "2" and float(cells[6]) == pytest.approx(sum(ms) / sum(uniform), abs=0.01)
    assert (tmp_path / "table.md").read_text().strip() == table.strip()


def test_summaries_pool_processes_and_give_their_spread():
    rows = [{"rank": rank, "call": k, "setting": s, "ms": ms, "peak_mib": None, "pinned": 0}
            for rank, scale in ((0, 1.0), (1, 2.0)) for k in range(3)
            for s, ms in (("none", 10.0 * scale), ("a/uniform", 20.0 * scale + k), ("a/zigzag", 30.0 * scale + 3 * k))]
    summary = {s["setting"]: s for s in sweep.summarize(rows, sweep.parse_settings("a/uniform,a/zigzag"))}
    zz = summary["a/zigzag"]
    assert zz["calls"] == 6 and zz["max_ms"] == 66.0 and zz["median_ms"] == (36.0 + 60.0) / 2
    assert zz["vs_uniform"] == pytest.approx(zz["median_ms"] / summary["a/uniform"]["median_ms"])
    assert zz["process_medians"] == [33.0, 63.0] and summary["a/uniform"]["vs_uniform"] is None
    assert "33.0–63.0 (1.91)" in sweep.markdown(list(summary.values()), processes=2)

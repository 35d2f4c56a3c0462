"""The runner's --scorers / --budgets accept suffixed names and reject bad ones before any work."""

from __future__ import annotations

import pytest

from benchmarks.ruler.run import make_scorer, parse_args, settings_from


def test_suffixed_names_are_accepted_and_built():
    args = parse_args([
        "--out", "x", "--scorers", "expected_attention+pool5,expected_attention+maxpool9+shared+first64+last32",
        "--budgets", "uniform,zigzag+skip2+cap2,zigzag_heads+gamma0.5", "--ratios", "0.5,0.75",
    ])
    assert args.budgets == ["uniform", "zigzag+skip2+cap2", "zigzag_heads+gamma0.5"]
    settings = settings_from(args.scorers, args.budgets, args.ratios, args.merge)
    assert len(settings) == 1 + 2 * 3 * 2
    assert make_scorer(args.scorers[1]).name == "expected_attention+maxpool9+shared+first64+last32"


def test_kvzip_settings_get_the_runs_reconstruction_prompt():
    from benchmarks.ruler.run import reconstruction_for
    from zigzag.scorers.kvzip import Reconstruction

    class Words:
        def encode(self, text, add_special_tokens=False):
            return [len(w) for w in text.split()]

    args = parse_args(["--out", "x", "--scorers", "kvzip+pool7,knorm", "--budgets", "uniform", "--ratios", "0.5"])
    settings = settings_from(args.scorers, args.budgets, args.ratios, args.merge)
    setup = reconstruction_for(Words(), args.kvzip_prompt, settings)
    assert setup == Reconstruction(prompt_ids=(6, 3, 8, 7, 8))  # "Repeat the previous context exactly."
    assert reconstruction_for(Words(), "", settings) == Reconstruction()
    assert reconstruction_for(Words(), args.kvzip_prompt, settings[2:]) is None  # knorm only
    scorer = make_scorer("kvzip+pool7", setup)
    assert scorer.name == "kvzip+pool7" and scorer.reconstruction == setup and scorer.inner.reconstruction == setup
    assert make_scorer("knorm", setup).name == "knorm"


@pytest.mark.parametrize("flag,value", [("--scorers", "knorm+pool4"), ("--scorers", "scissorhands"), ("--budgets", "zigzag+foo2"), ("--budgets", "zz")])
def test_bad_names_are_rejected(flag, value, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--out", "x", flag, value])
    assert "bad" in capsys.readouterr().err


def test_format_table_lists_settings_best_first_with_the_baseline_on_top():
    from benchmarks.ruler.report import format_table

    def row(scorer, budget, ratio, score, task="core5"):
        return {"protocol": "agnostic", "scorer": scorer, "budget": budget, "merge": "off", "ratio": ratio, "task": task, "score": score, "n": 5}

    rows = [row("none", "none", 0.0, 65.6), row("ea", "uniform", 0.5, 52.1), row("ea", "uniform", 0.75, 35.7),
            row("ea", "zigzag", 0.5, 46.9), row("ea", "zigzag", 0.75, 18.2), row("ea", "zigzag", 0.75, 99.0, task="niah_single_1")]
    lines = format_table(rows).splitlines()
    assert lines[1] == "| protocol | scorer | budget | merge | 0.5 | 0.75 |"
    assert lines[3:] == [
        "| agnostic | none | none | off | 65.6 | 65.6 |",
        "| agnostic | ea | uniform | off | 52.1 | 35.7 |",
        "| agnostic | ea | zigzag | off | 46.9 | 18.2 |",
    ]

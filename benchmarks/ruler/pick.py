"""Pick the configurations to report from a development run, before any reported sample is seen.

    python -m benchmarks.ruler.pick results/ruler-dev [--budget-prefix zigzag] [--ratios 0.5,0.75]

Prints ``SCORER BUDGET MERGE SCORE``: the agnostic setting with the best core5 averaged over the --ratios
(0.5 and 0.75) and over the haystack families (among budgets starting with ``--budget-prefix`` when given;
ties go to the first in sorted order). A setting must have run every ratio on every family in the folder.
With several families a second line, ``worst family: FAMILY SCORE``, names the family where the picked
setting scores lowest (the first line stays what scripts read). Folders of older runs, without haystack
families, are one family. The reported sweep then runs these on the reported seed, so no reported
number chooses.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from benchmarks.cli import HelpFormatter
from benchmarks.ruler.report import ALL_HAYSTACKS, load_records, summarize


class Choice(NamedTuple):
    """The picked setting, its score (mean over families of the mean over ratios) and its worst family."""

    scorer: str
    budget: str
    merge: str
    score: float
    worst_family: str
    worst_score: float
    families: tuple[str, ...]


def choose(out_dir: Path, budget_prefix: str = "", ratios: Sequence[float] = (0.5, 0.75), task: str = "core5",
           protocol: str = "agnostic") -> Choice:
    """The compressed ``protocol`` setting with the best ``task`` score averaged over ``ratios`` and then
    over the haystack families; only settings that ran every ratio on every family of the folder (any
    protocol) are eligible, so a setting is never picked for skipping its hard family."""
    rows = summarize(load_records(out_dir))
    fams = sorted({r["haystack"] for r in rows} - {ALL_HAYSTACKS})
    # (scorer, budget, merge) -> family -> ratio -> score; the family rows, not "all", to name the worst.
    scores: dict[tuple, dict[str, dict[float, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if (r["task"] == task and r["protocol"] == protocol and r["haystack"] != ALL_HAYSTACKS
                and r["budget"].startswith(budget_prefix) and r["scorer"] != "none"):
            scores[(r["scorer"], r["budget"], r["merge"])][r["haystack"]][float(r["ratio"])] = r["score"]
    per_family: dict[tuple, dict[str, float]] = {}
    for key, by_family in sorted(scores.items()):
        if all(f in by_family and all(x in by_family[f] for x in ratios) for f in fams):
            per_family[key] = {f: sum(by_family[f][x] for x in ratios) / len(ratios) for f in fams}
    if not per_family:
        every = f" on every haystack family ({', '.join(fams)})" if len(fams) > 1 else ""
        raise SystemExit(f"no setting with budget prefix {budget_prefix!r} ran all of ratios {tuple(ratios)} "
                         f"on {task}{every}")
    mean = {key: sum(v.values()) / len(v) for key, v in per_family.items()}
    best = max(mean, key=mean.get)  # max keeps the first of equal scores: sorted order breaks ties
    worst = min(fams, key=lambda f: (per_family[best][f], f))
    return Choice(*best, mean[best], worst, per_family[best][worst], tuple(fams))


def pick(out_dir: Path, budget_prefix: str = "", ratios: Sequence[float] = (0.5, 0.75),
         task: str = "core5") -> tuple[str, str, str, float]:
    """``(scorer, budget, merge, score)`` of ``choose``."""
    return tuple(choose(out_dir, budget_prefix, ratios, task)[:4])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ruler.pick", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("out_dir", type=Path, help="folder of a development run (its samples.rank*.jsonl)")
    parser.add_argument("--budget-prefix", default="", help="only budgets whose name starts with this ('': all)")
    parser.add_argument("--task", default="core5", help="core5, avg (smoke runs with fewer tasks) or one task")
    parser.add_argument("--ratios", default="0.5,0.75", help="comma list of the ratios whose scores are averaged")
    args = parser.parse_args(argv)
    try:
        ratios = tuple(float(x) for x in args.ratios.split(","))
    except ValueError:
        parser.error(f"--ratios must be a comma list of numbers, got {args.ratios!r}")
    choice = choose(args.out_dir, args.budget_prefix, ratios, task=args.task)
    print(choice.scorer, choice.budget, choice.merge, f"{choice.score:.2f}")
    if len(choice.families) > 1:
        print(f"worst family: {choice.worst_family} {choice.worst_score:.2f}")


if __name__ == "__main__":
    main()

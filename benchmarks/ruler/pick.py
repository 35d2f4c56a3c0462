"""Pick the configurations to report from a development run, before any reported sample is seen.

    python -m benchmarks.ruler.pick results/ruler-dev [--budget-prefix zigzag]

Prints ``SCORER BUDGET MERGE``: the agnostic setting with the best core5 average over ratios 0.5 and
0.75 (among budgets starting with ``--budget-prefix`` when given; ties go to the first in sorted
order). The reported sweep then runs these on the reported seed, so no reported number chooses.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from benchmarks.cli import HelpFormatter
from benchmarks.ruler.report import load_records, summarize


def pick(out_dir: Path, budget_prefix: str = "", ratios=(0.5, 0.75), task: str = "core5") -> tuple[str, str, str, float]:
    rows = [r for r in summarize(load_records(out_dir)) if r["task"] == task and r["protocol"] == "agnostic"]
    scores: dict[tuple, dict[float, float]] = defaultdict(dict)
    for r in rows:
        if r["budget"].startswith(budget_prefix) and r["scorer"] != "none":
            scores[(r["scorer"], r["budget"], r["merge"])][float(r["ratio"])] = r["score"]
    complete = {k: sum(v[x] for x in ratios) / len(ratios) for k, v in sorted(scores.items()) if all(x in v for x in ratios)}
    if not complete:
        raise SystemExit(f"no setting with budget prefix {budget_prefix!r} ran all of ratios {ratios} on {task}")
    best = max(complete, key=complete.get)
    return (*best, complete[best])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ruler.pick", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("out_dir", type=Path, help="folder of a development run (its samples.rank*.jsonl)")
    parser.add_argument("--budget-prefix", default="", help="only budgets whose name starts with this ('': all)")
    parser.add_argument("--task", default="core5", help="core5, avg (smoke runs with fewer tasks) or one task")
    args = parser.parse_args(argv)
    scorer, budget, merge, score = pick(args.out_dir, args.budget_prefix, task=args.task)
    print(scorer, budget, merge, f"{score:.2f}")


if __name__ == "__main__":
    main()

"""Tables of a run cut short: each scorer over the (task, family) cells where all of its settings finished.

A sweep stopped at its deadline leaves some cells with every setting, some with the first scorers only,
some with none. core5 over the families then has no value, but the budgets of one scorer can still be
compared fairly on the cells where all of them ran on all the samples the uncompressed baseline ran:

    python -m benchmarks.ruler.report OUT --complete-cells

For each scorer: its cells, the uncompressed score there, and per (budget, ratio) the mean over those
cells of each cell's mean sample score with its bootstrap interval, and the paired lift over the
reference budget (``stats.bootstrap_ci`` on the per-sample differences). Scores of different scorers
may rest on different cells: compare lifts within a scorer, and read scores against the uncompressed
score printed beside them.

Pure functions of the records (dicts as ``report.load_records`` returns them).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

from .stats import bootstrap_ci, haystack

Cell = tuple[str, str]  # (task, family)

__all__ = ["complete_cells", "complete_rows", "format_complete"]


def _samples(records: Iterable[Mapping], protocol: str) -> dict[str, dict[Cell, dict[int, float]]]:
    """``{setting: {(task, family): {index: score}}}`` of one protocol."""
    out: dict[str, dict[Cell, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in records:
        if r["protocol"] == protocol:
            out[r["setting"]][(r["task"], haystack(r))][r["index"]] = float(r["score"])
    return out


def _complete(samples: Mapping[str, Mapping[Cell, Mapping[int, float]]], settings: Sequence[str],
              baseline: str) -> list[Cell]:
    cells = []
    for cell, indices in samples.get(baseline, {}).items():
        if all(indices.keys() <= samples.get(s, {}).get(cell, {}).keys() for s in settings):
            cells.append(cell)
    return sorted(cells)


def complete_cells(records: Iterable[Mapping], protocol: str, settings: Sequence[str], baseline: str) -> list[Cell]:
    """The cells, sorted, where every one of ``settings`` has a score for every sample index ``baseline``
    (the uncompressed setting) has there."""
    return _complete(_samples(records, protocol), settings, baseline)


def complete_rows(records: Sequence[Mapping], protocol: str = "agnostic", reference: str = "uniform",
                  n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> list[dict]:
    """One row per (scorer, budget, ratio, merge) of ``protocol``, over its scorer's complete cells:
    ``score``/``low``/``high``, ``lift``/``lift_low``/``lift_high`` over ``reference`` (None for the
    reference itself or when it did not run), ``full`` (the uncompressed score on the same cells),
    ``cells`` (their number) and ``n`` (samples per setting). Scorers with no complete cell get no row."""
    meta = {r["setting"]: (r["scorer"], r["budget"], r["ratio"], r["merge"]) for r in records if r["protocol"] == protocol}
    baseline = next((s for s, m in meta.items() if m[0] == "none"), None)
    if baseline is None:
        raise ValueError(f"the {protocol} records hold no uncompressed baseline (scorer 'none')")
    samples = _samples(records, protocol)
    by_scorer: dict[str, list[str]] = defaultdict(list)
    for setting, (scorer, *_rest) in meta.items():
        if scorer != "none":
            by_scorer[scorer].append(setting)
    rows = []
    for scorer, settings in sorted(by_scorer.items()):
        cells = _complete(samples, settings, baseline)  # one pass over the records serves every scorer
        if not cells:
            continue
        indices = {c: sorted(samples[baseline][c]) for c in cells}
        groups = {s: {c: [samples[s][c][i] for i in indices[c]] for c in cells} for s in [baseline, *settings]}

        full = bootstrap_ci(groups[baseline], n_boot=1)[0]
        for setting in settings:
            _, budget, ratio, merge = meta[setting]
            score, low, high = bootstrap_ci(groups[setting], n_boot=n_boot, seed=seed, level=level)
            ref = next((s for s in settings if meta[s] == (scorer, reference, ratio, merge)), None)
            lift = lift_low = lift_high = None
            if ref is not None and ref != setting:
                mine, theirs = groups[setting], groups[ref]
                diffs = {c: [a - b for a, b in zip(mine[c], theirs[c])] for c in cells}
                lift, lift_low, lift_high = bootstrap_ci(diffs, n_boot=n_boot, seed=seed, level=level)
            rows.append({"protocol": protocol, "scorer": scorer, "budget": budget, "ratio": ratio, "merge": merge,
                         "score": score, "low": low, "high": high, "lift": lift, "lift_low": lift_low,
                         "lift_high": lift_high, "full": full, "cells": len(cells),
                         "n": sum(len(v) for v in indices.values()),
                         "cell_names": " ".join(f"{t}@{f}" for t, f in cells)})
    return rows


def format_complete(rows: Sequence[Mapping], reference: str = "uniform", level: float = 0.95) -> str:
    """Markdown: one table per scorer, a row per budget, a column per ratio holding
    ``score (lift [low, high])``; a bold lift's interval excludes 0."""
    out = []
    by_scorer: dict[str, list[Mapping]] = defaultdict(list)
    for r in rows:
        by_scorer[r["scorer"]].append(r)
    for scorer, mine in by_scorer.items():
        ratios = sorted({r["ratio"] for r in mine})
        first = mine[0]
        out.append(f"**{scorer}** ({first['protocol']}): {first['cells']} complete cell(s), {first['n']} samples per "
                   f"setting; uncompressed {first['full']:.1f}. Cells: {first['cell_names']}.\n")
        out.append("| budget | merge | " + " | ".join(f"{x:g}" for x in ratios) + " |")
        out.append("|---|---|" + "---|" * len(ratios))
        keys = sorted(dict.fromkeys((r["budget"], r["merge"]) for r in mine), key=lambda k: (k[0] != reference, k))
        for budget, merge in keys:
            cells = []
            for x in ratios:
                r = next((r for r in mine if (r["budget"], r["merge"], r["ratio"]) == (budget, merge, x)), None)
                if r is None:
                    cells.append("")
                elif r["lift"] is None:
                    cells.append(f"{r['score']:.1f}")
                else:
                    lift = f"{r['lift']:+.1f} [{r['lift_low']:+.1f}, {r['lift_high']:+.1f}]"
                    if r["lift_low"] > 0 or r["lift_high"] < 0:
                        lift = f"**{lift}**"
                    cells.append(f"{r['score']:.1f} ({lift})")
            out.append(f"| {budget} | {merge} | " + " | ".join(cells) + " |")
        out.append("")
    if not out:
        return "no scorer has a complete cell"
    return f"Over complete cells; in parentheses the paired lift over {reference}, {level:.0%} interval.\n\n" + "\n".join(out)

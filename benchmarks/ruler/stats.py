"""Intervals for RULER scores: a percentile bootstrap of core5 over haystack families, and the paired lift
of one setting over another.

A core5 score over families is the mean, over the (task, family) cells, of each cell's mean sample score
(every family ran the same five tasks, so this is also the mean over families of each family's core5).
The bootstrap resamples the samples within each cell, never across cells: a cell is a fixed part of the
design (five tasks, each family), only its samples are drawn at random.

Two settings compared on one run saw the same samples (same seed, same indices), so their difference is
bootstrapped paired: one resampling of the sample indices serves both settings, which removes the
between-sample variance the two share (a hard sample is hard for both).

Pure functions of the records (dicts as ``report.load_records`` returns them); deterministic given the seed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence

# numpy comes with transformers (a dependency); pure Python would take minutes for a table of intervals.
import numpy as np

# The five tasks the uncompressed SmolLM2-135M-Instruct can do at 4k (it scores 0-36 on the seven
# others): the reference library's averages are over these.
CORE_TASKS = ("niah_single_1", "niah_single_2", "niah_multikey_1", "niah_multivalue", "niah_multiquery")
# The haystack family of records written before the runner recorded one: the default assignment.
DEFAULT_HAYSTACK = "ruler"

__all__ = ["CORE_TASKS", "DEFAULT_HAYSTACK", "bootstrap_ci", "core5_ci", "families", "haystack", "paired_lift",
           "score_cells"]


def haystack(record: Mapping) -> str:
    """The record's haystack family; older records have none and used the default assignment."""
    return record.get("haystack", DEFAULT_HAYSTACK)


def families(records: Iterable[Mapping]) -> tuple[str, ...]:
    """The haystack families present in ``records``, sorted."""
    return tuple(sorted({haystack(r) for r in records}))


def bootstrap_ci(
    values_by_group: Mapping[Hashable, Sequence[float]], n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """``(estimate, low, high)``: the mean of the group means and its percentile bootstrap interval.

    Each resample draws, within every group independently, as many values as the group has (with
    replacement), and takes the mean of the group means again; ``low`` and ``high`` are the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of ``n_boot`` such means. A group of one
    value, or of equal values, adds no width.

    The interval is widened to contain the estimate if it does not: a very skewed bootstrap distribution
    (or float rounding, when every resample equals the estimate) can put the estimate a hair outside,
    and the tables print ``estimate [low, high]``.
    """
    if not values_by_group:
        raise ValueError("bootstrap_ci needs at least one group")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    total = np.zeros(n_boot)
    estimate = 0.0
    # A fixed group order, so the same seed draws the same resamples whatever order the mapping came in.
    for key in sorted(values_by_group, key=repr):
        values = np.asarray(values_by_group[key], dtype=float)
        if values.size == 0:
            raise ValueError(f"group {key!r} has no values")
        estimate += values.mean()
        picks = rng.integers(0, values.size, size=(n_boot, values.size))
        total += values[picks].mean(axis=1)
    groups = len(values_by_group)
    estimate /= groups
    low, high = np.quantile(total / groups, [(1 - level) / 2, (1 + level) / 2])
    return float(estimate), float(min(low, estimate)), float(max(high, estimate))


def score_cells(
    records: Iterable[Mapping], setting: str, protocol: str | None = None, tasks: Sequence[str] = CORE_TASKS
) -> dict[tuple[str, str], dict[int, float]]:
    """``{(task, family): {sample index: score}}`` of one setting (and protocol, when given) on ``tasks``."""
    cells: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    wanted = set(tasks)
    for r in records:
        if r["setting"] == setting and r["task"] in wanted and (protocol is None or r["protocol"] == protocol):
            cells[(r["task"], haystack(r))][r["index"]] = float(r["score"])
    return dict(cells)


def _require_cells(cells: Mapping[tuple[str, str], Sequence[float]], tasks: Sequence[str], fams: Sequence[str],
                   what: str) -> None:
    """Raise a ValueError naming the (task, family) cells of ``tasks`` x ``fams`` that have no value."""
    missing = [(t, f) for f in fams for t in tasks if not cells.get((t, f))]
    if missing:
        shown = ", ".join(f"{t} on {f}" for t, f in missing[:4]) + (" ..." if len(missing) > 4 else "")
        raise ValueError(f"{what} has no samples for {len(missing)} (task, family) cell(s): {shown}")


def core5_ci(
    records: Iterable[Mapping],
    setting: str,
    protocol: str | None = None,
    tasks: Sequence[str] = CORE_TASKS,
    haystacks: Sequence[str] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float, int]:
    """``(score, low, high, n)``: core5 of one setting over the families, the mean over the (task, family)
    cells of ``tasks`` x ``haystacks`` (default: every family in ``records``), with its bootstrap interval;
    ``n`` samples. A cell with no sample raises a ValueError."""
    records = list(records)
    fams = tuple(haystacks) if haystacks is not None else families(records)
    cells = {cell: [by_index[i] for i in sorted(by_index)]
             for cell, by_index in score_cells(records, setting, protocol, tasks).items() if cell[1] in fams}
    _require_cells(cells, tasks, fams, setting)
    score, low, high = bootstrap_ci(cells, n_boot=n_boot, seed=seed, level=level)
    return score, low, high, sum(len(v) for v in cells.values())


def paired_lift(
    records: Iterable[Mapping],
    setting_a: str,
    setting_b: str,
    protocol: str | None = None,
    tasks: Sequence[str] = CORE_TASKS,
    haystacks: Sequence[str] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float, int]:
    """``(lift, low, high, n)``: core5 of ``setting_a`` minus core5 of ``setting_b``, both the mean over
    the (task, family) cells of ``tasks`` x ``haystacks``, with a paired percentile bootstrap interval.

    Only samples both settings ran (same task, family, index and protocol) count; ``n`` is their number.
    Within each cell the per-sample differences are resampled (``bootstrap_ci``), so both settings see
    the same resampled indices. ``haystacks`` defaults to every family in ``records``: pass the run's
    families when ``records`` holds only some of it. A cell with no paired sample raises a ValueError,
    since a mean over fewer cells would not be core5 over the families.
    """
    records = list(records)
    fams = tuple(haystacks) if haystacks is not None else families(records)
    a = score_cells(records, setting_a, protocol, tasks)
    b = score_cells(records, setting_b, protocol, tasks)
    diffs = {
        cell: [a[cell][i] - b[cell][i] for i in sorted(a[cell].keys() & b.get(cell, {}).keys())]
        for cell in a
        if cell[1] in fams
    }
    _require_cells(diffs, tasks, fams, f"{setting_a} paired with {setting_b}")
    lift, low, high = bootstrap_ci(diffs, n_boot=n_boot, seed=seed, level=level)
    return lift, low, high, sum(len(d) for d in diffs.values())

"""Summaries, tables and plots of a RULER run folder: summary.csv, accuracy_vs_ratio.png, budget_profile.png,
lift_by_scorer.png.

    python -m benchmarks.ruler.report results/ruler-4k [--task core5] [--plot-top 8]
    python -m benchmarks.ruler.report results/ruler-4k --no-plots --lift [--reference uniform] --families

accuracy_vs_ratio.png draws one line per (scorer, budget, merge) setting and, per protocol, only the
--plot-top best by mean score over the ratios they ran (0: all); summary.csv always lists every setting.

Records carry a haystack family (records of older runs have none: family "ruler"). summary.csv has a row
per (protocol, setting, family, task), with each family's avg and core5, and, when several families ran,
haystack "all" rows: the mean over the families, for the settings that ran on every one of them. The
plots and --table show the "all" rows (or the single family's). --lift compares each budget with the
--reference budget of the same scorer, ratio and merge (core5 over the families, paired bootstrap
interval), --families shows core5 per family per ratio.
"""

from __future__ import annotations

import csv
import gzip
import json
from collections import defaultdict
from pathlib import Path

from benchmarks.ruler.stats import CORE_TASKS, DEFAULT_HAYSTACK, core5_ci, families, haystack, paired_lift

__all__ = ["ALL_HAYSTACKS", "CORE_TASKS", "DEFAULT_HAYSTACK", "format_families", "format_lift", "format_table",
           "headline_rows", "lift_rows", "load_records", "plot_accuracy", "plot_budgets", "plot_lift",
           "rank_settings", "summarize", "write_lift", "write_report", "write_summary"]

# The haystack name of summary rows that average every family.
ALL_HAYSTACKS = "all"


def load_records(out_dir: Path) -> list[dict]:
    """All sample records of every rank, one per (task, haystack, index, protocol, setting), in a fixed
    order; the ranks' ``samples.rank*.jsonl`` and, in stored results, their merge ``samples.jsonl.gz``.
    A record without a haystack (older runs) gets the default family, ``DEFAULT_HAYSTACK``."""
    records: dict[tuple, dict] = {}
    paths = sorted(out_dir.glob("samples.rank*.jsonl")) + sorted(out_dir.glob("samples.jsonl.gz"))
    for path in paths:
        text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
        for line in text.splitlines():
            if line.strip():
                r = json.loads(line)
                r.setdefault("haystack", DEFAULT_HAYSTACK)
                records[(r["task"], r["haystack"], r["index"], r["protocol"], r["setting"])] = r
    return [records[k] for k in sorted(records)]


def _row_haystack(row: dict) -> str:
    """A summary row's family; rows built by hand (tests, older callers) may have none."""
    return row.get("haystack", DEFAULT_HAYSTACK)


def summarize(records: list[dict]) -> list[dict]:
    """One row per (protocol, setting, haystack, task) with the mean score, plus per family 'avg' (over
    the tasks run) and 'core5' (only for settings that ran all five CORE_TASKS on that family) rows.

    When more than one family ran, haystack "all" rows follow: per (protocol, setting) that ran on every
    family in ``records``, each task every family ran (the mean of the family means), 'avg' when every
    family ran the same tasks, and 'core5' when every family has a core5; ``n`` is then the number of
    families. A single-family run gets no "all" rows (they would repeat its own)."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    meta: dict[str, dict] = {}
    for r in records:
        groups[(r["protocol"], r["setting"], haystack(r), r["task"])].append(r["score"])
        meta[r["setting"]] = {k: r[k] for k in ("scorer", "budget", "ratio", "merge")}
    rows = []
    # Unrounded means, so the "all" rows average the families' exact scores, not the printed ones.
    per_setting: dict[tuple, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for (protocol, setting, hay, task), scores in sorted(groups.items()):
        mean = sum(scores) / len(scores)
        per_setting[(protocol, setting)][hay][task] = mean
        rows.append({"protocol": protocol, "haystack": hay, **meta[setting], "task": task, "score": round(mean, 2),
                     "n": len(scores)})
    core5: dict[tuple, dict[str, float]] = defaultdict(dict)
    for (protocol, setting), by_hay in sorted(per_setting.items()):
        for hay, by_task in sorted(by_hay.items()):
            row = {"protocol": protocol, "haystack": hay, **meta[setting]}
            rows.append({**row, "task": "avg", "score": round(_mean(by_task.values()), 2), "n": len(by_task)})
            core = [by_task[t] for t in CORE_TASKS if t in by_task]
            if len(core) == len(CORE_TASKS):  # an average over fewer tasks would not be comparable
                core5[(protocol, setting)][hay] = _mean(core)
                rows.append({**row, "task": "core5", "score": round(_mean(core), 2), "n": len(core)})
    fams = families(records)
    if len(fams) < 2:
        return rows
    for (protocol, setting), by_hay in sorted(per_setting.items()):
        if set(by_hay) != set(fams):  # a mean over some families only would not be comparable
            continue
        row = {"protocol": protocol, "haystack": ALL_HAYSTACKS, **meta[setting]}
        tasks = [set(by_task) for by_task in by_hay.values()]
        for task in sorted(set.intersection(*tasks)):
            rows.append({**row, "task": task, "score": round(_mean(by_hay[h][task] for h in fams), 2), "n": len(fams)})
        if all(t == tasks[0] for t in tasks):
            avg = _mean(_mean(by_hay[h].values()) for h in fams)
            rows.append({**row, "task": "avg", "score": round(avg, 2), "n": len(fams)})
        if len(core5[(protocol, setting)]) == len(fams):
            rows.append({**row, "task": "core5", "score": round(_mean(core5[(protocol, setting)].values()), 2),
                         "n": len(fams)})
    return rows


def headline_rows(rows: list[dict]) -> list[dict]:
    """The rows one-number views show (plots, --table, pick): the "all" rows when the summary averages
    several families, else its single family's rows (all of them for an old, single-family run). With
    several families but no setting run on all of them, the first family's, so nothing is mixed."""
    hays = {_row_haystack(r) for r in rows}
    if len(hays) <= 1:
        return rows
    shown = ALL_HAYSTACKS if ALL_HAYSTACKS in hays else min(hays)
    return [r for r in rows if _row_haystack(r) == shown]


def _haystack_note(rows: list[dict]) -> str:
    """Words for a title: which families the headline rows stand for ("" for an old single-family run)."""
    hays = sorted({_row_haystack(r) for r in rows} - {ALL_HAYSTACKS})
    shown = {_row_haystack(r) for r in headline_rows(rows)}
    if shown == {ALL_HAYSTACKS}:
        return f"mean over the {len(hays)} haystack families {', '.join(hays)}"
    if shown == {DEFAULT_HAYSTACK}:
        return ""
    return f"haystack {', '.join(sorted(shown))} only" + (f" of {', '.join(hays)}" if len(hays) > 1 else "")


def write_summary(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        fields = ["protocol", "haystack", "scorer", "budget", "merge", "ratio", "task", "score", "n"]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


MERGE_STYLES = {"off": ("-", "o"), "cosine": ("--", "s"), "cosine+mass": (":", "^")}
_EXTRA_MERGE_STYLES = [("-.", "D"), ((0, (5, 1, 1, 1, 1, 1)), "v"), ((0, (1, 3)), "P")]


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def rank_settings(rows: list[dict], protocol: str, task: str = "core5") -> list[tuple[tuple, dict[float, float]]]:
    """The compressed settings ``(scorer, budget, merge)`` of one protocol with their ``task`` score per
    ratio, best first by the mean score over the ratios each setting ran (ties by name)."""
    lines: dict[tuple, dict[float, float]] = defaultdict(dict)
    for r in rows:
        if r["protocol"] == protocol and r["task"] == task and r["scorer"] != "none":
            lines[(r["scorer"], r["budget"], r["merge"])][r["ratio"]] = r["score"]
    return sorted(lines.items(), key=lambda kv: (-_mean(kv[1].values()), kv[0]))


def _panel_task(rows: list[dict], protocol: str, task: str) -> str:
    """``task``, or ``avg`` when ``task`` is ``core5`` and no compressed setting of ``protocol`` has a
    core5 score (fewer than the five core tasks ran)."""
    if task == "core5" and not any(r["protocol"] == protocol and r["task"] == "core5" and r["scorer"] != "none" for r in rows):
        return "avg"
    return task


def plot_accuracy(rows: list[dict], path: Path, task: str = "core5", top: int | None = 8) -> dict[str, dict]:
    """Accuracy vs ratio, one panel per protocol, one line per (scorer, budget, merge) setting.

    Only the ``top`` settings of each panel with the best mean score over the ratios they ran are drawn
    (all of them when ``top`` is None or 0), plus the uncompressed reference. Colour = (scorer, budget),
    the same in every panel; line style and marker = merge mode, so the merge modes of one setting share
    a colour. Each panel has its own legend, best line first.

    A panel never comes out blank: when ``task`` is ``core5`` and no setting of a protocol ran all five
    core tasks (a smoke run, or a sweep of some tasks only), that panel plots ``avg``, the average
    of the tasks each setting ran, and its title names them.

    Returns, per protocol, the panel's title, the task it plotted (``task`` or ``avg``), its drawn
    lines (label, colour, linestyle, marker, x, y, read back from the axes) and its legend labels.

    With several haystack families it plots the "all" rows (``headline_rows``) and the titles say so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    note = _haystack_note(rows)
    rows = headline_rows(rows)
    protocols = sorted({r["protocol"] for r in rows})
    plotted = {protocol: _panel_task(rows, protocol, task) for protocol in protocols}
    ranked = {protocol: rank_settings(rows, protocol, plotted[protocol]) for protocol in protocols}
    shown = {protocol: lines[:top] if top else lines for protocol, lines in ranked.items()}
    # Colours by (scorer, budget) in order of first appearance (panel by panel, best first).
    pairs: list[tuple] = []
    for lines in shown.values():
        for key, _ in lines:
            if key[:2] not in pairs:
                pairs.append(key[:2])
    # tab10 without its grey (too close to the black reference), then the light tab20 shades, then tab20b.
    palette = [to_hex(c) for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 7]
    palette += [to_hex(c) for i, c in enumerate(plt.get_cmap("tab20").colors) if i % 2 and i != 15]
    palette += [to_hex(c) for c in plt.get_cmap("tab20b").colors]
    colors = {pair: palette[i % len(palette)] for i, pair in enumerate(pairs)}
    merges = sorted({key[2] for lines in shown.values() for key, _ in lines} - set(MERGE_STYLES))
    merge_styles = {**MERGE_STYLES, **{m: _EXTRA_MERGE_STYLES[i % len(_EXTRA_MERGE_STYLES)] for i, m in enumerate(merges)}}

    longest = max((len(lines) for lines in shown.values()), default=0)
    fig, axes = plt.subplots(1, len(protocols), figsize=(6.5 * len(protocols), 5.0 + 0.22 * longest), squeeze=False, sharey=True)
    drawn: dict[str, dict] = {}
    for ax, protocol in zip(axes[0], protocols):
        shown_task = plotted[protocol]
        base = [r["score"] for r in rows if r["protocol"] == protocol and r["task"] == shown_task and r["scorer"] == "none"]
        if base:
            ax.axhline(base[0], color="black", lw=1.2, label=f"no compression ({base[0]:.1f})")
        for (scorer, budget, merge), by_ratio in shown[protocol]:
            xs, ys = zip(*sorted(by_ratio.items()))
            linestyle, marker = merge_styles[merge]
            ax.plot(xs, ys, linestyle=linestyle, marker=marker, ms=5, lw=1.6, color=colors[(scorer, budget)],
                    label=f"{scorer} / {budget} / merge {merge} (mean {_mean(ys):.1f})")
        n_all, n_shown = len(ranked[protocol]), len(shown[protocol])
        which = f"top {n_shown} of {n_all} settings by mean score" if n_shown < n_all else f"all {n_all} settings"
        if shown_task == task:
            ax.set_title(f"{protocol}: {task} average ({which})", fontsize=10)
        else:
            ran = sorted({r["task"] for r in rows if r["protocol"] == protocol} - {"avg", "core5"})
            ax.set_title(f"{protocol}: average of the {len(ran)} task{'s' if len(ran) != 1 else ''} that ran, fewer than the {len(CORE_TASKS)} core tasks\n"
                         f"({', '.join(ran)}; {which})", fontsize=10)
        if note:
            ax.set_title(f"{ax.get_title()}\n{note}", fontsize=10)
        ax.set_xlabel("compression ratio (fraction removed)")
        ax.grid(alpha=0.3)
        legend = ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=1, frameon=False,
                           title="scorer / budget / merge (mean score over the ratios it ran)\n"
                                 "colour = scorer + budget; line style + marker = merge mode",
                           title_fontsize=7.5)
        drawn[protocol] = {
            "title": ax.get_title(),
            "task": shown_task,
            "lines": [{"label": ln.get_label(), "color": to_hex(ln.get_color()), "linestyle": ln.get_linestyle(),
                       "marker": ln.get_marker(), "x": list(ln.get_xdata()), "y": list(ln.get_ydata())} for ln in ax.get_lines()],
            "legend": [t.get_text() for t in legend.get_texts()],
        }
    axes[0][0].set_ylabel("score (x100)")
    if top:
        kinds = set(plotted.values())
        what = task if kinds == {task} else "average of the tasks that ran" if kinds == {"avg"} else f"{task} or, where it did not run, the average of the tasks that ran"
        fig.suptitle(f"RULER {what}: per protocol, the top {top} settings by mean score over the ratios they ran "
                     "(summary.csv has all)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return drawn


def plot_budgets(out_dir: Path, path: Path) -> bool:
    """Mean per-layer budget (fraction of the average) for each budget rule, one scorer, one ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profiles: dict[tuple, list[list[float]]] = defaultdict(list)
    for p in sorted(out_dir.glob("budgets.rank*.jsonl")):
        for line in p.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                scorer, budget, ratio, _ = r["setting"].split("|")
                profiles[(r["protocol"], scorer, budget, ratio)].append(r["budgets"])
    if not profiles:
        return False
    # Prefer ratio 0.75: at small ratios the cap (a layer cannot keep more than T) flattens the profile.
    keys = sorted(profiles, key=lambda k: (k[3] != "0.75", k))
    protocol, scorer, _, ratio = keys[0]
    fig, ax = plt.subplots(figsize=(7, 4))
    for (pr, sc, budget, ra), runs in sorted(profiles.items()):
        if (pr, sc, ra) != (protocol, scorer, ratio):
            continue
        layers = len(runs[0])
        mean = [sum(run[i] for run in runs) / len(runs) for i in range(layers)]
        avg = sum(mean) / layers
        ax.plot(range(layers), [m / avg for m in mean], marker="o", ms=3, label=budget)
    ax.set_xlabel("layer")
    ax.set_ylabel("budget / average budget")
    ax.set_title(f"per-layer budgets ({protocol}, {scorer}, ratio {ratio})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True


def write_report(out_dir: Path, plots: bool = True, task: str = "core5", plot_top: int | None = 8,
                 reference: str = "uniform", records: list[dict] | None = None) -> list[dict]:
    """Write summary.csv (every setting) and, with ``plots``, the figures; accuracy_vs_ratio.png
    shows ``task`` and only the ``plot_top`` best settings per protocol (all when None or 0).
    lift_by_scorer.png (each budget's core5 lift over ``reference``) comes when more than one budget ran
    and some setting has its reference on every core task and family. ``records``: ``load_records(out_dir)``
    when already loaded."""
    records = load_records(out_dir) if records is None else records
    rows = summarize(records)
    write_summary(rows, out_dir / "summary.csv")
    if plots and rows:
        plot_accuracy(rows, out_dir / "accuracy_vs_ratio.png", task=task, top=plot_top)
        plot_budgets(out_dir, out_dir / "budget_profile.png")
        if len({r["budget"] for r in records if r["scorer"] != "none"}) > 1:
            lift = lift_rows(records, reference)
            if lift:
                plot_lift(lift, out_dir / "lift_by_scorer.png")
    return rows


def format_table(rows: list[dict], task: str = "core5", protocol: str | None = None) -> str:
    """A markdown table of ``task`` scores (``core5``, ``avg`` or a task name): one line per
    (protocol, scorer, budget, merge), one column per ratio, best first by the mean over ratios.
    The uncompressed baseline's score is shown in every ratio column of its line. With several haystack
    families the scores are the "all" rows (``headline_rows``), and the heading says so."""
    note = _haystack_note(rows)
    rows = headline_rows(rows)
    sel = [r for r in rows if r["task"] == task and (protocol is None or r["protocol"] == protocol)]
    ratios = sorted({r["ratio"] for r in sel if r["scorer"] != "none"})
    lines: dict[tuple, dict[float, float]] = defaultdict(dict)
    for r in sel:
        lines[(r["protocol"], r["scorer"], r["budget"], r["merge"])][r["ratio"]] = r["score"]
    def value(key):
        if key[1] == "none":
            return float("inf")
        got = [lines[key][x] for x in ratios if x in lines[key]]
        return sum(got) / len(got) if got else -1.0
    out = [f"{task}: " + ("all protocols" if protocol is None else protocol) + (f", {note}" if note else ""),
           "| protocol | scorer | budget | merge | " + " | ".join(f"{x:g}" for x in ratios) + " |",
           "|---|---|---|---|" + "---|" * len(ratios)]
    for key in sorted(lines, key=lambda k: (k[0], -value(k), k)):
        scores = lines[key]
        cells = [f"{scores[0.0]:.1f}" if key[1] == "none" else (f"{scores[x]:.1f}" if x in scores else "") for x in ratios]
        out.append("| " + " | ".join(str(k) for k in key) + " | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _setting_label(scorer: str, budget: str | None, merge: str) -> str:
    """``scorer / budget``, with the merge mode only when it is not "off" (the tables stay narrow)."""
    label = scorer if budget is None else f"{scorer} / {budget}"
    return label if merge == "off" else f"{label} / merge {merge}"


def _interval(value: float, low: float, high: float, sign: bool = False) -> str:
    return f"{value:+.1f} [{low:.1f}, {high:.1f}]" if sign else f"{value:.1f} [{low:.1f}, {high:.1f}]"


def lift_rows(records: list[dict], reference: str = "uniform", tasks: tuple[str, ...] = CORE_TASKS,
              n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> list[dict]:
    """One row per compressed (protocol, scorer, budget, ratio, merge) whose budget is not ``reference``:
    its core5 (mean over every family in ``records``) minus that of the same scorer, ratio and merge with
    the ``reference`` budget, with the paired bootstrap interval (``stats.paired_lift``).

    Settings without their reference, or without a paired sample on some (core task, family) cell, get
    no row: a lift over fewer cells would not be core5 over the families. ``excludes_zero`` is taken on
    the unrounded interval; the other numbers are rounded to 2 decimals."""
    fams = families(records)
    by_setting: dict[tuple[str, str], list[dict]] = defaultdict(list)
    meta: dict[str, tuple] = {}
    for r in records:
        if r["scorer"] != "none":
            by_setting[(r["protocol"], r["setting"])].append(r)
            meta[r["setting"]] = (r["scorer"], r["budget"], r["ratio"], r["merge"])
    base = {}  # (protocol, scorer, ratio, merge) -> the reference budget's setting
    for protocol, setting in by_setting:
        scorer, budget, ratio, merge = meta[setting]
        if budget == reference:
            base[(protocol, scorer, ratio, merge)] = setting
    rows = []
    for (protocol, setting), mine in by_setting.items():
        scorer, budget, ratio, merge = meta[setting]
        ref = base.get((protocol, scorer, ratio, merge))
        if budget == reference or ref is None:
            continue
        try:
            # Only the two settings' records: paired_lift then scans a few thousand records, not the run.
            lift, low, high, n = paired_lift(mine + by_setting[(protocol, ref)], setting, ref, protocol, tasks, fams,
                                             n_boot=n_boot, seed=seed, level=level)
        except ValueError:
            continue
        rows.append({"protocol": protocol, "scorer": scorer, "budget": budget, "merge": merge, "ratio": ratio,
                     "reference": reference, "lift": round(lift, 2), "low": round(low, 2), "high": round(high, 2),
                     "excludes_zero": low > 0 or high < 0, "n": n, "families": " ".join(fams)})
    return sorted(rows, key=lambda r: (r["protocol"], r["scorer"], r["budget"], r["merge"], r["ratio"]))


def format_lift(rows: list[dict], level: float = 0.95) -> str:
    """Markdown tables of ``lift_rows``, one per protocol: a line per scorer (and merge mode, when not
    off), a column per (budget, ratio), cells ``lift [low, high]`` in points, in bold when the interval
    excludes 0."""
    out = []
    for protocol in sorted({r["protocol"] for r in rows}):
        sel = [r for r in rows if r["protocol"] == protocol]
        fams = sel[0]["families"].split()
        columns = sorted({(r["budget"], r["ratio"]) for r in sel})
        cells: dict[str, dict[tuple, str]] = defaultdict(dict)
        for r in sel:
            cell = _interval(r["lift"], r["low"], r["high"], sign=True)
            cells[_setting_label(r["scorer"], None, r["merge"])][(r["budget"], r["ratio"])] = (
                f"**{cell}**" if r["excludes_zero"] else cell)
        over = f"the mean over {len(fams)} haystack families" if len(fams) > 1 else f"haystack {fams[0]}"
        if out:
            out.append("")
        out += [(f"{protocol}: core5 lift over {sel[0]['reference']} (same scorer, ratio, merge), points, {over}; "
                 f"{level:.0%} paired bootstrap interval; bold: it excludes 0"),
                "| scorer | " + " | ".join(f"{b} {x:g}" for b, x in columns) + " |",
                "|---|" + "---|" * len(columns)]
        out += [f"| {label} | " + " | ".join(by.get(c, "") for c in columns) + " |"
                for label, by in sorted(cells.items())]
    return "\n".join(out)


def write_lift(rows: list[dict], out_dir: Path, level: float = 0.95) -> str:
    """lift.csv (every ``lift_rows`` row) and lift.md (``format_lift``) in ``out_dir``; returns the markdown."""
    fields = ["protocol", "scorer", "budget", "merge", "ratio", "reference", "lift", "low", "high", "excludes_zero",
              "n", "families"]
    with open(out_dir / "lift.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    text = format_lift(rows, level)
    (out_dir / "lift.md").write_text(text + "\n")
    return text


def format_families(records: list[dict], rows: list[dict] | None = None, n_boot: int = 2000, seed: int = 0,
                    level: float = 0.95) -> str:
    """Markdown tables of core5 per haystack family, one per (protocol, ratio): a line per setting
    (scorer / budget, the uncompressed baseline on top, then best first by "all"), a column per family,
    then "all" (mean over the families, with its bootstrap interval) and "min" (the worst family).
    "all" and "min" stay empty for a setting that did not run every core task on every family.
    ``rows``: ``summarize(records)`` when already computed."""
    rows = summarize(records) if rows is None else rows
    fams = families(records)
    core: dict[tuple, dict[str, float]] = defaultdict(dict)  # (protocol, scorer, budget, merge, ratio) -> family
    setting_of: dict[tuple, str] = {}
    by_setting: dict[tuple[str, str], list[dict]] = defaultdict(list)  # each interval scans its setting only
    for r in records:
        setting_of[(r["protocol"], r["scorer"], r["budget"], r["merge"], r["ratio"])] = r["setting"]
        by_setting[(r["protocol"], r["setting"])].append(r)
    for r in rows:
        if r["task"] == "core5" and _row_haystack(r) != ALL_HAYSTACKS:
            core[(r["protocol"], r["scorer"], r["budget"], r["merge"], r["ratio"])][_row_haystack(r)] = r["score"]
    out = []
    for protocol in sorted({k[0] for k in core}):
        ratios = sorted({k[4] for k in core if k[0] == protocol and k[1] != "none"})
        for ratio in ratios:
            lines = []
            for key, by_family in core.items():
                if key[0] != protocol or (key[4] != ratio and key[1] != "none"):
                    continue
                complete = len(by_family) == len(fams)
                if complete:
                    setting = setting_of[key]
                    score, low, high, _ = core5_ci(by_setting[(protocol, setting)], setting, protocol, haystacks=fams,
                                                   n_boot=n_boot, seed=seed, level=level)
                    worst = min(fams, key=lambda f: (by_family[f], f))
                    tail = [_interval(score, low, high), f"{by_family[worst]:.1f} {worst}"]
                else:
                    score, tail = float("-inf"), ["", ""]  # listed last
                label = "uncompressed" if key[1] == "none" else _setting_label(key[1], key[2], key[3])
                cells = [f"{by_family[f]:.1f}" if f in by_family else "" for f in fams]
                lines.append(((key[1] != "none", -score, label), f"| {label} | " + " | ".join(cells + tail) + " |"))
            if out:
                out.append("")
            out += [(f"{protocol}, ratio {ratio:g}: core5 per haystack family; all = mean over the families "
                     f"[{level:.0%} bootstrap interval]; min = the worst family"),
                    "| setting | " + " | ".join(fams) + " | all | min |",
                    "|---|" + "---|" * (len(fams) + 2)]
            out += [line for _, line in sorted(lines)]
    return "\n".join(out)


def plot_lift(rows: list[dict], path: Path, level: float = 0.95) -> dict[str, dict]:
    """Bars of ``lift_rows``: a panel per (protocol, ratio), a group of bars per scorer, a bar per budget
    (and merge mode, when not off) with its interval as error bar, a star over bars whose interval
    excludes 0. Returns, per panel ("protocol ratio"), its title and bars (series, scorer, height read
    back from the axes, low, high)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols = sorted({r["protocol"] for r in rows})
    ratios = sorted({r["ratio"] for r in rows})
    series = sorted({(r["budget"], r["merge"]) for r in rows})
    scorers = sorted({r["scorer"] for r in rows})
    colors = plt.get_cmap("tab10").colors
    width = 0.8 / len(series)
    panel_width = max(4.0, 0.45 * len(scorers) * len(series) + 1.5)  # room for every bar of a panel
    fig, axes = plt.subplots(len(protocols), len(ratios), squeeze=False, sharey=True,
                             figsize=(panel_width * len(ratios), 4.2 * len(protocols) + 0.8))
    by_key = {(r["protocol"], r["ratio"], r["budget"], r["merge"], r["scorer"]): r for r in rows}
    drawn: dict[str, dict] = {}
    for row_axes, protocol in zip(axes, protocols):
        for ax, ratio in zip(row_axes, ratios):
            bars = []
            for j, (budget, merge) in enumerate(series):
                got = [(i, by_key[(protocol, ratio, budget, merge, s)]) for i, s in enumerate(scorers)
                       if (protocol, ratio, budget, merge, s) in by_key]
                if not got:
                    continue
                xs = [i - 0.4 + width * (j + 0.5) for i, _ in got]
                lifts = [r["lift"] for _, r in got]
                errors = [[r["lift"] - r["low"] for _, r in got], [r["high"] - r["lift"] for _, r in got]]
                container = ax.bar(xs, lifts, width, yerr=errors, capsize=2.5, color=colors[j % len(colors)],
                                   error_kw={"lw": 0.9}, label=_setting_label(budget, None, merge))
                for x, patch, (_, r) in zip(xs, container.patches, got):
                    if r["excludes_zero"]:  # the star sits past the end of the error bar, away from zero
                        up = r["lift"] >= 0
                        ax.annotate("*", (x, r["high"] if up else r["low"]), xytext=(0, 6 if up else -9),
                                    textcoords="offset points", ha="center", va="center", fontsize=11)
                    bars.append({"series": _setting_label(budget, None, merge), "scorer": r["scorer"],
                                 "height": patch.get_height(), "low": r["low"], "high": r["high"]})
            ax.axhline(0, color="black", lw=0.8)
            ax.margins(y=0.12)  # room for the stars
            ax.set_xticks(range(len(scorers)), scorers, rotation=30, ha="right", fontsize=8)
            ax.set_title(f"{protocol}, ratio {ratio:g}", fontsize=10)
            ax.grid(axis="y", alpha=0.3)
            drawn[f"{protocol} {ratio:g}"] = {"title": ax.get_title(), "bars": bars}
        row_axes[0].set_ylabel(f"core5 lift over {rows[0]['reference']} (points)")
    fams = rows[0]["families"].split()
    over = f"mean over {len(fams)} haystack families" if len(fams) > 1 else f"haystack {fams[0]}"
    fig.suptitle(f"core5 lift of each budget over {rows[0]['reference']} (same scorer, ratio, merge; {over})\n"
                 f"error bars: {level:.0%} paired bootstrap interval; *: it excludes 0", fontsize=10)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes.flat:  # a panel may miss a series: collect the legend from all of them
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 6), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 0.93), title="budget", title_fontsize=8)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return drawn


def write_complete(records: list[dict], out_dir: Path, reference: str = "uniform", n_boot: int = 2000, seed: int = 0,
                   level: float = 0.95) -> str:
    """``complete.csv`` (``complete.complete_rows`` of every protocol) and its markdown tables."""
    from .complete import complete_rows, format_complete

    protocols = sorted({r["protocol"] for r in records})
    rows = [row for p in protocols for row in complete_rows(records, p, reference, n_boot, seed, level)]
    if rows:
        with open(out_dir / "complete.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return format_complete(rows, reference, level)


def main(argv: list[str] | None = None) -> None:
    import argparse

    from benchmarks.cli import HelpFormatter

    p = argparse.ArgumentParser(prog="python -m benchmarks.ruler.report", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("out", type=Path, help="a run folder (its samples.rank*.jsonl); summary.csv and the plots go there")
    p.add_argument("--table", action="store_true", help="print the score table (after writing summary.csv)")
    p.add_argument("--task", default="core5", help="core5 (only settings that ran all five core tasks), avg, or a task")
    p.add_argument("--no-plots", action="store_true", help="write summary.csv only, no PNG plots")
    p.add_argument("--plot-top", type=int, default=8, metavar="N",
                   help="accuracy_vs_ratio.png draws, per protocol, only the N settings with the best mean score over "
                        "the ratios they ran (0: all); summary.csv always has all")
    p.add_argument("--lift", action="store_true",
                   help="print each budget's core5 lift over --reference with paired bootstrap intervals, one table "
                        "per protocol; also written to lift.csv and lift.md")
    p.add_argument("--reference", default="uniform", help="the budget --lift and lift_by_scorer.png compare with")
    p.add_argument("--families", action="store_true",
                   help="print core5 per haystack family, one table per protocol and ratio, with the mean over the "
                        "families (bootstrap interval) and the worst family")
    p.add_argument("--complete-cells", action="store_true",
                   help="for a run cut short: per scorer, its budgets over the (task, family) cells where all of its "
                        "settings finished, with the paired lift over --reference (benchmarks.ruler.complete); also "
                        "written to complete.csv")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples for --lift and --families")
    p.add_argument("--boot-seed", type=int, default=0, help="seed of the bootstrap resampling")
    p.add_argument("--level", type=float, default=0.95, help="coverage of the intervals")
    args = p.parse_args(argv)
    if args.plot_top < 0:
        p.error("--plot-top must be >= 0")
    if args.n_boot < 1 or not 0 < args.level < 1:
        p.error("--n-boot must be >= 1 and --level in (0, 1)")
    records = load_records(args.out)
    rows = write_report(args.out, plots=not args.no_plots, task=args.task, plot_top=args.plot_top,
                        reference=args.reference, records=records)
    boot = {"n_boot": args.n_boot, "seed": args.boot_seed, "level": args.level}
    printed = []
    if args.table:
        printed.append(format_table(rows, args.task))
    if args.lift:
        lift = lift_rows(records, args.reference, **boot)
        if not lift:
            p.error(f"no setting has a {args.reference!r} reference run on every core task and haystack family")
        printed.append(write_lift(lift, args.out, args.level))
    if args.families:
        printed.append(format_families(records, rows, **boot))
    if args.complete_cells:
        printed.append(write_complete(records, args.out, args.reference, **boot))
    if printed:
        print("\n\n".join(printed))


if __name__ == "__main__":
    main()

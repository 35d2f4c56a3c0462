"""Summaries and plots of a RULER run folder: summary.csv, accuracy_vs_ratio.png, budget_profile.png.

    python -m benchmarks.ruler.report results/ruler-4k [--task core5] [--plot-top 8]

accuracy_vs_ratio.png draws one line per (scorer, budget, merge) setting and, per protocol, only the
--plot-top best by mean score over the ratios they ran (0: all); summary.csv always lists every setting.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

# The five tasks the uncompressed SmolLM2-135M-Instruct can do at 4k (it scores 0-36 on the seven
# others): the reference library's averages are over these.
CORE_TASKS = ("niah_single_1", "niah_single_2", "niah_multikey_1", "niah_multivalue", "niah_multiquery")


def load_records(out_dir: Path) -> list[dict]:
    """All sample records of every rank, one per (task, index, protocol, setting), in a fixed order."""
    records: dict[tuple, dict] = {}
    for path in sorted(out_dir.glob("samples.rank*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                records[(r["task"], r["index"], r["protocol"], r["setting"])] = r
    return [records[k] for k in sorted(records)]


def summarize(records: list[dict]) -> list[dict]:
    """One row per (protocol, setting, task) with the mean score, plus 'avg' (over the tasks run) and
    'core5' (only for settings that ran all five CORE_TASKS) rows."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    meta: dict[str, dict] = {}
    for r in records:
        groups[(r["protocol"], r["setting"], r["task"])].append(r["score"])
        meta[r["setting"]] = {k: r[k] for k in ("scorer", "budget", "ratio", "merge")}
    rows = []
    per_setting: dict[tuple, dict[str, float]] = defaultdict(dict)
    for (protocol, setting, task), scores in sorted(groups.items()):
        mean = sum(scores) / len(scores)
        per_setting[(protocol, setting)][task] = mean
        rows.append({"protocol": protocol, **meta[setting], "task": task, "score": round(mean, 2), "n": len(scores)})
    for (protocol, setting), by_task in sorted(per_setting.items()):
        rows.append({"protocol": protocol, **meta[setting], "task": "avg", "score": round(sum(by_task.values()) / len(by_task), 2), "n": len(by_task)})
        core = [by_task[t] for t in CORE_TASKS if t in by_task]
        if len(core) == len(CORE_TASKS):  # an average over fewer tasks would not be comparable
            rows.append({"protocol": protocol, **meta[setting], "task": "core5", "score": round(sum(core) / len(core), 2), "n": len(core)})
    return rows


def write_summary(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["protocol", "scorer", "budget", "merge", "ratio", "task", "score", "n"])
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
    lines (label, colour, linestyle, marker, x, y, read back from the axes) and its legend labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

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


def write_report(out_dir: Path, plots: bool = True, task: str = "core5", plot_top: int | None = 8) -> list[dict]:
    """Write summary.csv (every setting) and, with ``plots``, the two figures; accuracy_vs_ratio.png
    shows ``task`` and only the ``plot_top`` best settings per protocol (all when None or 0)."""
    rows = summarize(load_records(out_dir))
    write_summary(rows, out_dir / "summary.csv")
    if plots and rows:
        plot_accuracy(rows, out_dir / "accuracy_vs_ratio.png", task=task, top=plot_top)
        plot_budgets(out_dir, out_dir / "budget_profile.png")
    return rows


def format_table(rows: list[dict], task: str = "core5", protocol: str | None = None) -> str:
    """A markdown table of ``task`` scores (``core5``, ``avg`` or a task name): one line per
    (protocol, scorer, budget, merge), one column per ratio, best first by the mean over ratios.
    The uncompressed baseline's score is shown in every ratio column of its line."""
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
    out = [f"{task}: " + ("all protocols" if protocol is None else protocol),
           "| protocol | scorer | budget | merge | " + " | ".join(f"{x:g}" for x in ratios) + " |",
           "|---|---|---|---|" + "---|" * len(ratios)]
    for key in sorted(lines, key=lambda k: (k[0], -value(k), k)):
        scores = lines[key]
        cells = [f"{scores[0.0]:.1f}" if key[1] == "none" else (f"{scores[x]:.1f}" if x in scores else "") for x in ratios]
        out.append("| " + " | ".join(str(k) for k in key) + " | " + " | ".join(cells) + " |")
    return "\n".join(out)


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
    args = p.parse_args(argv)
    if args.plot_top < 0:
        p.error("--plot-top must be >= 0")
    rows = write_report(args.out, plots=not args.no_plots, task=args.task, plot_top=args.plot_top)
    if args.table:
        print(format_table(rows, args.task))


if __name__ == "__main__":
    main()

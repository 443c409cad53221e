"""Readable evaluation report: a markdown table of main scores and a PNG bar chart, next to the results.

Input is the scores table of `evaluation.evaluate` (rows: tasks plus "mean", and the means of the tasks
like and unlike the training seeds when there are both; columns: models, e.g.
base vs trained or pooling variants). The best score of each row is in bold.

    mgh-ray report runs/tiny/evaluate/scores.csv    # rewrites report.md / scores.png beside it
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pandas as pd

from mgh_ray.layout import PLOT_FILE, RunLayout

log = logging.getLogger(__name__)

# rows of the scores table beside "mean": the tasks shaped like the training seeds, and the rest
MEAN_LIKE, MEAN_UNLIKE = "mean: like the seeds", "mean: unlike the seeds"
# the project's evaluation tasks (tasks.py builds them; named here, where importing costs nothing)
TASK_NAMES = ("BBCHeadlineRetrieval", "MovieDialogReranking", "LeeSTS", "TRECCoarseClassification",
              "ReutersR8Clustering", "SDGPairClassification")


def _cell(value: float, best: bool, floatfmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    text = format(value, floatfmt)
    return f"**{text}**" if best else text


def markdown_table(table: pd.DataFrame, metrics: dict[str, str] | None = None, floatfmt: str = ".4f") -> str:
    """GitHub markdown for a task x model table; `metrics` adds a column naming each task's main score."""
    cols = [str(c) for c in table.columns]
    head = ["task"] + (["metric"] if metrics else []) + cols
    rule = ["---"] * (len(head) - len(cols)) + ["---:"] * len(cols)  # numbers right-aligned
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(rule) + "|"]
    for task, row in table.iterrows():
        values = [float(v) for v in row.tolist()]
        finite = [v for v in values if not math.isnan(v)]
        top = max(finite) if len(finite) > 1 else None
        cells = [_cell(v, top is not None and v == top, floatfmt) for v in values]
        label = f"**{task}**" if str(task).startswith("mean") else str(task)
        extra = [metrics.get(str(task), "")] if metrics else []
        lines.append("| " + " | ".join([label, *extra, *cells]) + " |")
    return "\n".join(lines)


def bar_chart(table: pd.DataFrame, path: Path, title: str = "MTEB main score per task") -> Path:
    """Grouped bars: one group per row (task, then mean), one bar per model."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    import numpy as np

    rows, models = list(table.index), list(table.columns)
    x = np.arange(len(rows))
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows) + 2), 4.2))
    for i, model in enumerate(models):
        values = table[model].astype(float).fillna(0.0).to_numpy()
        bars = ax.bar(x + (i - (len(models) - 1) / 2) * width, values, width, label=str(model))
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.set_xticks(x, [str(r) for r in rows], rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("main score")
    ax.set_ylim(0, max(1.0, float(np.nanmax(table.to_numpy(dtype=float))) * 1.1) if len(rows) else 1.0)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def interval_markdown(intervals: pd.DataFrame, rows: list[str], floatfmt: str = ".4f") -> str:
    """GitHub markdown of 95% intervals (long table: model, row, point, low, high): one column per model,
    cells "point [low, high]", rows in `rows` order."""
    if intervals.empty:
        return ""
    cell = intervals.assign(text=[f"{p:{floatfmt}} [{lo:{floatfmt}}, {hi:{floatfmt}}]" for p, lo, hi in
                                  zip(intervals.point, intervals.low, intervals.high)])
    wide = cell.pivot(index="row", columns="model", values="text")
    wide = wide.reindex([r for r in rows if r in wide.index])[list(dict.fromkeys(intervals.model))]
    wide.index.name = "task"
    return wide.fillna("-").to_markdown()


def write(table: pd.DataFrame, out_dir: Path, metrics: dict[str, str] | None = None,
          note: str = "", intervals: pd.DataFrame | None = None, n_boot: int = 0) -> tuple[Path, Path]:
    """Write `out_dir/report.md` and `out_dir/scores.png`; returns both paths. `intervals`: the 95%
    bootstrap intervals (`evaluation.interval_table`), shown as a second table."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = bar_chart(table, Path(RunLayout.plot(out_dir)))
    ivs = "" if intervals is None else interval_markdown(intervals, [str(r) for r in table.index])
    text = ["# Evaluation", "", note, "", markdown_table(table, metrics), "",
            *([f"95% bootstrap intervals ({n_boot} resamples of each task's rows; a mean's replicate is the "
               "mean of its tasks' replicates):", "", ivs, ""] if ivs else []),
            "Scores are mteb main scores on our offline tasks (see mgh_ray/tasks.py); they compare our own "
            "runs, not the public MTEB leaderboard. Per-task details: `results/`.", "",
            f"![scores]({PLOT_FILE})", ""]
    md = Path(RunLayout.report(out_dir))
    md.write_text("\n".join(line for line in text if line is not None))
    log.info("report written: %s, %s", md, png)
    return md, png


def ablation_chart(table: pd.DataFrame, title: str, path: Path) -> Path:
    """Bar chart of an ablation table's means per row, with the unlike mean's 95% bootstrap interval (or
    the spread over seeds) as error bars."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # the mean over all tasks, and over the tasks unlike the seeds when the table has them
    bars = [("mean", "std_over_seeds", "all tasks", "#4C72B0")]
    if MEAN_UNLIKE in table:
        bars.append((MEAN_UNLIKE, "std_unlike_over_seeds", "tasks unlike the seeds", "#DD8452"))
    x, width = np.arange(len(table)), 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(table)), 3.5))
    for i, (col, std, label, color) in enumerate(bars):
        err = table[std].fillna(0.0).to_numpy(dtype=float)
        if col == MEAN_UNLIKE and "unlike 95% CI" in table:  # the bootstrap interval, more telling than
            bounds = np.array([[float(v) for v in str(ci).strip("[]").split(",")] if ci else [np.nan, np.nan]
                               for ci in table["unlike 95% CI"].fillna("")])  # one seed's zero spread
            err = np.nan_to_num(np.abs(np.stack([table[col] - bounds[:, 0], bounds[:, 1] - table[col]])))
            label += " (95% bootstrap interval)"
        ax.bar(x + (i - (len(bars) - 1) / 2) * width, table[col], width, yerr=err, capsize=3, color=color,
               label=label)
    ax.set_ylabel("mean main score")
    ax.set_title(title)
    values = table[[c for c, *_ in bars]].to_numpy(dtype=float)
    ax.set_ylim(max(0.0, float(np.nanmin(values)) - 0.12), float(np.nanmax(values)) + 0.1)
    ax.set_xticks(x, [str(i) for i in table.index], rotation=30, ha="right")
    if len(bars) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

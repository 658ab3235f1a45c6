"""Reports shared by every ``zhtune eval`` command, ``zhtune eval compare`` and ``zhtune experiment``.

Every eval command writes ``RUN/eval/<metric>.json`` with at least the keys

    {"metric": str, "overall": float, "scores": {column: float | null}, "counts": {column: int}}

(columns are classes, subjects or categories), usually with a markdown section
``RUN/eval/<metric>.md`` beside it. This module reads those reports back, renders markdown
tables and grouped bar charts (the same code for ``compare`` and ``experiment``), and gathers the
sections of a run into ``RUN/eval/report.md``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from zhtune.errors import ZhtuneError
from zhtune.plots import pyplot
from zhtune.rundir import eval_dir, write_text_atomic

REPORT_MD = "report.md"
"""The run's combined report: every ``<metric>.md`` section of its eval directory."""
SECTION_ORDER = ("judge", "exam", "gen", "exact_match")
"""Known metrics first, in this order; others follow alphabetically."""


# --------------------------------------------------------------------------------------------
# Reading reports
# --------------------------------------------------------------------------------------------
def is_report(data: Any) -> bool:
    """Whether ``data`` has the shape of an eval report: a dict ``scores`` and a number
    ``overall`` (null where nothing could be scored, e.g. a judge whose replies held no score)."""
    return (
        isinstance(data, dict)
        and "overall" in data
        and (data["overall"] is None or isinstance(data["overall"], (int, float)))
        and isinstance(data.get("scores"), dict)
    )


def read_report(path: str | Path) -> dict[str, Any] | None:
    """The report in ``path``, or None when the file is not one (settings, other json).

    ``metric`` defaults to the file's stem (``exact_match.json`` from ``zhtune experiment`` has
    none); ``counts`` defaults to an empty mapping. An unreadable file is an error naming it.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ZhtuneError(f"{path}: not a readable JSON report ({e})") from None
    if not is_report(data):
        return None
    data.setdefault("metric", path.stem)
    data.setdefault("counts", {})
    return data


def read_run_reports(run: str | Path) -> dict[str, dict[str, Any]]:
    """Every report of a run, keyed by metric name (the file stem), in :data:`SECTION_ORDER`."""
    folder = eval_dir(run)
    reports = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        report = read_report(path)
        if report is not None:
            reports[path.stem] = report
    return {name: reports[name] for name in order_metrics(reports)}


def order_metrics(names: Any) -> list[str]:
    """Metric names with the known ones first (:data:`SECTION_ORDER`), the rest alphabetically."""
    names = list(dict.fromkeys(names))
    known = [n for n in SECTION_ORDER if n in names]
    return known + sorted(n for n in names if n not in SECTION_ORDER)


def run_labels(paths: list[str | Path]) -> list[str]:
    """A short unique label per run directory: its name, with parent folders added (``a/run``,
    ``b/run``) only where names repeat."""
    parts = [Path(os.path.abspath(p)).parts for p in paths]
    depth = [1] * len(paths)
    while True:
        labels = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
        clash = {lab for lab in labels if labels.count(lab) > 1}
        grow = [i for i, lab in enumerate(labels) if lab in clash and depth[i] < len(parts[i])]
        if not grow:
            return labels
        for i in grow:
            depth[i] += 1


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------
def fmt_value(value: float | None, fmt: str = "{:.3f}") -> str:
    """``value`` written with ``fmt``, or an en dash for a missing value (None or NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return fmt.format(value)


def markdown_table(head: list[str], rows: list[list[Any]], align: list[str] | None = None) -> str:
    """A markdown table. ``align`` holds ``---`` (left) or ``---:`` (right) per column; by default
    the first column is left-aligned and the others right-aligned (numbers)."""
    align = align or ["---"] + ["---:"] * (len(head) - 1)
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_run_report(folder: str | Path) -> Path:
    """Gather the ``<metric>.md`` sections of an eval directory (those with a ``<metric>.json``
    report beside them) into ``report.md``; returns its path. Each eval command calls this after
    writing its own section, so ``report.md`` always shows every metric of the run."""
    folder = Path(folder)
    names = [
        p.stem for p in folder.glob("*.md") if p.name != REPORT_MD and (folder / f"{p.stem}.json").exists()
    ]
    sections = [(folder / f"{n}.md").read_text(encoding="utf-8").strip() for n in order_metrics(names)]
    path = folder / REPORT_MD
    write_text_atomic(path, "\n\n".join(sections) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# Charts
# --------------------------------------------------------------------------------------------
def plot_bars(
    labels: list[str],
    series: dict[str, list[float | None]],
    xlabel: str,
    out_png: str | Path,
    fmt: str = "{:.4f}",
    xmax: float | None = None,
    title: str = "",
) -> None:
    """Horizontal grouped bars: one group per label (top to bottom in order), one bar per
    series, each bar labelled with its value written with ``fmt`` (a missing value: an en dash
    and no bar). Written as a PNG with matplotlib's Agg backend (no display needed)."""

    plt = pyplot()
    n = max(len(series), 1)
    height = 0.8 / n
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.28 * len(labels) * max(n, 2)), dpi=100)
    for j, (name, values) in enumerate(series.items()):
        ys = [i + (j - (n - 1) / 2) * height for i in range(len(labels))]
        bars = ax.barh(ys, [v if v is not None else 0.0 for v in values], height=height, label=name)
        ax.bar_label(bars, labels=[fmt_value(v, fmt) for v in values], padding=2, fontsize="x-small")
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_xlim(0, 1.12 * (xmax if xmax is not None else ax.get_xlim()[1]))  # room for the labels
    if "%" in fmt:
        from matplotlib.ticker import PercentFormatter

        ax.xaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    if title:
        ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    if n > 1:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)


__all__ = [
    "fmt_value",
    "is_report",
    "markdown_table",
    "order_metrics",
    "plot_bars",
    "read_report",
    "read_run_reports",
    "run_labels",
    "write_run_report",
]

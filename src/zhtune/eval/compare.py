"""``zhtune eval compare RUN1 RUN2 ...``: runs side by side, like Table 5 of the BELLE paper.

For each metric (``judge``, ``exam``, ``gen``, ``exact_match``, or any other ``RUN/eval/*.json``
report), one markdown table, rows = runs and columns = classes / subjects then the overall score
(for the judge also ``score_w/o_others``), printed and written to ``DIR/compare.md``, plus a
grouped bar chart ``DIR/compare_<metric>.png`` (a group per column, a bar per run). Runs without
a report are listed under the table, never a crash. ``zhtune experiment`` draws its tables and
charts with the same helpers (:mod:`zhtune.eval.report`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zhtune.errors import ZhtuneError
from zhtune.eval.report import (
    fmt_value,
    markdown_table,
    order_metrics,
    plot_bars,
    read_run_reports,
    run_labels,
)
from zhtune.rundir import eval_dir, write_text_atomic


@dataclass(frozen=True)
class View:
    """How one metric's reports become table columns."""

    columns: str = "scores"
    """The report key whose mapping gives the columns (falls back to ``scores``)."""
    overall: str = "overall"
    """The heading of the overall column."""
    extra: tuple[str, ...] = ()
    """Further top-level numbers shown after the overall one."""
    fmt: str = "{:.3f}"
    max_value: float | None = 1.0


VIEWS: dict[str, View] = {
    "judge": View(overall="score", extra=("score_w/o_others",)),
    "exam": View(columns="categories", fmt="{:.1%}"),
    "exact_match": View(fmt="{:.1%}"),
}
"""Per-metric views; any other metric uses ``View()``."""


def columns_of(report: dict[str, Any], view: View) -> dict[str, Any]:
    cols = report.get(view.columns)
    return cols if isinstance(cols, dict) and cols else report["scores"]


@dataclass
class MetricTable:
    """One metric across runs: the table's header and rows, and the runs without a report."""

    metric: str
    head: list[str]
    labels: list[str]
    """Runs with a report, in the order given."""
    values: list[list[float | None]]
    """One row per labelled run, one value per column after the first."""
    missing: list[str]
    view: View

    def markdown(self) -> str:
        rows = [
            [lab, *(fmt_value(v, self.view.fmt) for v in vals)] for lab, vals in zip(self.labels, self.values)
        ]
        text = f"## {self.metric}\n\n" + markdown_table(["run", *self.head], rows)
        if self.missing:
            text += f"\n\nNo {self.metric} report: " + ", ".join(self.missing) + "."
        return text


def metric_table(metric: str, labels: list[str], reports: list[dict[str, dict[str, Any]]]) -> MetricTable:
    """The table of ``metric`` over runs (``reports[i]`` holds run i's reports by metric)."""
    view = VIEWS.get(metric, View())
    have = [(lab, r[metric]) for lab, r in zip(labels, reports) if metric in r]
    cols: list[str] = []
    for _, report in have:
        cols += [c for c in columns_of(report, view) if c not in cols]
    extra = [k for k in view.extra if any(k in rep for _, rep in have)]
    values = [
        [columns_of(rep, view).get(c) for c in cols] + [rep.get("overall")] + [rep.get(k) for k in extra]
        for _, rep in have
    ]
    missing = [lab for lab, r in zip(labels, reports) if metric not in r]
    return MetricTable(metric, [*cols, view.overall, *extra], [lab for lab, _ in have], values, missing, view)


def compare(runs: list[str], metric: str = "", output: str = "compare") -> str:
    """``zhtune eval compare``: write ``compare.md``, ``compare.json`` and a chart per metric to
    ``output``; returns the markdown (also printed by the CLI)."""
    if not runs:
        raise ZhtuneError("give at least one run directory")
    labels = run_labels(runs)
    reports = [read_run_reports(r) for r in runs]
    metrics = [metric] if metric else order_metrics(m for r in reports for m in r)
    nothing = [
        f"{lab} ({eval_dir(run)}{'' if Path(run).is_dir() else ': no such directory'})"
        for lab, run, r in zip(labels, runs, reports)
        if not r
    ]
    if not metrics:
        raise ZhtuneError(
            "no eval reports in any run: " + ", ".join(nothing) + " (run `zhtune eval ...` first)"
        )
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    sections, charts, data = [], [], {}
    for name in metrics:
        table = metric_table(name, labels, reports)
        if not table.labels:
            sections.append(f"## {name}\n\nNo run has a {name} report.")
            continue
        png = out / f"compare_{name}.png"
        series = {lab: vals for lab, vals in zip(table.labels, table.values)}
        plot_bars(
            table.head, series, name, png, table.view.fmt, table.view.max_value, title=f"{name} per run"
        )
        sections.append(table.markdown() + f"\n\n![{name}]({png.name})")
        charts.append(png)
        data[name] = {
            "columns": table.head,
            "runs": {lab: dict(zip(table.head, vals)) for lab, vals in zip(table.labels, table.values)},
            "missing": table.missing,
        }
    runs_line = ", ".join(f"{lab} = {run}" for lab, run in zip(labels, runs))
    text = f"# Comparison\n\nRuns: {runs_line}.\n\n" + "\n\n".join(sections) + "\n"
    write_text_atomic(out / "compare.md", text)
    write_text_atomic(out / "compare.json", json.dumps(data, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {out / 'compare.md'}, {out / 'compare.json'} and {len(charts)} chart(s)", file=sys.stderr)
    return text


__all__ = ["VIEWS", "MetricTable", "View", "compare", "metric_table"]

"""Loss charts of run directories, and the one switch of matplotlib to its file-only backend."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any


@cache
def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (PNG files, no display needed), imported once."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curves(
    ax: Any, log: list[dict[str, Any]], label: str, val_label: str | None, val_style: str, color: Any = None
) -> None:
    """``log``'s train loss as a line and its validation loss (where logged) as dots."""
    train = [(r["step"], r["loss"]) for r in log if "loss" in r]
    val = [(r["step"], r["eval_loss"]) for r in log if "eval_loss" in r]
    if train:
        ax.plot(*zip(*train), color=color, label=label)
    if val:
        ax.plot(*zip(*val), val_style, color=color, markersize=4, label=val_label)


def _save(fig: Any, ax: Any, out_png: Path, title: str, legend_size: str = "medium") -> None:
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(out_png)
    pyplot().close(fig)


def plot_loss(log: list[dict[str, Any]], out_png: Path, title: str = "") -> None:
    """One run's train loss (and validation loss where logged) against step, as a PNG."""
    fig, ax = pyplot().subplots(figsize=(7, 4), dpi=100)
    _curves(ax, log, "train loss", "validation loss", "o-")
    _save(fig, ax, out_png, title)


def plot_loss_curves(logs: dict[str, list[dict[str, Any]]], out_png: Path) -> None:
    """Train loss of several runs (label -> log rows) overlaid, validation loss dashed in the
    same colour."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    colors = plt.get_cmap("tab10" if len(logs) <= 10 else "tab20")
    for i, (label, log) in enumerate(logs.items()):
        _curves(ax, log, label, None, "o--", color=colors(i % colors.N))
    _save(fig, ax, out_png, "train loss per run (validation loss: dots, dashed)", legend_size="small")

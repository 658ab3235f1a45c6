"""``zhtune quickstart`` and ``zhtune experiment``: the pipelines' subcommands, registered here."""

from __future__ import annotations

import argparse
from typing import Any

from zhtune.flags import add_options, options_from
from zhtune.pipelines.quickstart import QuickstartOptions


def cmd_quickstart(args: argparse.Namespace) -> int:
    from zhtune.pipelines.quickstart import run_quickstart

    run_quickstart(options_from(QuickstartOptions, args))
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from zhtune.pipelines.experiment import load_experiment, run_experiment

    cfg = load_experiment(args.grid, list(args.overrides))
    run_experiment(cfg, source=args.grid, progress=args.progress)
    return 0


def _experiment_epilog() -> str:
    from zhtune.config import config_help
    from zhtune.pipelines.experiment import EvalConfig, ExperimentConfig

    return (
        "grid keys (YAML or key=value):\n"
        + config_help(ExperimentConfig)
        + "\n\neval keys (under eval:, or eval.KEY=value):\n"
        + config_help(EvalConfig)
    )


def register_quickstart(sub: Any, full_help_for: str | None = None) -> None:
    """Add ``zhtune quickstart`` to the top-level subparsers ``sub``."""
    q = sub.add_parser(
        "quickstart",
        help="the whole loop on a CPU with no downloads (a few minutes)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_options(q, QuickstartOptions)
    q.set_defaults(func=cmd_quickstart)


def register_experiment(sub: Any, full_help_for: str | None = None) -> None:
    """Add ``zhtune experiment`` to the top-level subparsers ``sub``."""
    e = sub.add_parser(
        "experiment",
        help="a grid of train+eval runs -> one comparison table and charts",
        description="zhtune experiment GRID.yaml [key=value ...]: train every combination of the grid's axes "
        "(finished runs are skipped, interrupted ones resumed), score each one, and write results.md, "
        "results.json, loss_curves.png and metric.png. Dotted keys reach into sections: "
        "overrides.max_steps=50, eval.max_new_tokens=8, eval.judge.model=NAME.",
        epilog=_experiment_epilog()
        if full_help_for == "experiment"
        else "run `zhtune experiment --help` for every grid key",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument("grid", help="grid YAML file (see src/zhtune/configs/experiments/)")
    e.add_argument("overrides", nargs="*", help="key=value overrides of the grid, e.g. output_dir=runs/exp2")
    e.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show progress bars")
    e.set_defaults(func=cmd_experiment)

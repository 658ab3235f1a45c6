"""``zhtune train``: registered by the training stage. Its settings are :class:`TrainConfig` keys
(YAML plus ``key=value``), listed in ``zhtune train --help``."""

from __future__ import annotations

import argparse
from typing import Any


def cmd_train(args: argparse.Namespace) -> int:
    from zhtune.config import load_config
    from zhtune.train.config import TrainConfig
    from zhtune.train.sft import train

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:  # no YAML file, only key=value pairs
        config, overrides = None, [config, *overrides]
    train(load_config(TrainConfig, config, overrides), progress=args.progress)
    return 0


def _epilog() -> str:
    from zhtune.config import config_help
    from zhtune.train.config import TrainConfig

    return "config keys (YAML or key=value):\n" + config_help(TrainConfig)


def register(sub: Any, full_help_for: str | None = None) -> None:
    """Add ``zhtune train`` to the top-level subparsers ``sub`` (its config keys are listed only
    when ``full_help_for`` is ``train``: building them loads the config module)."""
    t = sub.add_parser(
        "train",
        help="fine-tune a model from a YAML config plus key=value overrides",
        description="zhtune train CONFIG.yaml [key=value ...]   (or only key=value pairs)",
        epilog=_epilog() if full_help_for == "train" else "run `zhtune train --help` for every config key",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("config", nargs="?", help="YAML config file")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lr=1e-4 method=lora")
    t.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
    t.set_defaults(func=cmd_train)

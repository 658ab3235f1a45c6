"""Experiment tracking (``report_to``): accelerate's trackers, fed what ``trainer_log.jsonl`` holds.

The tracker names are accelerate's; each needs its own package (nothing is installed with
zhtune). A tracker that is named but not installed is a config error here, since accelerate
itself would drop it silently. At start the resolved config goes to each tracker as its
hyper-parameters; every logged row's numbers follow at its step.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from zhtune.errors import ZhtuneError

#: ``report_to`` name -> the package it needs (what ``pip install`` takes).
TRACKER_PACKAGES: dict[str, str] = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "swanlab": "swanlab",
}


def check_trackers(names: list[str]) -> None:
    """Every named tracker is known and its package importable."""
    for name in names:
        if name not in TRACKER_PACKAGES:
            raise ZhtuneError(
                f"config key 'report_to': unknown tracker {name!r} (choose from {', '.join(TRACKER_PACKAGES)}, none)"
            )
        package = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            raise ZhtuneError(f"config key 'report_to': {name} needs its package: pip install {package}")


def hyperparameters(config: dict[str, Any]) -> dict[str, Any]:
    """A config as tracker hyper-parameters: scalars kept, lists joined with commas."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        out[key] = value if isinstance(value, (bool, int, float, str)) or value is None else str(value)
    return out


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a ``trainer_log.jsonl`` row (``step`` is passed apart), under ``train/``
    and ``eval/`` names as dashboards group them."""
    out = {}
    for key, value in row.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"] = float(value)
    return out

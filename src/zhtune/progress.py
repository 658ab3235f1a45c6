"""The progress bar every long command shows, with one throttling policy."""

from __future__ import annotations

import sys
from typing import Any


def progress_bar(desc: str, enabled: bool = True, **kwargs: Any) -> Any:
    """A tqdm bar on stderr named ``desc`` (``total``, ``initial``, ``unit``... as tqdm takes
    them), hidden unless ``enabled``. On a terminal it redraws at most twice a second; written to
    a log file it adds a line only every 15 s, not one per step."""
    from tqdm import tqdm

    return tqdm(
        desc=desc,
        file=sys.stderr,
        disable=not enabled,
        mininterval=0.5 if sys.stderr.isatty() else 15.0,
        **kwargs,
    )

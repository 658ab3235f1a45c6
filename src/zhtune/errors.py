"""User-facing errors: the CLI prints these as one clear message and exits non-zero."""

from __future__ import annotations


class ZhtuneError(Exception):
    """An error in the user's input (a file, a record, a config key) that the user can fix.

    The CLI prints ``str(err)`` without a traceback and exits with status 1.
    """


def where(path: str | None = None, line: int | None = None, field: str | None = None) -> str:
    """Format a location as ``path:line: field 'x'`` (parts that are None are left out)."""
    parts = []
    if path is not None:
        parts.append(f"{path}:{line}" if line is not None else str(path))
    if field is not None:
        parts.append(f"field '{field}'")
    return ": ".join(parts)

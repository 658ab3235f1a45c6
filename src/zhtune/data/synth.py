"""What ``zhtune data generate`` and ``zhtune data evolve`` share: the endpoint options, the
prompt assets, and append-only JSON Lines files that a re-run reads back to resume.

Both commands ask a teacher model (any OpenAI-compatible endpoint, through
:class:`zhtune.llm.client.ChatClient`) and write what they keep to ``OUT.jsonl`` and what they
drop to ``OUT.rejects.jsonl`` *as it arrives*, one flushed line at a time. Replies are cached in
``OUT.cache.sqlite``, so a run killed at any point and started again re-reads the replies it had
already paid for and sends only new requests.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import IO, Any

from zhtune.errors import ZhtuneError, where
from zhtune.flags import flag
from zhtune.llm.options import EndpointOptions

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "assets" / "prompts"


@dataclass
class TeacherOptions:
    """The teacher model and how to ask it (shared by generate and evolve)."""

    endpoint: EndpointOptions = flag(default_factory=EndpointOptions)
    """Where the teacher is and how to talk to it (flags --base-url, --model, --api-key, ...)."""
    temperature: float = 1.0
    """Sampling temperature of the teacher."""
    seed: int = 0
    """Seed of every random choice (and of the request's own `seed`), so a re-run asks the same."""
    cache: bool = True
    """Cache replies in OUT.cache.sqlite, so a re-run pays nothing twice."""
    progress: bool = True
    """Show a progress bar."""

    def client(self, output: str | Path) -> Any:
        """A :class:`~zhtune.llm.client.ChatClient` for the teacher, caching next to ``output``."""
        return self.endpoint.client(sidecar(output, ".cache.sqlite") if self.cache else None)


@dataclass(frozen=True)
class Rule:
    """One keep/reject rule of a generator: its name (in the rejects file and the summary), the
    stage it applies at (evolve checks instructions before asking for the answer, answers after;
    generate has one stage), and its check, which returns the reason to reject or None."""

    name: str
    check: Callable[..., str | None]
    stage: str = ""


def first_rejection(rules: Iterable[Rule], *args: Any, stage: str = "") -> tuple[str, str] | None:
    """``(rule name, reason)`` of the first rule of ``stage`` whose check rejects ``args``, or None."""
    for rule in rules:
        if rule.stage == stage and (reason := rule.check(*args)):
            return rule.name, reason
    return None


@cache
def load_prompts(name: str) -> dict[str, Any]:
    """The prompt asset ``assets/prompts/NAME.yaml`` (language -> prompt texts and word lists)."""
    import yaml

    with open(PROMPTS_DIR / f"{name}.yaml", encoding="utf-8") as f:
        return yaml.safe_load(f)


def sidecar(output: str | Path, suffix: str) -> str:
    """``out.jsonl`` -> ``out{suffix}`` (``.rejects.jsonl``, ``.cache.sqlite``)."""
    return str(Path(output).with_suffix(suffix))


def read_appended(path: str | Path) -> list[dict[str, Any]]:
    """Every row of an append-only JSON Lines file (none if it does not exist).

    A last line without its newline is what a killed run leaves: it is completed if it holds a
    whole row, else cut off (its work is done again, from the cache). Any other unreadable line is
    an error naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        try:
            json.loads(data[cut:])
            with path.open("ab") as f:
                f.write(b"\n")
        except ValueError:
            with path.open("r+b") as f:
                f.truncate(cut)
            data = data[:cut]
            print(f"{path}: removed an incomplete last line (an interrupted run)", file=sys.stderr)
    rows = []
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            raise ZhtuneError(
                f"{where(str(path), lineno)}: not a JSON object. This file is appended to and read back to "
                "resume: fix that line or choose another -o"
            )
        rows.append(row)
    return rows


class Appender:
    """Append JSON rows to a file, one flushed line each (opened lazily, closed with ``close``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.count = 0
        self._file: IO[str] | None = None

    def write(self, row: dict[str, Any]) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._file.flush()
        self.count += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def contains_any(text: str, words: list[str]) -> str | None:
    """The first of ``words`` found in ``text`` (case-insensitive), else None."""
    low = text.lower()
    return next((w for w in words if w.lower() in low), None)


def format_reasons(counts: Counter[str], limit: int = 5) -> str:
    """``duplicate 130, length 5`` — the most common reasons first."""
    return ", ".join(f"{name} {n:,}" for name, n in counts.most_common(limit)) or "none"


@dataclass
class StopGuard:
    """When a synthesis run stops short, keeping what it has (``--patience``, ``--max-requests``).

    A teacher that only returns duplicates, refusals or garbage would otherwise be paid forever:
    after ``patience`` endpoint requests in a row that kept nothing the run stops, naming the main
    reasons. ``allow`` counts requests against ``max_requests`` (0: no limit); a command that
    numbers its requests across runs (generate) limits the numbers itself and calls ``exhausted``.
    """

    patience: int
    max_requests: int = 0
    sent: int = 0
    """Requests counted by ``allow`` (this run)."""
    idle: int = 0
    """Requests since the last one that kept something."""
    reasons: Counter[str] = field(default_factory=Counter)
    """Why the idle requests kept nothing."""
    stop: str | None = None
    """Why the run stops (None: it goes on)."""

    def allow(self) -> bool:
        """Whether one more request may be sent (it is counted); False once stopped or at the limit."""
        if self.stop is None and self.max_requests and self.sent >= self.max_requests:
            self.exhausted()
        if self.stop is not None:
            return False
        self.sent += 1
        return True

    def record(self, requests: int, kept: int, reasons: Iterable[str] | Counter[str] = ()) -> None:
        """``requests`` finished and kept ``kept`` items; the rejects' reasons (filter or rule names)."""
        if kept:
            self.idle = 0
            self.reasons.clear()
            return
        self.idle += requests
        self.reasons.update(reasons)
        if self.idle >= self.patience and self.stop is None:
            self.stop = f"no progress: the last {self.idle} requests kept nothing (rejected: {format_reasons(self.reasons)})"

    def exhausted(self) -> None:
        """Stop because ``--max-requests`` is used up (unless already stopped)."""
        if self.stop is None:
            self.stop = f"reached --max-requests {self.max_requests}"


__all__ = [
    "Appender",
    "Rule",
    "TeacherOptions",
    "StopGuard",
    "contains_any",
    "first_rejection",
    "format_reasons",
    "load_prompts",
    "read_appended",
    "sidecar",
]

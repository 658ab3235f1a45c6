"""``zhtune data stats``: how big and how long a dataset is, per field, in chars and tokens.

Streams any supported input through :func:`~zhtune.data.convert.iter_conversations` (leniently:
records without an assistant turn still count) and keeps one compact integer array per field,
never the records. Fields:

- ``system``: the system message of each record that has one;
- ``prompt``: each user turn; ``response``: each assistant turn;
- ``conversation``: each record, all messages together.

Token counts (with ``--tokenizer DIR``) come from batch-encoding each message without special
tokens; a conversation's tokens are the sum of its messages' (template tokens not included).
``rounds`` is the number of assistant turns per record.
"""

from __future__ import annotations

import json
import sys
from array import array
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from zhtune.data.convert import iter_conversations
from zhtune.models.loading import load_tokenizer as load
from zhtune.plots import pyplot

FIELDS = ("system", "prompt", "response", "conversation")
FIELD_OF_ROLE = {"system": "system", "user": "prompt", "assistant": "response"}
PERCENTILES = (25, 50, 75, 90)
#: Records per tokenizer batch.
TOKEN_BATCH = 256


def load_tokenizer(path: str) -> Any:
    """A Hugging Face tokenizer from a local directory (never the network), for counting only:
    its length limit is lifted so long records do not trigger warnings meant for models."""

    tokenizer = load(path)
    tokenizer.model_max_length = sys.maxsize
    return tokenizer


def describe(values: array | np.ndarray) -> dict[str, Any]:
    """count, mean, std, min, p25, p50, p75, p90, max of a sequence of lengths (None when empty)."""
    a = np.asarray(values, dtype=np.int64)
    if a.size == 0:
        return {
            "count": 0,
            "mean": None,
            "std": None,
            "min": None,
            **{f"p{p}": None for p in PERCENTILES},
            "max": None,
        }
    pct = np.percentile(a, PERCENTILES)
    return {
        "count": int(a.size),
        "mean": float(a.mean()),
        "std": float(a.std()),
        "min": int(a.min()),
        **{f"p{p}": float(v) for p, v in zip(PERCENTILES, pct)},
        "max": int(a.max()),
    }


class _Lengths:
    """Per-field length arrays for one unit (chars or tokens)."""

    def __init__(self) -> None:
        self.by_field = {f: array("l") for f in FIELDS}

    def add(self, messages: list[dict[str, str]], lengths: list[int]) -> None:
        for m, n in zip(messages, lengths):
            self.by_field[FIELD_OF_ROLE[m["role"]]].append(n)
        self.by_field["conversation"].append(sum(lengths))


class _Collector:
    """Accumulates lengths, rounds and languages record by record; tokenizes in batches."""

    def __init__(self, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer
        self.chars = _Lengths()
        self.tokens = _Lengths() if tokenizer is not None else None
        self.rounds = array("l")
        self.langs: Counter[str] = Counter()
        self._pending: list[list[dict[str, str]]] = []

    def add(self, record: dict[str, Any]) -> None:
        messages = record["messages"]
        self.rounds.append(sum(m["role"] == "assistant" for m in messages))
        self.langs[record["meta"].get("lang", "unknown")] += 1
        self.chars.add(messages, [len(m["content"]) for m in messages])
        if self.tokenizer is not None:
            self._pending.append(messages)
            if len(self._pending) >= TOKEN_BATCH:
                self.flush()

    def flush(self) -> None:
        if not self._pending or self.tokens is None:
            return
        texts = [m["content"] for messages in self._pending for m in messages]
        counts = iter([len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]])
        for messages in self._pending:
            self.tokens.add(messages, [next(counts) for _ in messages])
        self._pending = []


def compute_stats(
    path: str,
    tokenizer_dir: str | None = None,
    fmt: str = "auto",
    mapping: dict[str, str] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Statistics of one input (file, glob or directory; canonical or any supported format).

    Returns a JSON-friendly dict (``path``, ``formats``, ``records``, ``rejected``,
    ``reject_reasons``, ``tokenizer``, ``rounds``, ``fields: {field: {chars, tokens?}}``,
    ``langs``: percentages) plus ``lengths: {unit: {field: ndarray}}`` for plotting, which
    :func:`stats_to_json` drops.
    """
    from tqdm import tqdm

    collector = _Collector(load_tokenizer(tokenizer_dir) if tokenizer_dir else None)
    formats: dict[str, str | None] = {}
    reasons: Counter[str] = Counter()
    outcomes = iter_conversations(path, fmt, mapping, chat=False)
    for o in tqdm(
        outcomes, desc="stats", unit=" rec", file=sys.stderr, disable=not progress, mininterval=0.5
    ):
        formats.setdefault(o.path, o.fmt)
        if o.record is None:
            reasons[o.reason or "unknown"] += 1
        else:
            collector.add(o.record)
    collector.flush()
    units = {"chars": collector.chars, **({"tokens": collector.tokens} if collector.tokens else {})}
    n = len(collector.rounds)
    return {
        "path": path,
        "formats": formats,
        "records": n,
        "rejected": sum(reasons.values()),
        "reject_reasons": dict(reasons.most_common(5)),
        "tokenizer": tokenizer_dir,
        "rounds": describe(collector.rounds),
        "fields": {
            f: {unit: describe(lengths.by_field[f]) for unit, lengths in units.items()} for f in FIELDS
        },
        "langs": {lang: 100.0 * k / n for lang, k in collector.langs.most_common()},
        "lengths": {
            unit: {f: np.asarray(lengths.by_field[f]) for f in FIELDS} for unit, lengths in units.items()
        },
    }


def stats_to_json(stats: dict[str, Any]) -> dict[str, Any]:
    """``stats`` without the per-record length arrays."""
    return {k: v for k, v in stats.items() if k != "lengths"}


_COLUMNS = ("count", "mean", "std", "min", *(f"p{p}" for p in PERCENTILES), "max")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.1f}"
    return f"{int(value):,}"


def _share(percent: float) -> str:
    return "<0.1%" if 0 < percent < 0.1 else f"{percent:.1f}%"


def format_stats(stats: dict[str, Any]) -> str:
    """A fixed-width table of the statistics, for the terminal (and markdown code blocks)."""
    formats = ", ".join(sorted({f or "-" for f in stats["formats"].values()})) or "-"
    rounds = stats["rounds"]
    langs = "  ".join(f"{lang} {_share(share)}" for lang, share in stats["langs"].items()) or "-"
    lines = [
        f"{stats['path']}  (format: {formats})",
        f"records: {stats['records']:,}   rejected: {stats['rejected']:,}"
        f"   rounds/record: mean {_cell(rounds['mean'])}, max {_cell(rounds['max'])}",
        f"languages: {langs}",
        "",
        f"{'field':<13}{'unit':<7}" + "".join(f"{c:>10}" for c in _COLUMNS),
    ]
    for name, units in stats["fields"].items():
        for unit, d in units.items():
            lines.append(f"{name:<13}{unit:<7}" + "".join(f"{_cell(d[c]):>10}" for c in _COLUMNS))
    if stats["reject_reasons"]:
        lines += ["", "rejected (most common reasons):"]
        lines += [f"  {k:>7,}  {reason}" for reason, k in stats["reject_reasons"].items()]
    return "\n".join(lines)


def plot_stats(stats_or_lengths: dict[str, Any], out_png: str) -> None:
    """Histograms of prompt and response lengths (tokens if counted, else chars) to ``out_png``.

    Accepts the dict from :func:`compute_stats` or a plain ``{"prompt": lengths, "response":
    lengths}`` mapping (unit: chars).
    """

    plt = pyplot()
    lengths = stats_or_lengths.get("lengths")
    unit = "tokens" if lengths and "tokens" in lengths else "chars"
    data = lengths[unit] if lengths else stats_or_lengths
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, name in zip(axes, ("prompt", "response")):
        values = np.asarray(data.get(name, []))
        if values.size:
            ax.hist(values, bins=50, color="tab:blue" if name == "prompt" else "tab:orange")
            ax.axvline(
                float(np.median(values)), color="black", linestyle="--", label=f"p50 {np.median(values):,.0f}"
            )
            ax.legend()
        ax.set_title(f"{name} length ({values.size:,} turns)")
        ax.set_xlabel(unit)
        ax.set_ylabel("count")
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def stats_command(
    path: str, tokenizer: str | None = None, plot: str | None = None, as_json: bool = False
) -> int:
    """``zhtune data stats``: print the table (or JSON) to stdout, optionally write a plot."""
    stats = compute_stats(path, tokenizer, progress=True)
    print(json.dumps(stats_to_json(stats), ensure_ascii=False, indent=2) if as_json else format_stats(stats))
    if plot:
        plot_stats(stats, plot)
        print(f"wrote {plot}", file=sys.stderr)
    return 0

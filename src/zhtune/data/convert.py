"""Any supported input -> canonical conversation records, with every failure accounted for.

:func:`iter_conversations` is the one pipeline: expand inputs, stream raw records
(:mod:`zhtune.data.readers`), rename columns, detect or look up the format
(:mod:`zhtune.data.formats`), build and validate each record. Every raw record ends as an
:class:`Outcome`: a record, or a reason it was rejected. Nothing is dropped silently.

On top of it: :func:`load_conversations` (training: records in memory, rejects to a file) and
:func:`convert_files` (the body of ``zhtune data convert``: stream to JSON Lines, summary).

Record ids: a raw ``id`` field is kept, else ``{file_stem}-{n}`` with ``n`` the 1-based
position of the raw record in its file (equal to the line number for JSON Lines without blank
lines; a one-line JSON array has every record on line 1, hence not the line); formats that split one raw
record into several (seed tasks) append ``-{k}``. ``meta``: ``source`` (the input file name),
``lang`` (:func:`~zhtune.data.lang.guess_lang` of all message text), raw ``category``,
``class``, ``tags`` (and ``source`` as ``origin``), and a raw ``meta``/``metadata`` object
merged last, so converting a canonical file again keeps its meta unchanged (the ``openai``
format reads canonical records; one with ``meta.kind == "text"`` skips chat validation).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import IO, Any

from zhtune.data.formats import (
    CARRIED,
    FORMATS,
    Format,
    apply_mapping,
    describe_formats,
    detect_format,
    get_format,
    ignored_fields,
)
from zhtune.data.lang import guess_lang
from zhtune.data.readers import RawError, expand_inputs, iter_raw
from zhtune.data.schema import RecordError, validate_record
from zhtune.errors import ZhtuneError, where

#: How many rejects the convert summary quotes.
SHOWN_REJECTS = 5
#: How many input files the convert summary lists one by one.
SHOWN_FILES = 10


@dataclass(frozen=True)
class Outcome:
    """What became of one raw record (or one part of it): a ``record``, or a ``reason``.

    ``field`` names the offending field of a reject (None when the record did not parse);
    ``raw`` is the record as read, before column mapping (None when it did not parse);
    ``fmt`` the format used; ``ignored`` the raw fields the format did not consume; ``index``
    the 1-based position of the raw record in its file (``line`` may repeat in a one-line file).
    """

    path: str
    line: int
    record: dict[str, Any] | None
    reason: str | None = None
    field: str | None = None
    raw: dict[str, Any] | None = None
    fmt: str | None = None
    ignored: tuple[str, ...] = ()
    index: int = 0

    @property
    def ok(self) -> bool:
        return self.record is not None

    def location(self) -> str:
        """``path:line`` plus ``(record N)`` where the line alone does not identify the record."""
        loc = where(self.path, self.line)
        return loc if self.index in (0, self.line) else f"{loc} (record {self.index})"


# --------------------------------------------------------------------------- the pipeline


def detect_file_format(path: str, raw: dict[str, Any]) -> Format:
    """The format of a file, from its first parseable record; a clear error if none fits."""
    name = detect_format(raw)
    if name is not None:
        return FORMATS[name]
    fields = ", ".join(list(raw)[:20]) or "(none)"
    raise ZhtuneError(
        f"{path}: cannot detect the data format; its first record has the fields: {fields}\n"
        f"Known formats (recognised by their fields):\n{describe_formats()}\n"
        "Name the format with --format NAME, or rename columns with --map SOURCE=TARGET "
        "(e.g. --map zh_instruction=instruction --map zh_output=output)."
    )


def make_record_id(raw: dict[str, Any], path: str, index: int) -> str:
    """The raw record's own ``id`` if it has a usable one, else ``{file_stem}-{index}``."""
    rid = raw.get("id")
    if isinstance(rid, (str, int)) and not isinstance(rid, bool) and str(rid).strip():
        return str(rid)
    return f"{Path(path).stem}-{index}"


@lru_cache(maxsize=64)
def _file_name(path: str) -> str:
    return Path(path).name


def record_meta(
    fmt: Format, raw: dict[str, Any], path: str, messages: list[dict[str, str]]
) -> dict[str, Any]:
    """A canonical record's ``meta``: source file, guessed language, carried raw fields, and a raw
    ``meta``/``metadata`` object merged last."""
    meta: dict[str, Any] = {"source": _file_name(path)}
    if not any(isinstance(raw.get(k), dict) and "lang" in raw[k] for k in ("metadata", "meta")):
        # (a canonical record read again keeps its own lang, merged below)
        meta["lang"] = guess_lang(
            "\n".join(m["content"] for m in messages if isinstance(m.get("content"), str))
        )
    if not fmt.chat:
        meta["kind"] = "text"
    for key, dst in {**CARRIED, **fmt.meta}.items():
        if key in raw:
            meta[dst] = raw[key]
    for key in ("metadata", "meta"):
        if isinstance(raw.get(key), dict):
            meta.update(raw[key])
    return meta


def _build(fmt: Format, part: dict[str, Any], raw: dict[str, Any], rid: str, path: str, chat: bool) -> dict:
    """One canonical record from one (part of a) raw record; raises :class:`RecordError`."""
    messages = fmt.to_messages(part)
    record = {"id": rid, "messages": messages, "meta": record_meta(fmt, raw, path, messages)}
    if fmt.chat and record["meta"].get("kind") != "text":  # a canonical text record read again
        validate_record(record, require_assistant=chat)
    return record


def convert_one(
    fmt: Format, original: dict, raw: dict, path: str, line: int, index: int, chat: bool, strict: bool = False
) -> Iterator[Outcome]:
    """Outcomes for one parsed raw record (several for formats that explode it)."""
    common = {
        "path": path,
        "line": line,
        "index": index,
        "fmt": fmt.name,
        "ignored": tuple(ignored_fields(fmt, raw)),
    }
    rid = make_record_id(raw, path, index)
    if strict and common["ignored"]:
        reason = f"unknown field for format '{fmt.name}' (rename it with --map, or convert without --strict)"
        yield Outcome(record=None, reason=reason, field=common["ignored"][0], raw=original, **common)
        return
    try:
        parts = fmt.explode(raw) if fmt.explode else [raw]
    except RecordError as e:
        yield Outcome(record=None, reason=e.reason, field=e.field, raw=original, **common)
        return
    for k, part in enumerate(parts):
        try:
            record = _build(fmt, part, raw, f"{rid}-{k}" if fmt.explode else rid, path, chat)
        except RecordError as e:
            yield Outcome(record=None, reason=e.reason, field=e.field, raw=original, **common)
        else:
            yield Outcome(record=record, **common)


def _iter_file(
    path: str, fmt: Format | None, mapping: dict[str, str], chat: bool, strict: bool = False
) -> Iterator[Outcome]:
    for index, (line, original) in enumerate(iter_raw(path), 1):
        if isinstance(original, RawError):
            yield Outcome(path, line, None, reason=original.reason, fmt=fmt and fmt.name, index=index)
            continue
        raw = apply_mapping(original, mapping)
        fmt = fmt or detect_file_format(path, raw)
        yield from convert_one(fmt, original, raw, path, line, index, chat, strict)


def iter_conversations(
    paths: str | list[str],
    fmt: str | Format = "auto",
    mapping: dict[str, str] | None = None,
    chat: bool = True,
    strict: bool = False,
) -> Iterator[Outcome]:
    """Stream an :class:`Outcome` for every raw record of every input.

    ``fmt`` is ``"auto"`` (detected per file from its first parseable record), a name in
    :data:`~zhtune.data.formats.FORMATS`, or a :class:`Format` (a registry entry's own layout). ``mapping`` renames source columns first. With
    ``chat`` (training data) a record needs an assistant turn; without it (stats) only the
    shape is checked. With ``strict`` a record with a field its format does not use is
    rejected (default: the field is ignored and counted). Raises :class:`ZhtuneError` for an unknown format, an undetectable file,
    or a file that is broken beyond one record.
    """
    named = fmt if isinstance(fmt, Format) else None if fmt == "auto" else get_format(fmt)
    for path in expand_inputs([paths] if isinstance(paths, str) else list(paths)):
        yield from _iter_file(path, named, mapping or {}, chat, strict)


# --------------------------------------------------------------------------- writing


@contextmanager
def atomic_open(path: str) -> Iterator[IO[str]]:
    """Write ``path`` through a temporary file renamed into place on success (removed on error)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            yield f
        os.replace(tmp, path)
    finally:
        with suppress(FileNotFoundError):
            os.remove(tmp)


def dump_line(obj: dict[str, Any]) -> str:
    """One JSON Lines line (UTF-8 text kept as it is, not \\u-escaped)."""
    return json.dumps(obj, ensure_ascii=False) + "\n"


def reject_entry(o: Outcome) -> dict[str, Any]:
    """A reject as written to the rejects file: where, which field, why, and the raw record."""
    return {
        "file": o.path,
        "line": o.line,
        "index": o.index,
        "field": o.field,
        "reason": o.reason,
        "record": o.raw,
    }


class RejectWriter:
    """Collects rejects as JSON Lines ``{file, line, index, field, reason, record}``.

    Use as a context manager. The file is created only at the first reject, through a temporary
    file renamed into place when the block ends without error. ``count`` is the number of
    rejects seen (also when ``path`` is None and nothing is written).
    """

    def __init__(self, path: str | None) -> None:
        self.path, self.count = path, 0
        self._stack = ExitStack()
        self._file: IO[str] | None = None

    def write(self, o: Outcome) -> None:
        self.count += 1
        if self.path is None:
            return
        if self._file is None:
            self._file = self._stack.enter_context(atomic_open(self.path))
        self._file.write(dump_line(reject_entry(o)))

    def __enter__(self) -> RejectWriter:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stack.__exit__(*exc_info)


def load_conversations(
    paths: str | list[str],
    fmt: str | Format = "auto",
    mapping: dict[str, str] | None = None,
    rejects_path: str | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """All valid records of ``paths`` in memory, and the number rejected (for training).

    Rejects are written to ``rejects_path`` (JSON Lines, only if there are any).
    """
    records: list[dict[str, Any]] = []
    with RejectWriter(rejects_path) as rejects:
        for o in iter_conversations(paths, fmt, mapping):
            if o.record is not None:
                records.append(o.record)
            else:
                rejects.write(o)
    return records, rejects.count


# --------------------------------------------------------------------------- summary


@dataclass
class FileSummary:
    """Counts for one input file: raw records read, records written and rejected."""

    path: str
    fmt: str | None = None
    read: int = 0
    written: int = 0
    rejected: int = 0
    ignored: Counter[str] = field(default_factory=Counter)


@dataclass
class ConvertSummary:
    """Running totals of a conversion, per file, plus the first few rejects as text."""

    files: dict[str, FileSummary] = field(default_factory=dict)
    first_rejects: list[str] = field(default_factory=list)
    _last: tuple[str, int, int] | None = None

    def add(self, o: Outcome) -> None:
        fs = self.files.setdefault(o.path, FileSummary(o.path))
        fs.fmt = fs.fmt or o.fmt
        if (o.path, o.line, o.index) != self._last:  # the first outcome of a raw record
            self._last = (o.path, o.line, o.index)
            fs.read += 1
            fs.ignored.update(o.ignored)
        if o.record is not None:
            fs.written += 1
            return
        fs.rejected += 1
        if len(self.first_rejects) < SHOWN_REJECTS:
            field_part = f": {where(field=o.field)}" if o.field else ""
            self.first_rejects.append(f"{o.location()}{field_part}: {o.reason}")

    def total(self, attr: str) -> int:
        return sum(getattr(fs, attr) for fs in self.files.values())


def _row(name: str, fmt: str, read: Any, written: Any, rejected: Any, width: int) -> str:
    return f"  {name:<{width}}  {fmt:<9} {read:>9,} {written:>9,} {rejected:>9,}"


def _ignored_lines(summary: ConvertSummary) -> list[str]:
    """Ignored fields per file, or summed over all files when there are many."""
    files = list(summary.files.values())
    if len(files) > SHOWN_FILES:
        total = sum((fs.ignored for fs in files), Counter())
        groups = [(f"{len(files)} files", total)] if total else []
    else:
        groups = [(fs.path, fs.ignored) for fs in files if fs.ignored]
    return [
        f"ignored fields in {name}: {', '.join(f'{k} ({n:,})' for k, n in counts.most_common())}"
        for name, counts in groups
    ]


def format_summary(summary: ConvertSummary, output: str, rejects: str, seconds: float) -> str:
    """The human-readable report printed after ``zhtune data convert``.

    One row per input file (the first :data:`SHOWN_FILES`, then a total), the ignored fields
    with counts, and the first rejects as ``file:line: field 'x': reason``.
    """
    files = list(summary.files.values())
    read, written, rejected = (summary.total(a) for a in ("read", "written", "rejected"))
    rate = read / seconds if seconds > 0 else 0.0
    width = max([len("file"), *(len(fs.path) for fs in files[:SHOWN_FILES])])
    lines = [
        f"wrote {written:,} records to {output} in {seconds:.1f} s ({rate:,.0f} records/s)",
        f"  {'file':<{width}}  {'format':<9} {'read':>9} {'written':>9} {'rejected':>9}",
    ]
    lines += [
        _row(fs.path, fs.fmt or "-", fs.read, fs.written, fs.rejected, width) for fs in files[:SHOWN_FILES]
    ]
    if len(files) > SHOWN_FILES:
        lines.append(f"  ... and {len(files) - SHOWN_FILES} more files")
    if len(files) > 1:
        fmts = {fs.fmt for fs in files if fs.fmt}
        fmt = fmts.pop() if len(fmts) == 1 else ("mixed" if fmts else "-")
        lines.append(_row(f"total ({len(files)} files)", fmt, read, written, rejected, width))
    lines += _ignored_lines(summary)
    if rejected:
        lines.append(f"rejected {rejected:,} record(s) -> {rejects}; the first ones:")
        lines += [f"  {r}" for r in summary.first_rejects]
    return "\n".join(lines)


def default_rejects_path(output: str) -> str:
    """``out.jsonl`` -> ``out.rejects.jsonl``."""
    return str(Path(output).with_suffix(".rejects.jsonl"))


def convert_files(
    inputs: list[str],
    output: str,
    fmt: str = "auto",
    mapping: dict[str, str] | None = None,
    rejects: str | None = None,
    allow_rejects: bool = False,
    progress: bool = True,
    strict: bool = False,
) -> int:
    """``zhtune data convert``: stream ``inputs`` to canonical JSON Lines at ``output``.

    Rejects go to ``rejects`` (default ``OUTPUT.rejects.jsonl``; a stale default file from an
    earlier run is removed when there are none). Prints a summary to stderr. Returns the exit
    status: 1 if any record was rejected and not ``allow_rejects`` (the output is written
    either way), else 0.
    """
    from tqdm import tqdm

    paths = expand_inputs(inputs)
    if any(os.path.abspath(p) == os.path.abspath(output) for p in paths):
        raise ZhtuneError(f"output {output} is also an input; choose another output path")
    rejects_path = rejects or default_rejects_path(output)
    summary = ConvertSummary(files={p: FileSummary(p) for p in paths})
    start = time.perf_counter()
    with (
        atomic_open(output) as out,
        RejectWriter(rejects_path) as rejected,
        tqdm(desc="convert", unit=" rec", file=sys.stderr, disable=not progress, mininterval=0.5) as bar,
    ):
        for o in iter_conversations(paths, fmt, mapping, strict=strict):
            summary.add(o)
            if o.record is not None:
                out.write(dump_line(o.record))
            else:
                rejected.write(o)
            bar.update()
    if rejected.count == 0 and rejects is None:
        with suppress(FileNotFoundError):
            os.remove(rejects_path)
    print(format_summary(summary, output, rejects_path, time.perf_counter() - start), file=sys.stderr)
    return rejects_exit_status(rejected.count, allow_rejects)


def rejects_exit_status(n_rejected: int, allow_rejects: bool) -> int:
    """A command's exit status after writing rejects: 1 (saying why) when records were rejected
    and ``--allow-rejects`` was not given, else 0."""
    if n_rejected and not allow_rejects:
        print(
            "exit status 1 because records were rejected (allow them with --allow-rejects)", file=sys.stderr
        )
        return 1
    return 0


def parse_mapping(items: list[str]) -> dict[str, str]:
    """Parse ``["zh_instruction=instruction", "zh_output=output"]`` (or comma-joined) to a dict."""
    mapping: dict[str, str] = {}
    for item in items:
        for piece in item.split(","):
            if not piece.strip():
                continue
            src, sep, dst = (s.strip() for s in piece.partition("="))
            if not (sep and src and dst):
                raise ZhtuneError(
                    f"bad column mapping {piece!r}: expected SOURCE=TARGET, e.g. zh_instruction=instruction"
                )
            if src in mapping:
                raise ZhtuneError(f"column {src!r} is mapped twice ({mapping[src]!r} and {dst!r})")
            mapping[src] = dst
    return mapping

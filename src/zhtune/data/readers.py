"""Streaming raw readers: a data file -> ``(line, dict)`` pairs, one record at a time.

Every reader yields ``(line_number, raw_dict)``, or ``(line_number, RawError)`` for a record
that could not be parsed, so the caller can reject that one record and go on. "Line" is the
1-based line where the record starts (JSON, JSON Lines, CSV) or the 1-based row number
(Parquet, a ``datasets`` directory); it is what error messages and reject files point at.

Nothing here loads a whole file: JSON Lines and CSV are read line by line, a JSON array is
decoded element by element from a buffer refilled in chunks, Parquet by row batches, and a
``datasets`` directory is memory-mapped Arrow. Memory is bounded by one record plus a buffer.

Supported inputs: ``.jsonl``, ``.json`` (a JSON array, a single object, or JSON Lines under a
``.json`` name, as BELLE ships them), ``.csv``, ``.tsv``, ``.parquet``, and a directory
written by ``datasets.Dataset.save_to_disk`` (or ``DatasetDict.save_to_disk``).
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, TypeVar

from zhtune.errors import ZhtuneError

#: Characters read per refill when streaming a JSON array (the buffer grows past this only
#: while a single element is larger).
CHUNK_CHARS = 1 << 16
#: Rows per Arrow batch for Parquet.
PARQUET_BATCH = 1024
#: CSV fields can be long (whole answers); lift the 128 KiB default.
csv.field_size_limit(1 << 30)
_WHITESPACE = re.compile(r"[ \t\n\r]*")


@dataclass(frozen=True)
class RawError:
    """A record that could not be parsed (a malformed JSON line, a short CSV row)."""

    reason: str


RawItem = tuple[int, "dict[str, Any] | RawError"]

T = TypeVar("T")


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items, the last one shorter: a stream stays a stream
    (``itertools.batched`` is Python 3.12+)."""
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _as_object(value: Any) -> dict[str, Any] | RawError:
    """Return ``value`` if it is a JSON object, else a :class:`RawError` saying what it was."""
    if isinstance(value, dict):
        return value
    return RawError(f"expected a JSON object, got {type(value).__name__}")


# --------------------------------------------------------------------------- JSON Lines


def parse_json_line(line: str) -> dict[str, Any] | RawError:
    """One JSON Lines line as its object, or the :class:`RawError` saying why it is not one."""
    try:
        return _as_object(json.loads(line.rstrip("\r\n")))
    except json.JSONDecodeError as e:
        return RawError(f"invalid JSON: {e.msg} (column {e.colno})")


def _jsonl_lines(path: str) -> Iterator[tuple[int, str | RawError]]:
    """``(line number, text)`` of every non-blank line of a JSON Lines file; a line that is not
    valid UTF-8 comes as a :class:`RawError` naming the byte (the rest of the file is read)."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            start = 3 if lineno == 1 and raw.startswith(b"\xef\xbb\xbf") else 0  # a byte-order mark
            try:
                line = raw[start:].decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, RawError(
                    f"invalid UTF-8 ({e.reason}) at byte {offset + start + e.start} of the file "
                    f"(column {e.start + 1} of the line)"
                )
            else:
                if line.strip():
                    yield lineno, line
            offset += len(raw)


def read_jsonl(path: str) -> Iterator[RawItem]:
    """Yield one record per non-blank line of a JSON Lines file."""
    for lineno, line in _jsonl_lines(path):
        yield lineno, line if isinstance(line, RawError) else parse_json_line(line)


# --------------------------------------------------------------------------- JSON array


class _JsonStream:
    """Decode consecutive JSON values from a text file without reading it whole.

    Keeps ``buf[pos:]`` as the unread text and ``line`` as the 1-based line of ``buf[pos]``.
    A value that straddles the end of the buffer makes :meth:`value` read more (doubling the
    request while one value is larger than the buffer) and decode again.
    """

    _decoder = json.JSONDecoder()

    def __init__(self, f: TextIO, path: str) -> None:
        self.f, self.path = f, path
        self.buf, self.pos, self.line, self.eof = "", 0, 1, False
        self.truncated = False
        """The last :meth:`value` failed because the file ends inside it."""

    def _fill(self) -> bool:
        """Append more text to the buffer (dropping what was consumed); False at end of file."""
        if self.eof:
            return False
        chunk = self.f.read(max(CHUNK_CHARS, len(self.buf) - self.pos))
        if not chunk:  # keep the buffer as is: callers may hold offsets into it
            self.eof = True
            return False
        self.buf, self.pos = self.buf[self.pos :] + chunk, 0
        return True

    def _advance(self, end: int) -> None:
        self.line += self.buf.count("\n", self.pos, end)
        self.pos = end

    def peek(self) -> str:
        """Skip whitespace and return the next character ('' at end of file)."""
        while True:
            self._advance(_WHITESPACE.match(self.buf, self.pos).end())
            if self.pos < len(self.buf) or not self._fill():
                break
        return self.buf[self.pos] if self.pos < len(self.buf) else ""

    def take(self, char: str) -> None:
        """Consume ``char`` (which :meth:`peek` just returned)."""
        self._advance(self.pos + len(char))

    def fail(self, message: str, offset: int | None = None) -> ZhtuneError:
        """An error pointing at ``path:line`` of ``buf[offset]`` (default: the current char)."""
        offset = self.pos if offset is None else offset
        line = self.line + self.buf.count("\n", self.pos, offset)
        return ZhtuneError(f"{self.path}:{line}: invalid JSON: {message}")

    def value(self) -> Any:
        """Decode the next JSON value, reading more text while it is cut off by the buffer end."""
        while True:
            try:
                obj, end = self._decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                # Near the buffer end (or an open string) the value may just be cut off.
                cut_off = e.pos >= len(self.buf) - 16 or e.msg.startswith("Unterminated")
                if cut_off and self._fill():
                    continue
                # truncated: the file ends inside the value (not a syntax error near its end)
                at_end = e.msg.startswith("Unterminated") or e.pos >= len(self.buf.rstrip())
                self.truncated = self.eof and at_end
                raise self.fail(e.msg, e.pos) from None
            if end == len(self.buf) and self._fill():  # a number may continue in the next chunk
                continue
            self._advance(end)
            return obj


def _iter_json_array(stream: _JsonStream) -> Iterator[RawItem]:
    """Yield the elements of the JSON array that ``stream`` is positioned at (``[``)."""
    stream.take("[")
    if stream.peek() == "]":
        stream.take("]")
        return
    while True:
        if stream.peek() == "":  # a truncated file keeps the records before its end
            yield stream.line, RawError("the file ends inside the array (no closing ']'; truncated?)")
            return
        line = stream.line
        try:
            value = stream.value()
        except ZhtuneError as err:
            if not stream.truncated:
                raise
            yield line, RawError(f"the file ends inside this element (truncated?): {err}")
            stream.pos = len(stream.buf)  # the cut-off tail is consumed: nothing follows it
            return
        yield line, _as_object(value)
        sep = stream.peek()
        if sep == "]":
            stream.take("]")
            return
        if sep == "":
            yield stream.line, RawError("the file ends inside the array (no closing ']'; truncated?)")
            return
        if sep != ",":
            raise stream.fail(f"expected ',' or ']' after an array element, found {sep!r}")
        stream.take(",")


def _first_line_is_json(path: str) -> bool:
    """True if the first non-blank line of ``path`` parses on its own (a JSON Lines file)."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError:
                    return False
                return True
    return False


def read_json(path: str) -> Iterator[RawItem]:
    """Yield the records of a ``.json`` file: an array, a single object, or JSON Lines.

    A ``[`` starts an array, streamed element by element. A ``{`` whose first line parses on
    its own means JSON Lines; otherwise the file is one (pretty-printed) object. A syntax error
    inside an array or object cannot be skipped: it raises :class:`ZhtuneError` with the line.
    """
    if _is_json_lines(path):
        yield from read_jsonl(path)
        return
    with open(path, encoding="utf-8-sig") as f:
        stream = _JsonStream(f, path)
        first = stream.peek()
        if first == "[":
            yield from _iter_json_array(stream)
        elif first == "{":
            yield stream.line, stream.value()
        elif first == "":
            return
        else:
            raise stream.fail(f"expected a JSON array or object, found {first!r}")
        if stream.peek() != "":
            raise stream.fail("unexpected data after the end of the JSON value")


# --------------------------------------------------------------------------- CSV / TSV

#: Header names of a leading index column written by pandas ``to_csv`` (dropped).
_INDEX_HEADERS = ("", "Unnamed: 0")


def _read_delimited(path: str, delimiter: str) -> Iterator[RawItem]:
    """Yield one dict per CSV/TSV row, keyed by the header; line = the row's first line."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            return
        skip = 1 if header and header[0] in _INDEX_HEADERS else 0
        names = header[skip:]
        prev = reader.line_num
        for row in reader:
            start, prev = prev + 1, reader.line_num
            if not row:
                continue
            if len(row) != len(header):
                yield start, RawError(f"row has {len(row)} fields, the header has {len(header)}")
                continue
            yield start, dict(zip(names, row[skip:]))


def read_csv(path: str) -> Iterator[RawItem]:
    """Yield the rows of a comma-separated file (see :func:`_read_delimited`)."""
    return _read_delimited(path, ",")


def read_tsv(path: str) -> Iterator[RawItem]:
    """Yield the rows of a tab-separated file (see :func:`_read_delimited`)."""
    return _read_delimited(path, "\t")


# --------------------------------------------------------------------------- Arrow


def read_parquet(path: str) -> Iterator[RawItem]:
    """Yield the rows of a Parquet file batch by batch; line = 1-based row number."""
    import pyarrow.parquet as pq

    rows = (
        row
        for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH)
        for row in batch.to_pylist()
    )
    yield from enumerate(rows, 1)


def is_datasets_dir(path: str) -> bool:
    """True for a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    p = Path(path)
    return ((p / "dataset_info.json").is_file() and (p / "state.json").is_file()) or (
        p / "dataset_dict.json"
    ).is_file()


def read_datasets_dir(path: str) -> Iterator[RawItem]:
    """Yield the rows of a saved ``datasets`` directory (all splits of a DatasetDict in order)."""
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except (FileNotFoundError, ValueError) as e:
        raise ZhtuneError(f"{path}: cannot load the datasets directory: {e}") from e
    splits = loaded.values() if isinstance(loaded, datasets.DatasetDict) else [loaded]
    yield from enumerate((row for split in splits for row in split), 1)


# --------------------------------------------------------------------------- dispatch

#: Reader per file extension: the registry that :func:`iter_raw` dispatches on.
READERS: dict[str, Callable[[str], Iterator[RawItem]]] = {
    ".jsonl": read_jsonl,
    ".json": read_json,
    ".csv": read_csv,
    ".tsv": read_tsv,
    ".parquet": read_parquet,
}


def _supported() -> str:
    return ", ".join(READERS) + ", or a directory saved with datasets' save_to_disk"


def iter_raw(path: str) -> Iterator[RawItem]:
    """Stream the raw records of one input as ``(line, dict | RawError)``.

    Raises :class:`ZhtuneError` for a missing path, an unsupported extension, or a file whose
    structure is broken beyond one record (a syntax error inside a JSON array).
    """
    if os.path.isdir(path):
        if not is_datasets_dir(path):
            raise ZhtuneError(
                f"{path} is a directory but not a saved datasets directory (no dataset_info.json)"
            )
        return read_datasets_dir(path)
    if not os.path.exists(path):
        raise ZhtuneError(f"file not found: {path}")
    reader = READERS.get(Path(path).suffix.lower())
    if reader is None:
        raise ZhtuneError(
            f"unsupported file type {Path(path).suffix or '(none)'!r} for {path}; supported: {_supported()}"
        )
    return _decode_errors_named(path, reader(path))


def _decode_errors_named(path: str, items: Iterator[RawItem]) -> Iterator[RawItem]:
    """``items``, with a text file's invalid UTF-8 turned into a clear error naming the file (JSON
    Lines files reject the bad line alone instead, see :func:`_jsonl_lines`)."""
    try:
        yield from items
    except UnicodeDecodeError as e:
        raise ZhtuneError(
            f"{path}: not valid UTF-8 ({e.reason}); convert it first (e.g. iconv -f GBK -t UTF-8), or "
            "write it as JSON Lines, where a bad line is rejected alone"
        ) from None


def iter_raw_lazy(path: str) -> Iterator[tuple[int, dict[str, Any] | RawError | str]]:
    """:func:`iter_raw`, except that the records of a JSON Lines file (``.jsonl``, or ``.json``
    holding JSON Lines) come as their unparsed line text, for :func:`parse_json_line` to parse
    where the work is spread out (``zhtune data clean`` parses in its worker processes)."""
    suffix = Path(path).suffix.lower()
    if os.path.isfile(path) and (suffix == ".jsonl" or (suffix == ".json" and _is_json_lines(path))):
        yield from _jsonl_lines(path)
        return
    yield from iter_raw(path)


def _is_json_lines(path: str) -> bool:
    """True for a ``.json`` file that :func:`read_json` reads as JSON Lines."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        first = _JsonStream(f, path).peek()
    return first == "{" and _first_line_is_json(path)


def _expand_dir(path: str) -> list[str]:
    """A datasets directory stays one input; any other directory gives its data files (recursively)."""
    if is_datasets_dir(path):
        return [path]
    found: list[str] = []
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            found.extend(_expand_dir(entry.path))
        elif Path(entry.name).suffix.lower() in READERS:
            found.append(entry.path)
    return found


def expand_inputs(paths: list[str]) -> list[str]:
    """Expand globs and directories into the list of inputs to read, in a stable order.

    A glob (``data/*.json``, ``data/**/*.jsonl``) expands to its sorted matches; a directory to
    its data files (a saved ``datasets`` directory stays one input); duplicates are dropped.
    A path or pattern that yields nothing raises :class:`ZhtuneError`.
    """
    out: list[str] = []
    seen: set[str] = set()
    for pattern in paths:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise ZhtuneError(f"no files match {pattern}")
        expanded: list[str] = []
        for path in matches:
            if os.path.isdir(path):
                expanded.extend(_expand_dir(path))
            elif os.path.exists(path):
                expanded.append(path)
            else:
                raise ZhtuneError(f"file not found: {path}")
        if not expanded:
            raise ZhtuneError(f"no data files ({', '.join(READERS)}) in {pattern}")
        for path in expanded:
            if path not in seen:
                seen.add(path)
                out.append(path)
    return out

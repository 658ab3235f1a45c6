"""``zhtune data clean``: canonical records through a registry of cleaning steps, streaming.

Input is anything ``zhtune data convert`` reads (:func:`~zhtune.data.convert.iter_conversations`,
so ShareGPT html dumps work directly). Every record goes through :data:`STEPS` in order; a step
either keeps it (possibly changed, or split into several) or removes it with a reason. Removed
records go to ``OUT.rejects.jsonl`` as ``{step, reason, id, file, line, index, field, record}``
(near and exact duplicates add ``duplicate_of`` and ``similarity``); kept records to ``OUT``, which
appears only when the run finishes (``OUT.partial`` until then). A summary table gives, per step,
the records in, removed and their share, and what changed.

Scale: the main process reads lines (JSON Lines are not even parsed there) and sends chunks,
through a bounded window (:func:`~zhtune.parallel.ordered_map`), to ``workers`` processes that
parse, convert, run the per-record steps (html, filters, language, split), serialise the
results and compute the dedup fingerprints (MinHash, a chunk at a time); the main process
deduplicates in input order against its indexes and writes bytes. Output order and content are
the same for any number of workers. Memory is the window plus the dedup indexes, which grow with
the number of kept records (see :mod:`zhtune.data.dedup`).

Resume: every :data:`CHECKPOINT_SECONDS` both files are flushed and ``OUT.partial.json`` notes
how many input records they hold; a run started again with the same inputs and settings cuts the
files back to that point, rebuilds the dedup index from them and goes on.
"""

from __future__ import annotations

import itertools
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zhtune.data import filters
from zhtune.data.convert import Outcome, convert_one, default_rejects_path, detect_file_format, dump_line
from zhtune.data.formats import apply_mapping, get_format
from zhtune.data.lang import _fasttext_model, detect_lang
from zhtune.data.readers import RawError, chunked, expand_inputs, iter_raw_lazy, parse_json_line
from zhtune.data.split import BYTES_BOUND, split_conversation, tokens_per_byte_bound
from zhtune.data.templates import encode_many
from zhtune.errors import ZhtuneError
from zhtune.parallel import ordered_map
from zhtune.progress import progress_bar

if TYPE_CHECKING:  # imported where used: `zhtune --help` builds this command's parser
    from zhtune.data.convert import Outcome
    from zhtune.data.formats import Format

#: Records per chunk sent to a worker.
CHUNK = 256
_HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
#: One raw record on its way to a worker: path, line, index in file, the record (the line's
#: text for JSON Lines, parsed by the worker; else parsed, or the reader's error), and the
#: file's format.
RawItem = tuple[str, int, int, Any, "Format | None"]


@dataclass
class CleanOptions:
    """Settings of ``zhtune data clean`` besides which steps run."""

    langs: str = "zh,en"
    """languages the lang step keeps, ISO 639-1 codes, comma-separated (records with no letters
    at all are kept)"""
    max_tokens: int = 2048
    """split: most content tokens per chunk (leave room for the template's markers)"""
    tokenizer: str | None = None
    """split: tokenizer directory that counts tokens (giving one turns split on)"""
    near_dup_threshold: float = 0.85
    """near-dup: estimated Jaccard similarity of character 5-gram sets from which a record is a
    near duplicate of an earlier one"""
    num_perm: int = 64
    """near-dup: MinHash permutations (more: finer similarity estimates, more memory)"""
    min_reply_chars: int = 1
    """short: fewest non-space characters the replies must hold together"""
    workers: int = 2
    """processes for the per-record steps (1: all in this process)"""


@dataclass(frozen=True)
class Step:
    """One cleaning step: its flag name, its help line, whether it runs by default, and its
    per-record function (None for the dedup steps, which run in the main process)."""

    name: str
    help: str
    default: bool
    apply: Callable[[dict[str, Any], Worker], list[dict[str, Any]] | str] | None = None


# --------------------------------------------------------------------------- per-record steps


def _replace_contents(record: dict[str, Any], convert: Callable[[str], str]) -> dict[str, Any] | None:
    """``record`` with ``convert`` applied to every message content, or None if nothing changed."""
    messages = [{**m, "content": convert(m["content"])} for m in record["messages"]]
    if all(a["content"] == b["content"] for a, b in zip(messages, record["messages"])):
        return None
    return {**record, "messages": messages}


def _html(record: dict[str, Any], w: Worker) -> list[dict[str, Any]] | str:
    messages, changed = list(record["messages"]), False
    try:
        for i, m in enumerate(messages):
            before = messages[i - 1]["content"] if i and m["role"] == "assistant" else ""
            if filters.is_rendered_html(m["content"], before, page_dump=w.source_format == "sharegpt"):
                messages[i] = {**m, "content": filters.html_to_markdown(m["content"])}
                changed = True
    except Exception as err:  # a page bs4 cannot parse is unusable, not fatal
        return f"html could not be converted: {type(err).__name__}: {err}"
    if not changed:
        return [record]
    w.note("html", "converted")
    empty = [i for i, m in enumerate(messages) if m["role"] != "system" and not m["content"].strip()]
    if empty:
        return f"messages[{empty[0]}] is empty after html -> markdown"
    return [{**record, "messages": messages}]


def _t2s(record: dict[str, Any], w: Worker) -> list[dict[str, Any]] | str:
    new = _replace_contents(record, lambda t: w.opencc.convert(t) if _HAN.search(t) else t)
    if new is None:
        return [record]
    w.note("t2s", "converted")
    return [new]


def _trailing_user(record: dict[str, Any], w: Worker) -> list[dict[str, Any]] | str:
    messages = filters.trim_trailing_user(record["messages"])
    if len(messages) == len(record["messages"]):
        return [record]
    w.note("trailing-user", "trimmed")
    return [{**record, "messages": messages}]


def _rule(name: str) -> Callable:
    """A step from the rule ``zhtune.data.filters.<name>``: the record stays unless the rule
    gives a reason."""

    def apply(record: dict[str, Any], w: Worker) -> list[dict[str, Any]] | str:
        return getattr(filters, name)(record["messages"]) or [record]

    return apply


def _short(record: dict[str, Any], w: Worker) -> list[dict[str, Any]] | str:
    return filters.too_short(record["messages"], w.options.min_reply_chars) or [record]


def _lang(record: dict[str, Any], w: Worker) -> list[dict[str, Any]] | str:
    lang = detect_lang("\n".join(m["content"] for m in record["messages"] if m["role"] != "assistant"))
    if lang == "unknown":  # prompts without letters ("2+2"): judge by the whole conversation
        lang = detect_lang("\n".join(m["content"] for m in record["messages"]))
    if lang != "unknown" and lang not in w.langs:
        return f"language '{lang}' not in {','.join(sorted(w.langs))}"
    if (record.get("meta") or {}).get("lang") == lang:
        return [record]
    return [{**record, "meta": {**(record.get("meta") or {}), "lang": lang}}]


def _split(record: dict[str, Any], w: Worker) -> list[dict[str, Any]] | str:
    result = split_conversation(record, w.options.max_tokens, w.count_tokens, w.tokenizer, w.bytes_bound)
    if not result.records:
        return "no answered user turn to keep"
    if len(result.records) > 1:
        w.note("split", "split", 1)
        w.note("split", "parts", len(result.records))
    if result.truncated:
        w.note("split", "truncated", result.truncated)
    return result.records


STEPS: list[Step] = [
    Step(
        "html",
        "html -> markdown for chat-page replies (any html in raw ShareGPT files, elsewhere only whole-turn "
        "rendered html that was not asked for): removes Copy-code buttons, regenerate counters, div/span; "
        "restores code fences with their language",
        True,
        _html,
    ),
    Step("t2s", "Traditional -> Simplified Chinese (OpenCC t2s)", False, _t2s),
    Step("trailing-user", "drop trailing user turns that have no answer (FastChat)", True, _trailing_user),
    Step("short", "remove conversations with no answered turn or replies under --min-reply-chars", True, _short),
    Step("errors", 'remove web-UI error replies ("Too many requests in 1 hour", ...) (FastChat)', True,
         _rule("error_reply")),
    Step("self-ref", "remove replies naming GPT / ChatGPT / OpenAI or 'as an AI language model' (BELLE)", True,
         _rule("self_reference")),
    Step("incomplete", "remove instructions missing their input, replies asking for it (BELLE)", True,
         _rule("incomplete_input")),
    Step("zh-en", "remove Chinese instructions with English prose replies unless English was asked for (BELLE)",
         True, _rule("zh_instruction_en_reply")),
    Step("lang", "keep records whose prompts are in --langs (fastText lid.176 after a script check; sets "
         "meta.lang; a prompt asking for a Japanese translation is Chinese)", True, _lang),
    Step("split", "split conversations over --max-tokens on turn boundaries (on when --tokenizer is given)",
         False, _split),
    Step("exact-dup", "remove exact duplicates of normalised text, keeping the first", True),
    Step("near-dup", "remove near duplicates (MinHash-LSH over character 5-grams), keeping the first", True),
]  # fmt: skip
"""Every step, in the order it runs (each is ``--NAME`` / ``--no-NAME`` on the command line)."""
STEP_BY_NAME = {s.name: s for s in STEPS}
DEDUP_STEPS = ("exact-dup", "near-dup")


def resolve_steps(flags: dict[str, bool | None], options: CleanOptions) -> list[str]:
    """The names of the steps that run: each flag given (True/False) wins, else the default
    (split defaults to on when a tokenizer is given). Unknown names raise :class:`ZhtuneError`."""
    unknown = set(flags) - set(STEP_BY_NAME)
    if unknown:
        raise ZhtuneError(
            f"unknown clean step(s): {', '.join(sorted(unknown))}; known: {', '.join(STEP_BY_NAME)}"
        )
    on = []
    for step in STEPS:
        default = step.default or (step.name == "split" and options.tokenizer is not None)
        flag = flags.get(step.name)
        if default if flag is None else flag:
            on.append(step.name)
    return on


# --------------------------------------------------------------------------- worker side


class Worker:
    """Runs the per-record steps on chunks of outcomes, with the resources they need (tokenizer,
    OpenCC, MinHash) built once per process, and counts what each step did."""

    def __init__(
        self,
        options: CleanOptions,
        steps: list[str],
        tokenizer: Any = None,
        mapping: dict[str, str] | None = None,
    ) -> None:
        from zhtune.data.dedup import MinHasher, optimal_bands

        self.options = options
        self.mapping = mapping or {}
        self.steps = [STEP_BY_NAME[n] for n in steps if STEP_BY_NAME[n].apply is not None]
        self.langs = {x.strip() for x in options.langs.split(",") if x.strip()}
        self.tokenizer = tokenizer
        self.bytes_bound = tokens_per_byte_bound(tokenizer) if tokenizer is not None else BYTES_BOUND
        self.exact = "exact-dup" in steps
        self.hasher = (
            MinHasher(options.num_perm, *optimal_bands(options.near_dup_threshold, options.num_perm))
            if "near-dup" in steps
            else None
        )
        self.counts: Counter[tuple[str, str]] = Counter()
        self.source_format: str | None = None
        """The input format of the record being cleaned (raw ShareGPT: html is the page's)."""
        self._opencc: Any = None
        self._seen: set[int] = set()

    @property
    def opencc(self) -> Any:
        if self._opencc is None:
            self._opencc = _load_opencc()
        return self._opencc

    def note(self, step: str, what: str, n: int = 1) -> None:
        self.counts[(step, what)] += n

    def count_tokens(self, texts: list[str]) -> list[int]:

        return [len(ids) for ids in encode_many(self.tokenizer, texts)]

    def outcomes(self, item: RawItem) -> list[Outcome]:
        """Parse (a JSON Lines line) and convert one raw record, as
        :func:`~zhtune.data.convert.iter_conversations` does, here in the worker so that the main
        process only reads lines."""

        path, line, index, original, fmt = item
        if isinstance(original, str):
            original = parse_json_line(original)
        if isinstance(original, RawError) or fmt is None:
            reason = original.reason if isinstance(original, RawError) else "no format"
            return [Outcome(path, line, None, reason=reason, fmt=fmt and fmt.name, index=index)]
        raw = apply_mapping(original, self.mapping)
        return list(convert_one(fmt, original, raw, path, line, index, chat=True))

    def run(self, chunk: list[RawItem]) -> tuple[list[tuple], Counter[tuple[str, str]]]:
        """What became of each raw record, in order, ready to write (serialised here, so the
        main process only judges duplicates and writes bytes): per record it becomes,
        ``("keep", (path, line, index), id, json_line, fingerprint)`` or ``("remove",
        rejects_line)``; and the counts of this chunk. The fingerprints of the chunk's kept
        records are computed together at the end."""

        self.counts = Counter()
        out: list[tuple] = []
        kept: list[dict[str, Any]] = []
        for item in chunk:
            self.note("read", "in")
            for o in self.outcomes(item):
                if o.record is None:
                    self.note("read", "removed")
                    out.append(("remove", dump_line(reject_entry(o, "read", o.reason, o.raw)).encode()))
                    continue
                records, self.source_format = [o.record], o.fmt
                for step in self.steps:
                    survivors = []
                    for rec in records:
                        self.note(step.name, "in")
                        result = step.apply(rec, self)
                        if isinstance(result, str):
                            self.note(step.name, "removed")
                            out.append(
                                ("remove", dump_line(reject_entry(o, step.name, result, rec)).encode())
                            )
                        else:
                            survivors.extend(result)
                    records = survivors
                for rec in records:
                    out.append(
                        ("keep", (o.path, o.line, o.index), rec["id"], dump_line(rec).encode(), len(kept))
                    )
                    kept.append(rec)
        fps = self.fingerprints(kept)
        out = [(*item[:4], fps[item[4]]) if item[0] == "keep" else item for item in out]
        return out, self.counts

    def fingerprints(self, records: list[dict[str, Any]]) -> list[Any]:
        """The dedup fingerprints of kept records, in order (all None when both dedup steps are
        off). A record whose exact key this worker has seen before gets no MinHash: the main
        process, going in input order, has that key already and judges it an exact duplicate."""
        if not (self.exact or self.hasher):
            return [None] * len(records)
        from zhtune.data.dedup import exact_key, fingerprints, normalise

        texts = [normalise(r["messages"]) for r in records]
        keys = [exact_key(text) for text in texts] if self.exact else None
        seen = set()
        if keys is not None and self.hasher:
            for i, key in enumerate(keys):
                if key in self._seen:
                    seen.add(i)
                self._seen.add(key)
        return fingerprints(texts, self.hasher, self.exact, seen, keys)


def _load_opencc() -> Any:
    try:
        import opencc
    except ImportError:
        raise ZhtuneError("--t2s needs OpenCC: pip install -c constraints.txt -e '.[clean]'") from None
    return opencc.OpenCC("t2s")


def _raw_items(paths: list[str], fmt: str, mapping: dict[str, str]) -> Iterator[RawItem]:
    """``(path, line, index, raw, format)`` for every raw record of every input: the reading half
    of :func:`~zhtune.data.convert.iter_conversations` (same format detection per file)."""

    named = None if fmt == "auto" else get_format(fmt)
    for path in paths:
        file_fmt = named
        for index, (line, original) in enumerate(iter_raw_lazy(path), 1):
            if file_fmt is None:
                parsed = parse_json_line(original) if isinstance(original, str) else original
                if not isinstance(parsed, RawError):
                    file_fmt = detect_file_format(path, apply_mapping(parsed, mapping))
            yield path, line, index, original, file_fmt


# --------------------------------------------------------------------------- main side


@dataclass
class StepCount:
    """What one step saw: records in, removed, and notes (converted, split, truncated...)."""

    name: str
    seen: int = 0
    removed: int = 0
    notes: dict[str, int] = field(default_factory=dict)


def reject_entry(o: Outcome, step: str, reason: str, record: Any, **extra: Any) -> dict[str, Any]:
    """A removed record as written to the rejects file: the step and reason first, then where it
    came from (file, line, record index), and the record as it was when removed."""
    rid = record.get("id") if isinstance(record, dict) and step != "read" else None
    entry = {"step": step, "reason": reason, "id": rid, "file": o.path, "line": o.line, "index": o.index}
    if step == "read":
        entry["field"] = o.field
    return {**entry, **extra, "record": record}


def format_clean_summary(
    counts: list[StepCount],
    written: int,
    output: str,
    rejects: str,
    seconds: float,
    clusters: dict,
    resumed_after: int = 0,
) -> str:
    """The table printed after ``zhtune data clean``: per step, records in, removed, share, and
    what it changed; dedup steps add their clusters and the largest one. ``resumed_after``: the
    records an interrupted run had done (the rate counts only this run's)."""
    read = counts[0].seen if counts else 0
    rate = (read - resumed_after) / seconds if seconds > 0 else 0.0
    resumed = (
        f" ({read - resumed_after:,} this run, resumed after {resumed_after:,})" if resumed_after else ""
    )
    lines = [
        f"cleaned {read:,} records{resumed} -> {written:,} written to {output} in {seconds:.1f} s "
        f"({rate:,.0f} records/s)",
        "",
        "| step | in | removed | share | notes |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for c in counts:
        share = f"{100 * c.removed / c.seen:.1f}%" if c.seen else "-"
        notes = [f"{k} {v:,}" for k, v in c.notes.items()]
        if c.name in clusters:
            n, largest = clusters[c.name]
            notes.append(f"{n:,} clusters, largest {largest}")
        lines.append(f"| {c.name} | {c.seen:,} | {c.removed:,} | {share} | {', '.join(notes)} |")
    removed = sum(c.removed for c in counts)
    if removed:
        lines.append(f"\nremoved records, with step and reason -> {rejects}")
    return "\n".join(lines)


def _dup_line(where: tuple[str, int, int], rid: str, verdict: Any, record_line: bytes) -> bytes:
    """The rejects line of a duplicate (:func:`reject_entry`'s layout, with ``duplicate_of``
    and ``similarity``), around the record's JSON line as the worker serialised it."""

    kind = "exact" if verdict.step == "exact-dup" else "near"
    path, line, index = where
    head = {"step": verdict.step, "reason": f"{kind} duplicate of {verdict.duplicate_of}", "id": rid,
            "file": path, "line": line, "index": index, "duplicate_of": verdict.duplicate_of,
            "similarity": verdict.similarity}  # fmt: skip
    return dump_line(head)[:-2].encode() + b', "record": ' + record_line[:-1] + b"}\n"


# --------------------------------------------------------------------------- checkpoints

#: Seconds between checkpoints of a running clean (files flushed, state written).
CHECKPOINT_SECONDS = 2.0


@dataclass
class _Checkpoint:
    """Where an interrupted clean stopped: ``OUT.partial`` and ``REJECTS.partial`` hold the
    output of the first ``read`` raw records in their first ``out_bytes`` / ``rejects_bytes``,
    and ``counts`` are the step counts up to there. Saved as ``OUT.partial.json`` with the
    ``key`` (inputs with their sizes and times, steps, options) it is valid for."""

    key: dict[str, Any]
    read: int = 0
    out_bytes: int = 0
    rejects_bytes: int = 0
    written: int = 0
    rejects: int = 0
    counts: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def make_key(
        paths: list[str], enabled: list[str], options: CleanOptions, fmt: str, mapping: dict
    ) -> dict:
        files = [[os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in paths]
        settings = {k: v for k, v in vars(options).items() if k != "workers"}  # (same output for any)
        return {"files": files, "steps": enabled, "options": settings, "format": fmt, "map": mapping}


def _load_checkpoint(path: str, key: dict[str, Any]) -> _Checkpoint | None:
    """The saved checkpoint when it is for the same inputs and settings, else None (with a line
    on stderr when one was there but is stale)."""
    import json

    try:
        saved = _Checkpoint(**json.loads(Path(path).read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as err:
        print(f"clean: ignoring unreadable checkpoint {path} ({err}); starting over", file=sys.stderr)
        return None
    if saved.key != json.loads(json.dumps(key)):
        print(f"clean: inputs or settings changed since {path} was written; starting over", file=sys.stderr)
        return None
    return saved


def _save_checkpoint(path: str, cp: _Checkpoint) -> None:
    import json

    tmp = f"{path}.tmp"
    Path(tmp).write_text(json.dumps(vars(cp)), encoding="utf-8")
    os.replace(tmp, path)


def _restore_dedup(deduper: Any, worker: Worker, out_path: str, rejects_path: str) -> None:
    """Rebuild the dedup index of an interrupted run from what it wrote: every kept record is
    checked again in order (they were kept, so they are again, and are indexed), and every
    duplicate in the rejects counts in its cluster (a near duplicate's exact key is remembered,
    as :meth:`~zhtune.data.dedup.Deduper.check` does)."""
    import json

    from zhtune.data.dedup import Verdict, exact_key, normalise

    with open(out_path, encoding="utf-8") as f:
        for lines in chunked(f, CHUNK):
            records = [json.loads(line) for line in lines]
            for rec, fp in zip(records, worker.fingerprints(records)):
                deduper.check(rec["id"], fp)
    with open(rejects_path, encoding="utf-8") as f:
        for line in f:
            entry = json.loads(line)
            if entry["step"] in DEDUP_STEPS:
                key = exact_key(normalise(entry["record"]["messages"]))
                deduper.remember(Verdict(entry["step"], entry["duplicate_of"], entry["similarity"]), key)


def _truncated(path: str, size: int) -> Any:
    """``path`` (created if missing) cut to ``size`` bytes and opened to write from there."""
    f = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+b")
    f.truncate(size)
    f.seek(size)
    return f


def clean_files(
    inputs: list[str],
    output: str,
    options: CleanOptions | None = None,
    steps: dict[str, bool | None] | None = None,
    fmt: str = "auto",
    mapping: dict[str, str] | None = None,
    rejects: str | None = None,
    progress: bool = True,
    restart: bool = False,
) -> dict[str, StepCount]:
    """``zhtune data clean``: stream ``inputs`` through the enabled steps into ``output``.

    ``steps`` switches steps on (True) or off (False) by name; None or missing keeps the default.
    Removed records go to ``rejects`` (default ``OUTPUT.rejects.jsonl``; a stale default file
    is removed when nothing was removed). Prints the summary table to stderr and returns the
    counts per step (``read`` first).

    Output is written to ``OUTPUT.partial`` (rejects to ``REJECTS.partial``) and renamed into
    place at the end; every :data:`CHECKPOINT_SECONDS` the files are flushed and
    ``OUTPUT.partial.json`` records how far they go. A run that is interrupted (Ctrl-C, a
    crash, a kill) and started again with the same inputs and settings goes on from the last
    checkpoint (``restart`` starts over), and its files are byte for byte those of an
    uninterrupted run.
    """
    from zhtune.data.dedup import Deduper

    options = options or CleanOptions()
    enabled = resolve_steps(steps or {}, options)
    paths = expand_inputs(inputs)
    if any(os.path.abspath(p) == os.path.abspath(output) for p in paths):
        raise ZhtuneError(f"output {output} is also an input; choose another output path")
    tokenizer = _check_resources(enabled, options)
    worker = Worker(options, enabled, tokenizer, mapping)
    deduper = Deduper(
        exact="exact-dup" in enabled,
        threshold=options.near_dup_threshold if "near-dup" in enabled else None,
        hasher=worker.hasher,
    )
    names = ["read", *enabled]
    counts = {n: StepCount(n) for n in names}
    rejects_path = rejects or default_rejects_path(output)
    out_partial, rejects_partial, state_path = (
        f"{output}.partial",
        f"{rejects_path}.partial",
        f"{output}.partial.json",
    )
    key = _Checkpoint.make_key(paths, enabled, options, fmt, mapping or {})
    cp = None if restart else _load_checkpoint(state_path, key)
    if cp is None:
        cp = _Checkpoint(key)
    resumed_after = cp.read
    if resumed_after:
        print(f"clean: resuming after {cp.read:,} records ({cp.written:,} written) from {out_partial}",
              file=sys.stderr)  # fmt: skip
        for name, c in cp.counts.items():
            counts[name] = StepCount(**c)
    start = time.perf_counter()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(rejects_path).parent.mkdir(parents=True, exist_ok=True)
    with (
        _truncated(out_partial, cp.out_bytes) as out,
        _truncated(rejects_partial, cp.rejects_bytes) as rejected,
        progress_bar("clean", progress, unit=" rec", initial=cp.read) as bar,
    ):
        if cp.read:
            _restore_dedup(deduper, worker, out_partial, rejects_partial)
        raw = itertools.islice(_raw_items(paths, fmt, mapping or {}), cp.read, None)
        last_saved = time.monotonic()
        for results, chunk_counts in ordered_map(worker.run, chunked(raw, CHUNK), options.workers):
            _add_counts(counts, chunk_counts)
            for item in results:
                if item[0] == "remove":
                    rejected.write(item[1])
                    cp.rejects += 1
                    continue
                _, where, rid, line, fp = item
                verdict = None
                if fp is not None:
                    for name in DEDUP_STEPS:
                        if name in counts:
                            counts[name].seen += 1
                    verdict = deduper.check(rid, fp)
                if verdict is None:
                    out.write(line)
                    cp.written += 1
                    continue
                counts[verdict.step].removed += 1
                if verdict.step == "exact-dup" and "near-dup" in counts:
                    counts["near-dup"].seen -= 1  # it never reached near-dup
                rejected.write(_dup_line(where, rid, verdict, line))
                cp.rejects += 1
            n = chunk_counts.get(("read", "in"), 0)
            cp.read += n
            bar.update(n)
            if time.monotonic() - last_saved >= CHECKPOINT_SECONDS:
                _checkpoint(state_path, cp, counts, out, rejected)
                last_saved = time.monotonic()
    os.replace(out_partial, output)
    if cp.rejects or rejects is not None:
        os.replace(rejects_partial, rejects_path)
    else:
        os.remove(rejects_partial)
        with suppress(FileNotFoundError):
            os.remove(rejects_path)
    with suppress(FileNotFoundError):
        os.remove(state_path)
    clusters = {n: deduper.cluster_stats(n) for n in DEDUP_STEPS if n in counts}
    print(
        format_clean_summary(
            list(counts.values()),
            cp.written,
            output,
            rejects_path,
            time.perf_counter() - start,
            clusters,
            resumed_after,
        ),
        file=sys.stderr,
    )
    return counts


def _add_counts(counts: dict[str, StepCount], chunk_counts: Counter[tuple[str, str]]) -> None:
    """Add a worker's counts of one chunk (``(step, "in" | "removed" | note) -> n``)."""
    for (name, what), n in chunk_counts.items():
        c = counts[name]
        if what == "in":
            c.seen += n
        elif what == "removed":
            c.removed += n
        else:
            c.notes[what] = c.notes.get(what, 0) + n


def _checkpoint(path: str, cp: _Checkpoint, counts: dict[str, StepCount], out: Any, rejected: Any) -> None:
    """Flush both files and save how far they go."""
    out.flush()
    rejected.flush()
    cp.out_bytes, cp.rejects_bytes = out.tell(), rejected.tell()
    cp.counts = {name: vars(c) for name, c in counts.items()}
    _save_checkpoint(path, cp)


def _check_resources(enabled: list[str], options: CleanOptions) -> Any:
    """Fail before reading anything when an enabled step lacks what it needs; returns the
    tokenizer for split (None when split is off)."""
    if "html" in enabled:
        try:
            import bs4  # noqa: F401
            import markdownify  # noqa: F401
        except ImportError:
            raise ZhtuneError("the html step needs markdownify: pip install -c constraints.txt -e '.[clean]' "
                              "(or turn it off with --no-html)") from None  # fmt: skip
    if "t2s" in enabled:
        _load_opencc()
    if "lang" in enabled:

        _fasttext_model()
        if not options.langs.strip():
            raise ZhtuneError("--langs is empty: name the languages to keep, e.g. --langs zh,en")
    if "near-dup" in enabled and not 0.0 < options.near_dup_threshold <= 1.0:
        raise ZhtuneError(f"--near-dup-threshold must be in (0, 1], got {options.near_dup_threshold}")
    if "split" not in enabled:
        return None
    if options.tokenizer is None:
        raise ZhtuneError("the split step needs a tokenizer to count tokens: --tokenizer DIR")
    if options.max_tokens < 2:
        raise ZhtuneError(f"--max-tokens must be at least 2, got {options.max_tokens}")
    from zhtune.data.stats import load_tokenizer

    return load_tokenizer(options.tokenizer)

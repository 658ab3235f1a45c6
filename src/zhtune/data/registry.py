"""A dataset registry: short names for local data files, with their format, column mapping and tags.

A registry is a YAML mapping ``name -> entry``::

    alpaca_zh:
      path: zh/alpaca_chinese_52k_v3.json     # relative to this YAML file (or absolute, ~ allowed);
                                              # a directory or a glob works too
      format: alpaca                          # optional (default: auto)
      map: {zh_instruction: instruction, zh_input: input, zh_output: output}   # optional, as --map
      tags: {lang: zh, task: MT, gen_method: SI}   # free-form; these three are shown by `data list`
      description: Alpaca 52k translated to Chinese

The tags follow Alpaca-CoT's data table: ``lang`` (EN / CN / ML, or zh / en), ``task`` (MT:
multi-task, TS: task-specific), ``gen_method`` (HG: human-generated, SI: self-instruct, MIX,
COL: a collection of datasets). Any other tag is kept and filterable (``--tag key=value``).

Where names are looked up, first match wins:

1. the registry named explicitly (``--registry FILE`` or the train config key ``registry``);
2. ``./datasets.yaml`` in the working directory;
3. the registry shipped with zhtune (``zhtune/configs/data/datasets.yaml``: the bundled quickstart data).

A train config's ``data: [...]`` (and ``zhtune data mix``) accepts registered names beside file
paths: an entry that exists as a path is a file, anything else must be a registered name.
:func:`load_data` is what training calls to turn those entries into records.
"""

from __future__ import annotations

import difflib
import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zhtune.config import read_yaml
from zhtune.data.convert import RejectWriter, iter_conversations
from zhtune.data.formats import get_format, sharegpt_tagged
from zhtune.errors import ZhtuneError

#: The registry shipped inside the package.
SHIPPED = Path(__file__).resolve().parent.parent / "configs" / "data" / "datasets.yaml"
#: The registry picked up from the working directory.
LOCAL = "datasets.yaml"
#: Tags shown as columns by ``zhtune data list`` (Alpaca-CoT's table).
SHOWN_TAGS = ("lang", "task", "gen_method")
_ENTRY_KEYS = {"path", "format", "map", "tags", "description"}


@dataclass(frozen=True)
class DatasetEntry:
    """One registered dataset."""

    name: str
    """The name used in train configs and ``zhtune data mix``."""
    path: str
    """File, directory or glob, resolved against the registry file's folder."""
    format: str = "auto"
    """Data format (see ``zhtune data convert``); auto detects it per file."""
    mapping: dict[str, str] = field(default_factory=dict)
    """Column renames applied before reading (``--map SRC=DST``)."""
    tags: dict[str, str] = field(default_factory=dict)
    """Free-form tags; lang, task and gen_method by convention."""
    description: str = ""
    """One line about the data."""
    registry: str = ""
    """The YAML (or dataset_info.json) file that defines this entry."""
    turns: dict[str, str] | None = None
    """ShareGPT turn layout (LLaMA-Factory's ``tags``: role_tag, content_tag, user_tag...); None
    for zhtune's own reading of the format."""
    unusable: str = ""
    """Why zhtune cannot read this entry (a dataset_info.json entry for DPO, images, the hub...),
    naming the field; "" when it can. Using the entry is then an error with this reason."""

    def exists(self) -> bool:
        """Whether the path (or glob) names at least one existing file or directory."""
        return (
            bool(glob.glob(self.path, recursive=True))
            if glob.has_magic(self.path)
            else os.path.exists(self.path)
        )


@dataclass(frozen=True)
class DataSource:
    """What a ``data:`` entry resolves to: paths plus the format and mapping to read them with."""

    label: str
    """The entry as written (a path or a registered name)."""
    paths: list[str]
    format: str
    mapping: dict[str, str]
    turns: dict[str, str] | None = None

    def reader_format(self) -> Any:
        """What :func:`~zhtune.data.convert.iter_conversations` reads it with: the format name, or
        the sharegpt format with this source's turn tags."""

        return sharegpt_tagged(self.turns) if self.turns is not None else self.format


# --------------------------------------------------------------------------------------------
# Reading registries
# --------------------------------------------------------------------------------------------
def _string_map(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ZhtuneError(f"{where}: must be a mapping of key: value, got {type(value).__name__}")
    for k, v in value.items():
        if isinstance(v, (dict, list)) or v is None:
            raise ZhtuneError(f"{where}.{k}: must be a string, got {v!r}")
    return {str(k): str(v) for k, v in value.items()}


def _entry(name: str, value: Any, source: Path) -> DatasetEntry:
    where = f"{source}: dataset '{name}'"
    if isinstance(value, str):  # shorthand `name: path`
        value = {"path": value}
    if not isinstance(value, dict):
        raise ZhtuneError(f"{where}: expected a mapping with at least 'path', got {type(value).__name__}")
    unknown = sorted(set(value) - _ENTRY_KEYS)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(_ENTRY_KEYS), n=1)
        hint = f" Did you mean: {close[0]}?" if close else ""
        raise ZhtuneError(
            f"{where}: unknown key '{unknown[0]}'.{hint} (keys: {', '.join(sorted(_ENTRY_KEYS))})"
        )
    path = value.get("path")
    if not isinstance(path, str) or not path.strip():
        raise ZhtuneError(f"{where}: field 'path' is required (a file, directory or glob)")
    fmt = value.get("format", "auto")
    if not isinstance(fmt, str):
        raise ZhtuneError(f"{where}: field 'format' must be a string, got {fmt!r}")
    if fmt != "auto":

        try:
            get_format(fmt)
        except ZhtuneError as err:
            raise ZhtuneError(f"{where}: field 'format': {err}") from None
    return DatasetEntry(
        name=name,
        path=_resolve(path, source),
        format=fmt,
        mapping=_string_map(value.get("map"), f"{where}: field 'map'"),
        tags=_string_map(value.get("tags"), f"{where}: field 'tags'"),
        description=str(value.get("description") or ""),
        registry=str(source),
    )


def _resolve(path: str, source: Path) -> str:
    expanded = os.path.expanduser(os.path.expandvars(path))
    return os.path.normpath(expanded if os.path.isabs(expanded) else str(source.resolve().parent / expanded))


# LLaMA-Factory's dataset_info.json: `columns` name -> the field zhtune's format reads it as
LF_COLUMNS = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output", "history": "history", "system": "system"},
    "sharegpt": {"messages": "conversations", "system": "system", "tools": "tools"},
}  # fmt: skip
#: dataset_info.json fields and columns zhtune cannot honour, with the reason.
LF_UNREADABLE = {
    "ranking": "ranking (preference) data is for DPO/reward training, which zhtune does not do",
    "columns.chosen": "preference data (chosen/rejected) is for DPO, which zhtune does not do",
    "columns.rejected": "preference data (chosen/rejected) is for DPO, which zhtune does not do",
    "columns.kto_tag": "KTO labels are for KTO training, which zhtune does not do",
    "columns.images": "zhtune trains text-only models",
    "columns.videos": "zhtune trains text-only models",
    "columns.audios": "zhtune trains text-only models",
}
LF_ENTRY_KEYS = {"file_name", "formatting", "columns", "tags", "ranking", "hf_hub_url", "ms_hub_url", "om_hub_url",
                 "script_url", "cloud_file_name", "subset", "split", "folder", "num_samples"}  # fmt: skip
LF_TAGS = (
    "role_tag",
    "content_tag",
    "user_tag",
    "assistant_tag",
    "observation_tag",
    "function_tag",
    "system_tag",
)


def _lf_problem(value: dict[str, Any]) -> str:
    """The first field of a dataset_info.json entry zhtune cannot read, with why ("" if none)."""
    columns = value.get("columns") or {}
    for key, why in LF_UNREADABLE.items():
        field_, _, column = key.partition(".")
        if (column and column in columns) or (not column and value.get(field_)):
            return f"field '{key}': {why}"
    if not value.get("file_name"):
        hub = next(
            (
                k
                for k in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
                if k in value
            ),
            "",
        )
        if hub:
            return f"field '{hub}': zhtune reads local files only; download the data and set file_name"
        return "field 'file_name' is missing"
    formatting = value.get("formatting", "alpaca")
    if formatting not in LF_COLUMNS:
        return f"field 'formatting': {formatting!r} is not one of {', '.join(LF_COLUMNS)}"
    unknown = sorted(set(columns) - set(LF_COLUMNS[formatting]))
    if unknown:
        return (
            f"field 'columns.{unknown[0]}': not a {formatting} column ({', '.join(LF_COLUMNS[formatting])})"
        )
    bad_tags = sorted(set(value.get("tags") or {}) - set(LF_TAGS))
    if bad_tags:
        return f"field 'tags.{bad_tags[0]}': not a sharegpt tag ({', '.join(LF_TAGS)})"
    return ""


def _lf_entry(name: str, value: Any, source: Path) -> DatasetEntry:
    """One entry of LLaMA-Factory's dataset_info.json (see the README's migration section)."""
    where = f"{source}: dataset '{name}'"
    if not isinstance(value, dict):
        raise ZhtuneError(f"{where}: expected a mapping with 'file_name', got {type(value).__name__}")
    unknown = sorted(set(value) - LF_ENTRY_KEYS)
    if unknown:
        raise ZhtuneError(
            f"{where}: unknown field '{unknown[0]}' (dataset_info.json fields: {', '.join(sorted(LF_ENTRY_KEYS))})"
        )
    for key in ("columns", "tags"):
        _string_map(value.get(key), f"{where}: field '{key}'")
    problem = _lf_problem(value)
    path = _resolve(str(value.get("file_name") or name), source)
    if problem:
        return DatasetEntry(name, path, registry=str(source), unusable=f"{where}: {problem}")
    formatting = value.get("formatting", "alpaca")
    columns = {**value.get("columns", {})}
    fmt, turns = formatting, None
    if formatting == "sharegpt":
        columns.setdefault("messages", "conversations")
        turns = {**value.get("tags", {})}
    elif "prompt" in columns and "response" not in columns:  # only a text column: pre-training text
        fmt, mapping = "text", {columns["prompt"]: "text"}
    if fmt != "text":
        mapping = {column: LF_COLUMNS[formatting][role] for role, column in columns.items()}
    return DatasetEntry(name, path, fmt, mapping, registry=str(source), turns=turns,
                        description=f"LLaMA-Factory {formatting}")  # fmt: skip


def read_registry(path: str | Path) -> dict[str, DatasetEntry]:
    """Read and validate one registry file (zhtune's YAML, or LLaMA-Factory's dataset_info.json:
    any ``.json``); errors name the file, the dataset and the field."""
    import json


    source = Path(path)
    if source.suffix == ".json":
        try:
            data = json.loads(source.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ZhtuneError(f"{source}: cannot read the dataset registry: {err}") from None
        if not isinstance(data, dict):
            raise ZhtuneError(f"{source}: a dataset_info.json must be a mapping of name: entry")
        return {str(name): _lf_entry(str(name), value, source) for name, value in data.items()}
    return {str(name): _entry(str(name), value, source) for name, value in read_yaml(source).items()}


def registry_files(explicit: str | None = None) -> list[Path]:
    """The registries consulted, highest priority first (see the module docstring)."""
    files: list[Path] = []
    if explicit:
        if not Path(explicit).is_file():
            raise ZhtuneError(f"dataset registry not found: {explicit}")
        files.append(Path(explicit))
    if Path(LOCAL).is_file():
        files.append(Path(LOCAL))
    files.append(SHIPPED)
    unique: dict[Path, Path] = {}
    for f in files:
        unique.setdefault(f.resolve(), f)
    return list(unique.values())


def load_registry(explicit: str | None = None) -> dict[str, DatasetEntry]:
    """Every registered dataset; a name in a higher-priority registry shadows the same name below."""
    merged: dict[str, DatasetEntry] = {}
    for f in reversed(registry_files(explicit)):
        if f.is_file():
            merged.update(read_registry(f))
    return merged


# --------------------------------------------------------------------------------------------
# Resolving data entries
# --------------------------------------------------------------------------------------------
def _looks_like_path(entry: str) -> bool:
    return glob.has_magic(entry) or os.path.exists(entry)


def resolve_sources(
    entries: list[str], registry: str | None = None, fmt: str = "auto", mapping: dict[str, str] | None = None
) -> list[DataSource]:
    """Turn ``data:`` entries (paths, globs or registered names) into :class:`DataSource` objects.

    A path keeps ``fmt`` and ``mapping`` (the config's own); a name brings its registered
    format and mapping (a config ``format`` other than auto still wins). An entry that is
    neither raises :class:`ZhtuneError` naming the registries searched and close names.
    """
    names: dict[str, DatasetEntry] | None = None
    sources = []
    for entry in entries:
        if _looks_like_path(entry):
            sources.append(DataSource(entry, [entry], fmt, dict(mapping or {})))
            continue
        if names is None:
            names = load_registry(registry)
        found = names.get(entry)
        if found is None:
            searched = ", ".join(str(f) for f in registry_files(registry) if f.is_file())
            close = difflib.get_close_matches(entry, list(names), n=3, cutoff=0.6)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ZhtuneError(
                f"data entry '{entry}': no such file, and no dataset of that name in the registries "
                f"({searched}).{hint} See `zhtune data list`."
            )
        if found.unusable:
            raise ZhtuneError(f"data entry '{entry}': {found.unusable}")
        if not found.exists():
            raise ZhtuneError(
                f"data entry '{entry}': registered in {found.registry} as {found.path}, which does not exist"
            )
        sources.append(
            DataSource(
                entry,
                [found.path],
                fmt if fmt != "auto" else found.format,
                {**found.mapping, **(mapping or {})},
                found.turns if fmt == "auto" else None,
            )
        )
    return sources


def iter_sources(sources: list[DataSource], chat: bool = True) -> Iterator[Any]:
    """Every :class:`~zhtune.data.convert.Outcome` of every source, each read with its own format."""

    for s in sources:
        yield from iter_conversations(s.paths, s.reader_format(), s.mapping, chat=chat)


def load_data(
    entries: list[str],
    fmt: str = "auto",
    registry: str | None = None,
    rejects_path: str | Path | None = None,
    max_samples: int = 0,
) -> tuple[list[dict[str, Any]], int]:
    """:func:`~zhtune.data.convert.load_conversations` for ``data:`` entries that may be registered
    names: all valid records in memory (at most ``max_samples`` of each entry when > 0, the first
    ones, as LLaMA-Factory's ``max_samples``), and the number rejected (written to ``rejects_path``)."""
    with RejectWriter(str(rejects_path) if rejects_path is not None else None) as rejects:
        records = load_records(entries, rejects, fmt, registry, max_samples)
    return records, rejects.count


def load_records(
    entries: list[str], rejects: RejectWriter, fmt: str = "auto", registry: str | None = None, max_samples: int = 0
) -> list[dict[str, Any]]:
    """:func:`load_data` into an open ``rejects`` writer, so that several sets (training and
    validation data) share one rejects file."""
    records: list[dict[str, Any]] = []
    for source in resolve_sources(entries, registry, fmt):
        taken = 0
        for o in iter_sources([source]):
            if o.record is not None:
                records.append(o.record)
                taken += 1
                if taken == max_samples:
                    break
            else:
                rejects.write(o)
    return records


# --------------------------------------------------------------------------------------------
# zhtune data list
# --------------------------------------------------------------------------------------------
def parse_tags(items: list[str]) -> dict[str, str]:
    """``["lang=zh", "task=MT"]`` -> ``{"lang": "zh", "task": "MT"}``."""
    out = {}
    for item in items:
        key, sep, value = (s.strip() for s in item.partition("="))
        if not (sep and key):
            raise ZhtuneError(f"bad tag filter {item!r}: expected KEY=VALUE, e.g. lang=zh")
        out[key] = value
    return out


def format_registry(entries: list[DatasetEntry]) -> str:
    """A markdown table: name, exists, format, the shown tags, path, description."""
    head = ["name", "exists", "format", *SHOWN_TAGS, "path", "description"]
    rows = [
        [
            e.name,
            "unusable" if e.unusable else "yes" if e.exists() else "NO",
            e.format,
            *(e.tags.get(t, "") for t in SHOWN_TAGS),
            e.path,
            e.unusable.partition("': ")[2] or e.description,
        ]
        for e in entries
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def list_command(registry: str | None = None, tags: list[str] | None = None, as_json: bool = False) -> int:
    """``zhtune data list``: print the registered datasets (filtered by ``tags``) and where they come from."""
    import json

    wanted = parse_tags(tags or [])
    entries = [
        e
        for e in load_registry(registry).values()
        if all(e.tags.get(k, "").lower() == v.lower() for k, v in wanted.items())
    ]
    entries.sort(key=lambda e: e.name)
    if as_json:
        rows = [
            {
                "name": e.name, "path": e.path, "exists": e.exists(), "format": e.format, "map": e.mapping,
                "tags": e.tags, "description": e.description, "registry": e.registry,
                "unusable": e.unusable,
            }
            for e in entries
        ]  # fmt: skip
        print(json.dumps(rows, ensure_ascii=False, indent=1))
        return 0
    files = ", ".join(str(f) for f in registry_files(registry) if f.is_file())
    print(f"{len(entries)} dataset(s) from {files}" + (f" with tags {wanted}" if wanted else ""))
    if entries:
        print(format_registry(entries))
    return 0

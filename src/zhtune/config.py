"""Typed configs: dataclasses filled from YAML plus ``key=value`` overrides, validated once.

Each config is a plain dataclass whose fields carry a docstring (a string literal right after the
field, as in litgpt); :func:`field_docs` reads those with ``ast`` so ``--help`` and the error
messages use the same text as the code. :func:`load_config` is the only place where untyped
input becomes a config object: unknown keys (with close matches), wrong types and missing
required values are reported here, naming the file and key, and nowhere else.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import re
import textwrap
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from zhtune.errors import ZhtuneError

C = TypeVar("C")
MISSING = dataclasses.MISSING
NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
"""A decimal number as text: YAML 1.1 (PyYAML) leaves ``1e-4`` and ``2.0e-5`` strings."""
NOTES = "translated"
"""The key under which a config class's ``translate_keys`` hook records what it translated."""


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Map each field of dataclass ``cls`` to the docstring written under it in the source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list[{_type_name(get_args(tp)[0])}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against type ``tp`` (converting int->float, str->list for list fields)."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ZhtuneError:
                continue
        raise ZhtuneError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in get_args(tp)], n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ZhtuneError(f"config key '{key}': {value!r} is not one of {_type_name(tp)}.{hint}")
    if origin is list:
        (item_tp,) = get_args(tp)
        items = value if isinstance(value, list) else [value]
        return [_coerce(v, item_tp, key) for v in items]
    if tp is type(None):
        if value is None:
            return None
        raise ZhtuneError(f"config key '{key}': expected null, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and NUMBER.fullmatch(value.strip()):
            return float(value)  # `lr: 2e-4` in YAML is the number it looks like, as on the command line
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif isinstance(value, tp):
        return value
    raise ZhtuneError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")


def coerce_value(cls: type, key: str, value: Any) -> Any:
    """``value`` as field ``key`` of dataclass ``cls`` takes it (a numeric string for a float
    field becomes the float, ...); the same rule :func:`build_config` applies, for callers that
    need the value before building (an experiment's axis labels)."""
    return _coerce(value, typing.get_type_hints(cls)[key], key)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Parse ``["lr=1e-4", "data=[a.jsonl,b.jsonl]"]``: each value is read as YAML."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ZhtuneError(f"override '{item}' is not of the form key=value")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as err:
            raise ZhtuneError(f"override '{item}': value is not valid YAML ({err})") from None
        out[key.strip()] = value  # a number YAML leaves a string (1e-4) is read by _coerce
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; errors name the file and line."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ZhtuneError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        loc = f"{p}:{mark.line + 1}" if mark else str(p)
        raise ZhtuneError(f"{loc}: invalid YAML: {getattr(err, 'problem', err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ZhtuneError(f"{p}: a config must be a mapping of key: value, got {type(data).__name__}")
    return data


def build_config(cls: type[C], values: dict[str, Any], source: str = "config") -> C:
    """Validate ``values`` against dataclass ``cls`` and build it.

    Unknown keys are errors with close matches; values are type-checked; fields without a
    default must be given. ``source`` names where the values came from, for messages.
    """
    values = translate_keys(cls, values, source)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    for key in values:
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=3, cutoff=0.6)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ZhtuneError(f"{source}: unknown config key '{key}'.{hint} (see --help for all keys)")
    kwargs = {key: _coerce(value, hints[key], key) for key, value in values.items()}
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs and f.default is MISSING and f.default_factory is MISSING
    ]
    if missing:
        raise ZhtuneError(f"{source}: missing required config key(s): {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except (ValueError, ZhtuneError) as err:
        raise ZhtuneError(f"{source}: {err}") from None


def translate_keys(cls: type, values: dict[str, Any], source: str) -> dict[str, Any]:
    """``values`` in ``cls``'s own keys: a config class that accepts another tool's keys (the
    train config takes LLaMA-Factory's) has a ``translate_keys(values, source)`` hook that
    rewrites them and lists what it did under :data:`NOTES`; its own keys pass unchanged."""
    hook = getattr(cls, "translate_keys", None)
    return hook(values, source) if hook is not None else values


def merge_layers(cls: type, layers: list[tuple[dict[str, Any], str]]) -> dict[str, Any]:
    """Later layers (``(values, source)``) win key by key, each translated first, so an override in
    zhtune's keys replaces the same setting written in another tool's keys; notes accumulate."""
    merged: dict[str, Any] = {}
    notes: list[str] = []
    for values, source in layers:
        values = dict(translate_keys(cls, values, source))
        notes += values.pop(NOTES, [])
        merged.update(values)
    return {**merged, NOTES: notes} if notes else merged


def load_config(cls: type[C], path: str | None, overrides: list[str] | None = None) -> C:
    """YAML file (optional) + ``key=value`` overrides -> validated ``cls`` instance."""
    layers = [(read_yaml(path), str(path))] if path else []
    layers.append((parse_overrides(overrides or []), "command line"))
    return build_config(cls, merge_layers(cls, layers), source=str(path) if path else "command line")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as a plain dict (for ``config.yaml``)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write a config as YAML, keys in declaration order, unicode kept readable."""
    import yaml

    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), encoding="utf-8")


def config_help(cls: type) -> str:
    """A ``--help`` section: each key with its type, default and docstring."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        if f.default is not MISSING:
            default = f"default: {f.default!r}"
        elif f.default_factory is not MISSING:
            default = f"default: {f.default_factory()!r}"
        else:
            default = "required"
        lines.append(f"  {f.name} ({_type_name(hints[f.name])}; {default})")
        if docs.get(f.name):
            lines.extend("      " + ln for ln in textwrap.wrap(docs[f.name], 88))
    return "\n".join(lines)

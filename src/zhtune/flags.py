"""Command-line flags generated from options dataclasses: one declaration per option.

Every stage describes its options once, as a dataclass whose field docstrings are the help text
(:func:`zhtune.config.field_docs`); :func:`add_options` turns it into ``--flags`` and
:func:`options_from` turns the parsed arguments back into the dataclass. Field types decide the
flag: ``bool`` is a switch ``--x`` (``--x / --no-x`` when on by default), ``list[str]`` is repeatable (or ``nargs="+"`` when
positional), ``str``/``int``/``float`` take one value, and a field that is itself an options
dataclass (composition, e.g. ``JudgeOptions.judge: EndpointOptions``) contributes its own fields,
under the prefix given in its metadata. Field metadata (:func:`flag`) adds what a type cannot say:
``positional``, ``short`` (``-o``), ``aliases`` (older spellings that keep working), ``choices``,
``metavar``, ``required``, and for a composed field ``prefix`` and ``skip`` (its fields left out).

Only the standard library is imported here, so building the parser stays instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from zhtune.config import field_docs

__all__ = ["add_options", "flag", "options_from"]


def flag(
    *,
    default: Any = dataclasses.MISSING,
    default_factory: Any = dataclasses.MISSING,
    positional: bool = False,
    short: str = "",
    aliases: tuple[str, ...] | dict[str, tuple[str, ...]] = (),
    choices: tuple[str, ...] = (),
    metavar: str = "",
    required: bool = False,
    prefix: str = "",
    skip: tuple[str, ...] = (),
    cli: bool = True,
) -> Any:
    """A dataclass field with command-line metadata (see the module docstring). ``cli=False``
    keeps a field out of the parser (set by code, or by another flag)."""
    meta = {
        "positional": positional, "short": short, "aliases": aliases, "choices": choices,
        "metavar": metavar, "required": required, "prefix": prefix, "skip": skip, "cli": cli,
    }  # fmt: skip
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _unwrap_optional(tp: Any) -> Any:
    """``str | None`` -> ``str`` (an empty or missing flag keeps the None default)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return tp


def _is_options(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _is_list(tp: Any) -> bool:
    return typing.get_origin(tp) is list


def add_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    skip: tuple[str, ...] = (),
    prefix: str = "",
    dest: str = "",
    defaults: Any = None,
    renamed: dict[str, tuple[str, ...]] | None = None,
) -> None:
    """Add one argument per field of the options dataclass ``cls`` to ``parser``.

    ``prefix`` goes before every flag name (``judge-`` gives ``--judge-model``), ``dest`` before
    every destination (nested options use ``"judge."``), ``defaults`` is an instance whose values
    are the defaults (a composed field's own default, e.g. a judge's ``max_tokens=1024``), and
    ``skip`` names fields left out (the command sets them itself). ``renamed`` maps a field to
    extra spellings of its flag (a composed field's ``aliases`` metadata, a dict, gives them)."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if f.name in skip or not meta.get("cli", True):
            continue
        tp = _unwrap_optional(hints[f.name])
        default = getattr(defaults, f.name) if defaults is not None else _default(f)
        if _is_options(tp):
            add_options(
                parser, tp, prefix=prefix + meta.get("prefix", ""), dest=f"{dest}{f.name}.", defaults=default,
                renamed=dict(meta.get("aliases") or {}), skip=meta.get("skip", ()),
            )  # fmt: skip
            continue
        name = prefix + f.name.replace("_", "-")
        help_text = docs.get(f.name, "").rstrip(".")
        kwargs: dict[str, Any] = {"help": help_text}
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if meta.get("positional"):
            kwargs["help"] = help_text
            if _is_list(tp):
                kwargs["nargs"] = "+"
            elif f.default is not dataclasses.MISSING:
                kwargs.update(nargs="?", default=default)
            if meta.get("metavar"):
                kwargs["metavar"] = meta["metavar"]
            parser.add_argument(dest + f.name, **kwargs)
            continue
        extra = (*meta.get("aliases", ()), *(renamed or {}).get(f.name, ()))
        flags = [*([meta["short"]] if meta.get("short") else []), "--" + name, *extra]
        kwargs["dest"] = dest + f.name
        if meta.get("required"):
            kwargs["required"] = True
        else:
            kwargs["default"] = default
            if not (_is_list(tp) and not default):
                kwargs["help"] = f"{help_text} (default: {default})"
        if tp is bool:  # off by default: a switch (--trust-remote-code); on: --x / --no-x
            kwargs["action"] = argparse.BooleanOptionalAction if default else "store_true"
        elif _is_list(tp):
            (item,) = typing.get_args(tp)
            kwargs.update(type=item, action="append", metavar=meta.get("metavar") or f.name.upper())
            kwargs["default"] = None
        else:
            kwargs["type"] = tp
            if meta.get("metavar") or not meta.get("choices"):  # choices show themselves: {a,b}
                kwargs["metavar"] = meta.get("metavar") or f.name.upper()
        parser.add_argument(*flags, **kwargs)


def options_from(cls: type, args: argparse.Namespace, dest: str = "", base: Any = None) -> Any:
    """The options dataclass ``cls`` built from parsed ``args``: fields the parser did not get keep
    the value in ``base`` (or their defaults); composed options are built the same way, from their
    own default (a judge's ``max_tokens=1024``)."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key, tp = dest + f.name, _unwrap_optional(hints[f.name])
        if _is_options(tp):
            if any(k.startswith(key + ".") for k in vars(args)):
                inner = getattr(base, f.name) if base is not None else _default(f)
                values[f.name] = options_from(tp, args, key + ".", inner)
        elif hasattr(args, key):
            value = getattr(args, key)
            if _is_list(tp) and value is None:
                value = getattr(base, f.name) if base is not None else _default(f)
            values[f.name] = value
    return dataclasses.replace(base, **values) if base is not None else cls(**values)

"""Build an options dataclass from flat field names, as its flags spell them: composed options
(``GenerateOptions.teacher.endpoint.base_url``) are filled by their own field names
(``base_url=...``), so a test reads like the command line."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any


def _fields(cls: type) -> dict[str, Any]:
    return {f.name: f for f in dataclasses.fields(cls)}


def flat(cls: type, **values: Any) -> Any:
    """``cls`` with ``values`` set on itself or on its composed options (first match, depth first);
    an unknown name is a TypeError, as for the constructor."""
    hints = typing.get_type_hints(cls)
    own = {k: values.pop(k) for k in list(values) if k in _fields(cls)}
    for name, f in _fields(cls).items():
        tp = hints[name]
        if name in own or not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else tp()
        inner = {k: values.pop(k) for k in list(values) if _reaches(tp, k)}
        if inner:
            given = flat(tp, **inner)
            own[name] = dataclasses.replace(
                default, **{k: getattr(given, k) for k in _fields(tp) if getattr(given, k) != getattr(tp(), k)}
            )
    if values:
        raise TypeError(f"{cls.__name__} has no option {', '.join(values)}")
    return cls(**own)


def _reaches(cls: type, name: str) -> bool:
    hints = typing.get_type_hints(cls)
    return name in _fields(cls) or any(
        isinstance(hints[n], type) and dataclasses.is_dataclass(hints[n]) and _reaches(hints[n], name)
        for n in _fields(cls)
    )

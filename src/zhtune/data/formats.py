"""Format adapters: a raw record of a known dataset layout -> canonical messages.

Each layout is one :class:`Format` in the :data:`FORMATS` registry (data, not ``if`` chains):
the fields that identify it, the fields it consumes, and a function that builds the messages.
:func:`detect_format` picks the first registered format whose identifying fields are present,
so the registry order decides ties.

=========  ===========================================================================
alpaca     ``{instruction, input?, output, system?, history?: [[q, a], ...]}``; an
           ``instruction`` that starts with ``Human:`` is BELLE's multi-turn text
belle      ``{input, target}``; ``input`` may be ``Human: ...\\nAssistant: ...\\nHuman: ...``
sharegpt   ``{conversations: [{from, value} | {role, content}], system?}``
openai     ``{messages: [{role, content}]}``; content may be a list of text parts
seed       self-instruct seed tasks ``{instruction, instances: [{input, output}]}``, one
           record per instance
text       ``{text}``: plain text for pre-training
=========  ===========================================================================

The ``text`` format is not a conversation. It yields
``{"id", "messages": [{"role": "assistant", "content": text}], "meta": {"kind": "text"}}``:
the single assistant message keeps the one record shape (so stats, mixing and dedup need no
second code path) and marks the text as what the model learns. Such records are *not* checked
with :func:`~zhtune.data.schema.validate_record` (which requires a user turn first);
``Format.chat`` is False for it. A pre-training stage reads ``messages[0]["content"]``.

Adapters raise :class:`~zhtune.data.schema.RecordError` naming the offending field; unknown
extra fields are ignored (callers count them, see :func:`ignored_fields`).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from zhtune.data.schema import RecordError
from zhtune.errors import ZhtuneError

Messages = list[dict[str, str]]

#: Raw fields carried into ``meta`` whatever the format (``source`` is stored as ``origin``,
#: since ``meta.source`` is the input file). A raw ``meta``/``metadata`` object is merged too.
CARRIED = {"category": "category", "class": "class", "tags": "tags", "source": "origin"}
#: Fields every format accepts without counting them as ignored.
COMMON = frozenset({"id", "meta", "metadata", *CARRIED})


@dataclass(frozen=True)
class Format:
    """One dataset layout.

    ``keys`` identify it in :func:`detect_format`; ``known`` are all fields it consumes (others
    are reported as ignored); ``to_messages`` builds canonical messages from one raw record;
    ``explode`` splits one raw record into several (seed tasks: one per instance); ``chat`` is
    False for plain text, whose records skip conversation validation; ``meta`` maps extra raw
    fields to meta keys.
    """

    name: str
    keys: tuple[str, ...]
    known: frozenset[str]
    to_messages: Callable[[dict[str, Any]], Messages]
    explode: Callable[[dict[str, Any]], list[dict[str, Any]]] | None = None
    chat: bool = True
    meta: dict[str, str] = field(default_factory=dict)
    doc: str = ""


# --------------------------------------------------------------------------- field access


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _str(raw: dict[str, Any], key: str, required: bool = True, where: str | None = None) -> str:
    """``raw[key]`` as a string; missing/None is an error if ``required``, else ``""``."""
    value = raw.get(key)
    name = where or key
    if value is None:
        if required:
            raise RecordError(name, "missing")
        return ""
    if not isinstance(value, str):
        raise RecordError(name, f"must be a string, got {_type_name(value)}")
    return value


def _list(raw: dict[str, Any], key: str, required: bool = True) -> list[Any]:
    """``raw[key]`` as a list; missing/None is an error if ``required``, else ``[]``."""
    value = raw.get(key)
    if value is None:
        if required:
            raise RecordError(key, "missing")
        return []
    if not isinstance(value, list):
        raise RecordError(key, f"must be a list, got {_type_name(value)}")
    return value


def _msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


# --------------------------------------------------------------------------- BELLE markers

_MARKER = re.compile(r"^[ \t]*(Human|Assistant)[ \t]*[:：]", re.MULTILINE)
_MARKER_ROLES = {"Human": "user", "Assistant": "assistant"}


def split_dialogue(text: str) -> Messages | None:
    """Split BELLE's ``Human: ...\\n\\nAssistant: ...`` text into messages.

    Markers count only at line starts, with a half-width ``:`` or full-width ``：``. Returns
    None when ``text`` does not start with a marker (it is then a plain prompt). A trailing
    empty ``Assistant:`` (the slot the target fills) is dropped.
    """
    parts = _MARKER.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    messages = [_msg(_MARKER_ROLES[who], body.strip()) for who, body in zip(parts[1::2], parts[2::2])]
    if messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


# --------------------------------------------------------------------------- adapters


def _alpaca_history(raw: dict[str, Any]) -> Messages:
    messages: Messages = []
    for i, pair in enumerate(_list(raw, "history", required=False)):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise RecordError(f"history[{i}]", "must be a [question, answer] pair of strings")
        messages += [_msg("user", pair[0]), _msg("assistant", pair[1])]
    return messages


def alpaca_messages(raw: dict[str, Any]) -> Messages:
    """Alpaca: optional system, history pairs, then ``instruction\\ninput`` -> ``output``."""
    system = _str(raw, "system", required=False)
    instruction = _str(raw, "instruction")
    extra = _str(raw, "input", required=False)
    output = _str(raw, "output")
    messages = [_msg("system", system)] if system.strip() else []
    messages += _alpaca_history(raw)
    dialogue = split_dialogue(instruction) if not extra.strip() else None
    if dialogue is not None:  # BELLE multiturn_chat: the whole dialogue sits in `instruction`
        messages += dialogue
    else:
        messages.append(_msg("user", "\n".join(p for p in (instruction, extra) if p.strip())))
    return [*messages, _msg("assistant", output)]


def belle_messages(raw: dict[str, Any]) -> Messages:
    """BELLE ``{input, target}``: ``input`` is one prompt or a Human/Assistant dialogue."""
    prompt = _str(raw, "input")
    target = _str(raw, "target")
    dialogue = split_dialogue(prompt)
    return [*(dialogue if dialogue is not None else [_msg("user", prompt)]), _msg("assistant", target)]


#: ShareGPT speaker names -> canonical roles.
SPEAKERS = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "system": "system",
}


def _sharegpt_turn(i: int, turn: Any) -> dict[str, str]:
    where = f"conversations[{i}]"
    if not isinstance(turn, dict):
        raise RecordError(where, f"must be an object, got {_type_name(turn)}")
    who_key, text_key = ("from", "value") if "from" in turn else ("role", "content")
    who = _str(turn, who_key, where=f"{where}.{who_key}")
    role = SPEAKERS.get(who.lower())
    if role is None:
        raise RecordError(
            f"{where}.{who_key}", f"unknown speaker {who!r} (expected one of {', '.join(SPEAKERS)})"
        )
    return _msg(role, _str(turn, text_key, where=f"{where}.{text_key}"))


#: LLaMA-Factory's sharegpt layout by default (its dataset_info.json ``tags``).
SHAREGPT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
#: The tags naming a speaker, and the role each one is.
TAG_ROLES = {"user_tag": "user", "assistant_tag": "assistant", "system_tag": "system"}
#: Tool-calling speakers: recognised, but their turns cannot be trained on (no tool role).
TOOL_TAGS = ("observation_tag", "function_tag")


def sharegpt_tagged(tags: dict[str, str]) -> Format:
    """The sharegpt format with LLaMA-Factory's ``tags`` (``role_tag``, ``content_tag``,
    ``user_tag``...; the others keep :data:`SHAREGPT_TAGS`): ``conversations`` of
    ``{role_tag: speaker, content_tag: text}``. A tool-call turn rejects its record."""
    t = {**SHAREGPT_TAGS, **tags}
    speakers = {t[tag]: role for tag, role in TAG_ROLES.items()}
    tools = {t[tag] for tag in TOOL_TAGS}

    def turn(i: int, item: Any) -> dict[str, str]:
        where = f"conversations[{i}]"
        if not isinstance(item, dict):
            raise RecordError(where, f"must be an object, got {_type_name(item)}")
        who = _str(item, t["role_tag"], where=f"{where}.{t['role_tag']}")
        if who in tools:
            raise RecordError(f"{where}.{t['role_tag']}", f"tool-call turns ({who!r}) are not supported")
        if who not in speakers:
            raise RecordError(
                f"{where}.{t['role_tag']}", f"unknown speaker {who!r} (tags: {', '.join(speakers)})"
            )
        return _msg(speakers[who], _str(item, t["content_tag"], where=f"{where}.{t['content_tag']}"))

    def to_messages(raw: dict[str, Any]) -> Messages:
        messages = [turn(i, item) for i, item in enumerate(_list(raw, "conversations"))]
        system = _str(raw, "system", required=False)
        if system.strip() and not (messages and messages[0]["role"] == "system"):
            messages.insert(0, _msg("system", system))
        return messages

    return replace(FORMATS["sharegpt"], to_messages=to_messages, known=FORMATS["sharegpt"].known | {"tools"})


def sharegpt_messages(raw: dict[str, Any]) -> Messages:
    """ShareGPT/Vicuna: ``conversations`` of ``{from, value}`` (or ``{role, content}``)."""
    messages = [_sharegpt_turn(i, t) for i, t in enumerate(_list(raw, "conversations"))]
    system = _str(raw, "system", required=False)
    if system.strip() and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, _msg("system", system))
    return messages


def _openai_content(where: str, content: Any) -> str:
    """A message's content: a string, or a list of ``{type: "text", text}`` parts joined by newlines."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RecordError(where, f"must be a string or a list of text parts, got {_type_name(content)}")
    texts = []
    for j, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            kind = part.get("type") if isinstance(part, dict) else _type_name(part)
            raise RecordError(f"{where}[{j}]", f"only text parts are supported, got {kind!r}")
        texts.append(part["text"])
    return "\n".join(texts)


def openai_messages(raw: dict[str, Any]) -> Messages:
    """OpenAI chat ``messages`` (also the canonical record itself); ``developer`` means system."""
    messages = []
    for i, m in enumerate(_list(raw, "messages")):
        if not isinstance(m, dict):
            raise RecordError(f"messages[{i}]", f"must be an object, got {_type_name(m)}")
        role = _str(m, "role", where=f"messages[{i}].role")
        role = "system" if role == "developer" else role
        messages.append(_msg(role, _openai_content(f"messages[{i}].content", m.get("content"))))
    return messages


def seed_instances(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """Self-instruct seed task -> one Alpaca-like record per ``instances`` item."""
    instruction = _str(raw, "instruction")
    out = []
    for i, inst in enumerate(_list(raw, "instances")):
        if not isinstance(inst, dict):
            raise RecordError(f"instances[{i}]", f"must be an object, got {_type_name(inst)}")
        for key in ("input", "output"):
            _str(inst, key, required=key == "output", where=f"instances[{i}].{key}")
        out.append({"instruction": instruction, "input": inst.get("input") or "", "output": inst["output"]})
    if not out:
        raise RecordError("instances", "empty (no input/output example)")
    return out


def text_messages(raw: dict[str, Any]) -> Messages:
    """Plain text for pre-training: one assistant message holding the text (see module doc)."""
    text = _str(raw, "text")
    if not text.strip():
        raise RecordError("text", "empty")
    return [_msg("assistant", text)]


def _format(name: str, keys: tuple[str, ...], optional: tuple[str, ...], to_messages, **kw: Any) -> Format:
    return Format(name, keys, frozenset({*keys, *optional}), to_messages, **kw)


#: The registry, in detection order.
FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        _format("openai", ("messages",), (), openai_messages, doc="{messages: [{role, content}]}"),
        _format(
            "sharegpt",
            ("conversations",),
            ("system",),
            sharegpt_messages,
            doc="{conversations: [{from, value}]}",
        ),
        _format(
            "seed",
            ("instruction", "instances"),
            ("name", "is_classification"),
            alpaca_messages,
            explode=seed_instances,
            meta={"name": "task"},
            doc="{instruction, instances: [{input, output}]}",
        ),
        _format(
            "alpaca",
            ("instruction", "output"),
            ("input", "system", "history"),
            alpaca_messages,
            doc="{instruction, input?, output, system?, history?}",
        ),
        _format("belle", ("input", "target"), (), belle_messages, doc="{input, target}"),
        _format("text", ("text",), (), text_messages, chat=False, doc="{text}"),
    )
}


def detect_format(raw: dict[str, Any]) -> str | None:
    """The name of the first registered format whose identifying keys are all in ``raw``."""
    for fmt in FORMATS.values():
        if all(key in raw for key in fmt.keys):
            return fmt.name
    return None


def get_format(name: str) -> Format:
    """Look up a format by name; an unknown name raises :class:`ZhtuneError` with close matches."""
    try:
        return FORMATS[name]
    except KeyError:
        close = difflib.get_close_matches(name, FORMATS, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        raise ZhtuneError(f"unknown format {name!r}; {hint}(formats: auto, {', '.join(FORMATS)})") from None


def describe_formats() -> str:
    """One line per format, ``name: layout``, for error messages and ``--help``."""
    return "\n".join(f"  {f.name}: {f.doc}" for f in FORMATS.values())


def ignored_fields(fmt: Format, raw: dict[str, Any]) -> list[str]:
    """The fields of ``raw`` that ``fmt`` does not consume (reported, never an error)."""
    return [key for key in raw if key not in fmt.known and key not in COMMON and key not in fmt.meta]


def apply_mapping(raw: dict[str, Any], mapping: dict[str, str]) -> dict[str, Any]:
    """Rename source columns to target fields, e.g. ``{"zh_instruction": "instruction"}``.

    A mapped column that is present replaces a field of the target name (so with
    ``zh_output=output`` the ``zh_output`` value wins over a raw ``output``); unmapped fields
    pass through unchanged.
    """
    if not mapping:
        return raw
    targets = {dst for src, dst in mapping.items() if src in raw}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in mapping:
            out[mapping[key]] = value
        elif key not in targets:
            out[key] = value
    return out

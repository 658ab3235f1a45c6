"""The canonical record every reader produces and every stage consumes.

A record is a plain JSON-serialisable dict (one line of a ``.jsonl`` file)::

    {"id": "alpaca-17",
     "messages": [{"role": "system", "content": "..."},      # optional, first only
                  {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...],
     "meta": {"source": "alpaca_zh.json", "lang": "zh"}}

Turns alternate user/assistant after the optional system message. A record meant for training
must contain at least one assistant turn.
"""

from __future__ import annotations

from typing import Any

ROLES = ("system", "user", "assistant")


class RecordError(ValueError):
    """A record that cannot be used; ``field`` names the offending field (``messages[2].role``)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"field '{field}': {reason}")
        self.field = field
        self.reason = reason


def make_record(
    messages: list[dict[str, str]], id: str, meta: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Build a canonical record and validate it (raises :class:`RecordError`)."""
    record = {"id": id, "messages": messages, "meta": dict(meta or {})}
    validate_record(record)
    return record


def validate_record(record: dict[str, Any], require_assistant: bool = True) -> None:
    """Check the canonical shape; raise :class:`RecordError` naming the first bad field.

    Rules: ``messages`` is a non-empty list of ``{role, content}`` with string content; a
    ``system`` message may only come first; user and assistant turns alternate starting with
    ``user``; with ``require_assistant`` there is at least one non-empty assistant turn.
    """
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RecordError("messages", "must be a non-empty list of {role, content}")
    expected = "user"
    n_assistant = 0
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise RecordError(f"messages[{i}]", f"must be an object, got {type(msg).__name__}")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise RecordError(
                f"messages[{i}].role", f"unknown role {role!r} (expected one of {', '.join(ROLES)})"
            )
        if not isinstance(content, str):
            raise RecordError(f"messages[{i}].content", f"must be a string, got {type(content).__name__}")
        if role == "system":
            if i != 0:
                raise RecordError(f"messages[{i}].role", "a system message may only come first")
            continue
        if role != expected:
            raise RecordError(
                f"messages[{i}].role", f"expected '{expected}' (turns must alternate user/assistant)"
            )
        if not content.strip():
            raise RecordError(f"messages[{i}].content", f"empty {role} turn")
        if role == "assistant":
            n_assistant += 1
        expected = "assistant" if role == "user" else "user"
    if require_assistant and n_assistant == 0:
        raise RecordError("messages", "no assistant turn (nothing to learn from)")

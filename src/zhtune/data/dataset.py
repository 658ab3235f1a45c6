"""Canonical records -> tokenized training examples -> padded batches."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from zhtune.data.templates import IGNORE_INDEX, Template, render


@dataclass
class Tokenized:
    """The outcome of tokenizing a set of records."""

    examples: list[dict[str, list[int]]] = field(default_factory=list)
    """``{"input_ids", "labels"}`` per kept record."""
    rejects: list[dict[str, Any]] = field(default_factory=list)
    """``{"id", "reason"}`` per record that could not be used."""
    n_truncated: int = 0
    """Kept records that were cut to ``cutoff_len``."""


def tokenize_records(
    records: Iterable[dict[str, Any]],
    tokenizer: Any,
    template: Template | None,
    cutoff_len: int,
    train_on_prompt: bool = False,
) -> Tokenized:
    """Render every record with :func:`render`, cut it to ``cutoff_len`` tokens, and keep it
    if at least one labelled token survives (otherwise it is rejected with the reason)."""
    out = Tokenized()
    for rec in records:
        input_ids, labels = render(template, rec["messages"], tokenizer, train_on_prompt)
        if len(input_ids) > cutoff_len:
            input_ids, labels = input_ids[:cutoff_len], labels[:cutoff_len]
            out.n_truncated += 1
        if all(label == IGNORE_INDEX for label in labels[1:]):
            out.rejects.append(
                {
                    "id": rec.get("id"),
                    "reason": f"no response token within cutoff_len={cutoff_len} (prompt too long)",
                }
            )
            continue
        out.examples.append({"input_ids": input_ids, "labels": labels})
    return out


def pad_batch(examples: list[dict[str, list[int]]], pad_id: int, multiple_of: int = 8) -> dict[str, Any]:
    """Right-pad a list of examples into tensors ``input_ids``, ``attention_mask``, ``labels``
    of shape ``(batch, length)``, ``length`` rounded up to ``multiple_of``."""
    import torch

    longest = max(len(ex["input_ids"]) for ex in examples)
    length = -(-longest // multiple_of) * multiple_of
    n = len(examples)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    for i, ex in enumerate(examples):
        k = len(ex["input_ids"])
        input_ids[i, :k] = torch.tensor(ex["input_ids"])
        labels[i, :k] = torch.tensor(ex["labels"])
        attention_mask[i, :k] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

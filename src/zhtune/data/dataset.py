"""Canonical records -> tokenized training examples -> padded batches."""

from __future__ import annotations

import gc
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from zhtune.data.chat_template import ChatTemplateMasker, RenderError
from zhtune.data.readers import chunked
from zhtune.data.templates import IGNORE_INDEX, Template, render_batch

#: Records rendered per tokenizer call.
RENDER_BATCH = 512


@dataclass
class Tokenized:
    """The outcome of tokenizing a set of records."""

    examples: list[dict[str, list[int]]] = field(default_factory=list)
    """``{"input_ids", "labels"}`` per kept record."""
    rejects: list[dict[str, Any]] = field(default_factory=list)
    """``{"id", "reason"}`` per record that could not be used."""
    truncated: list[dict[str, Any]] = field(default_factory=list)
    """``{"id", "tokens", "kept", "lost_response_tokens"}`` per kept record cut to ``cutoff_len``."""

    @property
    def n_truncated(self) -> int:
        """Kept records that were cut to ``cutoff_len``."""
        return len(self.truncated)


def tokenize_records(
    records: Iterable[dict[str, Any]],
    tokenizer: Any,
    template: Template | None,
    cutoff_len: int,
    train_on_prompt: bool = False,
) -> Tokenized:
    """Render every record with :func:`render` (a batch of records per tokenizer call), cut it to
    ``cutoff_len`` tokens, and keep it if at least one labelled token survives (otherwise it is
    rejected with the reason).

    The garbage collector is paused meanwhile: the examples are two new lists each and make no
    reference cycles, but a dataset's worth of them would make the collector walk the growing
    heap again and again (a sixth of the time at 150k records)."""
    out = Tokenized()
    masker = ChatTemplateMasker(tokenizer) if template is None else None
    with _gc_paused():
        for chunk in chunked(records, RENDER_BATCH):
            conversations = [rec["messages"] for rec in chunk]
            if masker is not None:  # the tokenizer's own template: a conversation it cannot mask is rejected
                rendered = masker.render_batch(conversations, train_on_prompt)
            else:
                rendered = render_batch(template, conversations, tokenizer, train_on_prompt)
            for rec, item in zip(chunk, rendered):
                if isinstance(item, RenderError):
                    out.rejects.append({"id": rec.get("id"), "reason": str(item)})
                else:
                    _keep(out, rec, *item, cutoff_len)
    return out


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Automatic garbage collection off inside the block (back to how it was after)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _keep(
    out: Tokenized, rec: dict[str, Any], input_ids: list[int], labels: list[int], cutoff_len: int
) -> None:
    """Add one rendered record to ``out``: cut to ``cutoff_len`` (noted in ``out.truncated``),
    or rejected if no labelled token survives."""
    if len(input_ids) > cutoff_len:
        lost = sum(label != IGNORE_INDEX for label in labels[cutoff_len:])
        out.truncated.append(
            {
                "id": rec.get("id"),
                "tokens": len(input_ids),
                "kept": cutoff_len,
                "lost_response_tokens": lost,
            }
        )
        input_ids, labels = input_ids[:cutoff_len], labels[:cutoff_len]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        out.rejects.append(
            {
                "id": rec.get("id"),
                "reason": f"no response token within cutoff_len={cutoff_len} (prompt too long)",
            }
        )
        return
    out.examples.append({"input_ids": input_ids, "labels": labels})


def tokenize_texts(
    records: Iterable[dict[str, Any]], tokenizer: Any, block_size: int
) -> tuple[list[dict[str, list[int]]], int]:
    """Pre-training data: every record's text (its message contents joined by newlines) is
    tokenized, followed by eos, concatenated into one stream and cut into ``block_size`` blocks
    whose labels are the inputs. Returns ``(blocks, n_documents)``; the last block may be short."""
    stream: list[int] = []
    n_docs = 0
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for rec in records:
        text = "\n".join(m["content"] for m in rec["messages"])
        stream.extend(bos + tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id])
        n_docs += 1
    blocks = []
    for i in range(0, len(stream), block_size):
        chunk = stream[i : i + block_size]
        if len(chunk) > 1:
            blocks.append({"input_ids": chunk, "labels": list(chunk)})
    return blocks, n_docs


def pack_examples(examples: list[dict[str, list[int]]], max_len: int) -> list[dict[str, list[int]]]:
    """Pack examples into sequences of at most ``max_len`` tokens (first-fit decreasing).

    Each pack concatenates its samples and adds ``position_ids`` that restart at 0 for every
    sample: given position ids and no attention mask, transformers masks attention block by block,
    so no sample sees another. The first label of every sample is ignored, so no token is trained
    to predict the start of the next sample: the loss of a pack is the sum of its samples' losses.
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    packs: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(examples[i]["input_ids"])
        j = next((j for j, r in enumerate(room) if r >= n), None)
        if j is None:
            packs.append([i])
            room.append(max_len - n)
        else:
            packs[j].append(i)
            room[j] -= n
    out = []
    for members in packs:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for i in members:
            ex = examples[i]
            ids += ex["input_ids"]
            labels += [IGNORE_INDEX, *ex["labels"][1:]]
            positions += range(len(ex["input_ids"]))
        out.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return out


def pad_batch(examples: list[dict[str, list[int]]], pad_id: int, multiple_of: int = 8) -> dict[str, Any]:
    """Right-pad a list of examples into tensors ``input_ids``, ``attention_mask``, ``labels``
    (and ``position_ids`` for packed examples; padding gets positions of its own) of shape
    ``(batch, length)``, ``length`` rounded up to ``multiple_of``."""
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
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if "position_ids" in examples[0]:
        position_ids = torch.arange(length).repeat(n, 1)
        for i, ex in enumerate(examples):
            k = len(ex["position_ids"])
            position_ids[i, :k] = torch.tensor(ex["position_ids"])
            position_ids[i, k:] -= k
        batch["position_ids"] = position_ids
    return batch


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """What goes to ``model(**...)``: packed batches drop ``attention_mask`` so transformers
    derives the per-sample (block-diagonal) causal mask from ``position_ids``."""
    if "position_ids" in batch:
        return {k: v for k, v in batch.items() if k != "attention_mask"}
    return batch

"""Split long conversations into chunks of at most ``max_tokens`` on turn boundaries.

FastChat's ``split_long_conversation`` has two known bugs this avoids: the last user/assistant
pair is lost when the loop ends without flushing the open chunk, and a single pair longer than
the limit is silently dropped. Here every pair lands in exactly one chunk; a pair that alone is
over the limit becomes its own chunk, truncated (the user turn to at most half the budget when it
is the longer part, the reply to what remains), and says so in ``meta.truncated``.

Tokens are counted per turn's content with the given tokenizer (no special tokens, no template
markers: leave room for them in ``max_tokens``); a record so short it cannot exceed the limit
(:func:`tokens_per_byte_bound`) is not tokenized at all. A system message is repeated at the head of every
chunk and counts in each. Chunks end on an assistant turn; a trailing unanswered user turn is
dropped. Chunks of a split record get ids ``{id}-part{k}`` (``k`` from 1) and
``meta.part = [k, n]``; a record that fits is returned unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Messages = list[dict[str, str]]
#: A record of at most ``max_tokens / BYTES_BOUND`` UTF-8 bytes is not tokenized: a token covers
#: at least one byte in byte-level BPE and SentencePiece alike; the factor 2 leaves room for
#: normalisers that expand text (NFKC ligatures) and word-start markers.
BYTES_BOUND = 2


def tokens_per_byte_bound(tokenizer: Any) -> int:
    """At most how many tokens ``tokenizer`` makes per UTF-8 byte of text: 1 for a fast
    byte-level BPE tokenizer without a normaliser (every token is one or more of the text's
    bytes), else :data:`BYTES_BOUND`."""
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.normalizer is not None:
        return BYTES_BOUND
    spec = json.loads(backend.to_str())
    byte_level = '"ByteLevel"' in json.dumps(spec.get("pre_tokenizer"))
    return 1 if byte_level and spec["model"]["type"] == "BPE" else BYTES_BOUND


@dataclass
class SplitResult:
    """The chunks of one record and what happened to it."""

    records: list[dict[str, Any]]
    truncated: int = 0
    """Pairs cut to fit."""
    dropped_turns: list[int] = field(default_factory=list)
    """Indices of unanswered trailing user turns left out."""


def _pairs(messages: Messages) -> tuple[Messages, list[Messages], list[int]]:
    """``(system, pairs, dropped)``: the optional system message, the user/assistant pairs (a
    user turn with the following assistant turn), and the indices of unanswered user turns."""
    start = 1 if messages and messages[0]["role"] == "system" else 0
    system, pairs, dropped = messages[:start], [], []
    i = start
    while i < len(messages):
        if messages[i]["role"] == "user" and i + 1 < len(messages) and messages[i + 1]["role"] == "assistant":
            pairs.append(messages[i : i + 2])
            i += 2
        else:
            dropped.append(i)
            i += 1
    return system, pairs, dropped


def _cut(tokenizer: Any, text: str, limit: int) -> str:
    """The longest prefix of ``text`` of at most ``limit`` tokens, cut at a token boundary by
    the tokenizer's character offsets (so no character is split)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    if len(offsets) <= limit:
        return text
    return text[: offsets[limit - 1][1]] if limit > 0 else ""


def _truncate_pair(pair: Messages, counts: list[int], budget: int, tokenizer: Any) -> Messages:
    """Cut one user/assistant pair to ``budget`` tokens: the user turn to at most half the
    budget (when longer), the reply to the rest."""
    user_limit = min(counts[0], max(budget // 2, budget - counts[1]))
    user = _cut(tokenizer, pair[0]["content"], user_limit)
    reply = _cut(tokenizer, pair[1]["content"], budget - min(counts[0], user_limit))
    return [{**pair[0], "content": user}, {**pair[1], "content": reply}]


def split_conversation(
    record: dict[str, Any],
    max_tokens: int,
    count_tokens: Callable[[list[str]], list[int]],
    tokenizer: Any,
    bytes_bound: int = BYTES_BOUND,
) -> SplitResult:
    """Split ``record`` into chunks of at most ``max_tokens`` content tokens (see the module
    docstring). ``count_tokens`` maps texts to their token counts (one tokenizer batch call);
    ``bytes_bound`` is :func:`tokens_per_byte_bound` of the tokenizer."""
    messages = record["messages"]
    ends_on_reply = not messages or messages[-1]["role"] == "assistant"
    if ends_on_reply and bytes_bound * sum(len(m["content"].encode()) for m in messages) <= max_tokens:
        return SplitResult([record])  # cannot be over the limit: not worth tokenizing
    counts = count_tokens([m["content"] for m in messages])
    total = sum(counts)
    if total <= max_tokens and ends_on_reply:
        return SplitResult([record])
    system, pairs, dropped = _pairs(messages)
    token_of = {id(m): n for m, n in zip(messages, counts)}
    sys_tokens = sum(token_of[id(m)] for m in system)
    budget = max(max_tokens - sys_tokens, 2)
    chunks: list[Messages] = []
    truncated: list[dict[str, int]] = []
    current: Messages = []
    used = 0
    for pair in pairs:
        pair_counts = [token_of[id(m)] for m in pair]
        size = sum(pair_counts)
        if current and used + size > budget:
            chunks.append(current)
            current, used = [], 0
        if size > budget:  # alone over the limit: its own chunk, truncated
            chunks.append(_truncate_pair(pair, pair_counts, budget, tokenizer))
            truncated.append({"chunk": len(chunks), "tokens": size + sys_tokens, "kept": max_tokens})
            continue
        current += pair
        used += size
    if current:  # the last pair is never lost
        chunks.append(current)
    n = len(chunks)
    out = []
    for k, chunk in enumerate(chunks, 1):
        meta = copy.deepcopy(record.get("meta") or {})
        rid = record["id"] if n == 1 else f"{record['id']}-part{k}"
        if n > 1:
            meta["part"] = [k, n]
        cut = [t for t in truncated if t["chunk"] == k]
        if cut:
            meta["truncated"] = {"tokens": cut[0]["tokens"], "max_tokens": cut[0]["kept"]}
        out.append({**record, "id": rid, "messages": [*copy.deepcopy(system), *chunk], "meta": meta})
    return SplitResult(out, len(truncated), dropped)

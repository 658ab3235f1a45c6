"""Batches for training: the validation split, seeded epoch orders (optionally grouped by
length), data-parallel shards, and the stream of padded micro-batches the loop consumes.

Every process draws the same seeded global batches and keeps its own share, so N processes see
exactly what one process with an N times larger batch sees, and a resumed run continues the
same order from where its checkpoint stood.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from zhtune.data.dataset import pack_examples, pad_batch
from zhtune.errors import ZhtuneError


def split_validation(examples: list[Any], val_size: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Shuffle once with ``seed`` and hold out ``val_size`` (a fraction or a count)."""
    if val_size <= 0:
        return examples, []
    n_val = int(round(val_size * len(examples))) if val_size < 1 else int(val_size)
    if n_val >= len(examples):
        raise ZhtuneError(
            f"config key 'val_size': {val_size} leaves no training data ({len(examples)} examples)"
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    val = [examples[i] for i in order[:n_val]]
    train = [examples[i] for i in order[n_val:]]
    return train, val


def epoch_batches(
    n: int, batch_size: int, seed: int, epoch: int, lengths: list[int] | None = None
) -> list[list[int]]:
    """Indices of each micro-batch of one epoch: a fresh permutation per epoch, seeded, so a
    resumed run sees the same order.

    With ``lengths`` (group by length), the permutation is cut into mega-batches of 64 batches,
    each sorted by length before it is split, and the batches are shuffled again: batches hold
    samples of similar length (little padding) while the order stays random.
    """
    import torch

    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    if lengths is not None:
        mega = 64 * batch_size
        perm = [i for k in range(0, n, mega) for i in sorted(perm[k : k + mega], key=lambda i: -lengths[i])]
    batches = [perm[i : i + batch_size] for i in range(0, n, batch_size)]
    if lengths is not None:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    return batches


def batches_per_epoch(n: int, batch_size: int, num_processes: int = 1) -> int:
    """Global micro-batches (``batch_size`` samples on each of ``num_processes``) in one epoch of
    ``n`` samples. A last batch with fewer samples than processes is dropped (every process needs
    at least one); a shuffled epoch drops different samples each time."""
    full, rest = divmod(n, batch_size * num_processes)
    return full + (rest >= num_processes)


def shard(indices: list[int], rank: int, num_processes: int) -> list[int]:
    """Process ``rank``'s contiguous share of a global batch (sizes differ by at most one)."""
    size, rest = divmod(len(indices), num_processes)
    start = rank * size + min(rank, rest)
    return indices[start : start + size + (rank < rest)]


def micro_batches(
    examples: list[Any],
    batch_size: int,
    seed: int,
    pad_id: int,
    start_epoch: int,
    start_batch: int,
    group_by_length: bool = False,
    rank: int = 0,
    num_processes: int = 1,
    fixed_length: int = 0,
    pack_rows: bool = False,
) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """Yield ``(epoch, batch_index, batch)`` forever, starting at a given position.

    Batches are padded to a multiple of 8 tokens; with ``fixed_length`` (packed samples or
    pre-training blocks, none longer), every batch is padded to exactly that many tokens and
    ``batch_size`` rows, with empty rows (no labels, no attention) after an epoch's short last
    batch: one shape, which compiled code needs to run without recompiling. With ``pack_rows``
    (``padding_free``), a batch's samples are packed into as few rows of its padded length as hold
    them (:func:`pack_examples`: first-fit decreasing, positions restarting per sample): never more
    rows or a longer one than padding them, and the same tokens and labels.

    Data parallel: every process draws the same seeded global batches of ``batch_size *
    num_processes`` samples and keeps its own share of each, so N processes together see exactly
    what one process with an N times larger batch sees. ``batch_index`` counts global batches.
    """
    lengths = [len(ex["input_ids"]) for ex in examples] if group_by_length else None
    epoch = start_epoch
    while True:
        batches = epoch_batches(len(examples), batch_size * num_processes, seed, epoch, lengths)
        batches = [b for b in batches if len(b) >= num_processes]  # see batches_per_epoch
        for b in range(start_batch if epoch == start_epoch else 0, len(batches)):
            rows = [examples[i] for i in shard(batches[b], rank, num_processes)]
            if fixed_length:
                rows += [{k: [] for k in rows[0]}] * (batch_size - len(rows))
            if pack_rows:
                rows = pack_examples(rows, -(-max(len(r["input_ids"]) for r in rows) // 8) * 8)
            yield epoch, b, pad_batch(rows, pad_id, fixed_length or 8)
        epoch += 1

"""A prompt prefix shared by many prompts, run once: its key/value cache, copied per batch.

Few-shot prompts repeat the same header and solved examples before each question; running that
prefix once and every question against its cache does the shared work once (``zhtune eval exam``:
about 80% of a 5-shot CMMLU prompt). Works with any model that returns a transformers ``Cache``.
"""

from __future__ import annotations

import copy
from typing import Any


def shared_prefix_length(prompts: list[list[int]]) -> int:
    """How many leading tokens all ``prompts`` share, leaving each at least one of its own (the
    last position's logits are what a prompt is run for)."""
    if not prompts:
        return 0
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        n = next((i for i in range(n) if p[i] != first[i]), n)
    return max(n, 0)


def prefix_cache(model: Any, ids: list[int]) -> Any | None:
    """The model's key/value cache after ``ids`` (one row), or None when the model returns no
    transformers ``Cache`` (then prompts are run whole)."""
    import torch
    from transformers.cache_utils import Cache

    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1)
    cache = getattr(out, "past_key_values", None)
    return cache if isinstance(cache, Cache) else None


def repeat_cache(cache: Any, rows: int) -> Any:
    """A copy of a one-row ``cache`` with its row repeated ``rows`` times (the original stays
    as it is, for the next batch)."""
    past = copy.deepcopy(cache)
    past.batch_repeat_interleave(rows)
    return past

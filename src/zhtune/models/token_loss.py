"""Token losses of a causal LM over labelled examples: one definition for training's validation
loss and export's perplexity."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from zhtune.data.dataset import model_inputs, pad_batch


def summed_token_loss(model: Any, batch: dict[str, Any]) -> Any:
    """Sum of next-token cross-entropies over the labelled tokens of ``batch`` (a scalar tensor),
    computed from the logits: independent of what a method adds to ``.loss`` (AdaLoRA's
    regulariser) and of virtual tokens prepended to the logits (prompt tuning)."""
    import torch

    inputs = {k: v for k, v in model_inputs(batch).items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits
    labels = batch["labels"]
    logits = logits[:, -labels.shape[1] :][:, :-1].float()
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )


def mean_token_loss(
    model: Any,
    examples: list[dict[str, list[int]]],
    batch_size: int,
    pad_id: int,
    device: Any,
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> float:
    """Mean next-token loss over the labelled tokens of ``examples`` (``{"input_ids", "labels"}``),
    in batches of ``batch_size`` on ``device`` under ``autocast()``; the model is left in eval mode."""
    import torch

    model.eval()
    total, count = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in pad_batch(examples[i : i + batch_size], pad_id).items()}
            with autocast():
                total += summed_token_loss(model, batch).double().cpu()
            count += int((batch["labels"][:, 1:] != -100).sum())
    return float(total / max(count, 1))

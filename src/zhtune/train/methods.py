"""Tuning methods as a registry: how each one prepares a model and where its weights go.

A method is data (:class:`Method`): a function that turns a loaded base model into the model to
train, and the run-directory folder its weights are saved to (``model`` for full weights,
``adapter`` for a PEFT adapter loadable with ``PeftModel.from_pretrained``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from zhtune.models.families import lora_targets
from zhtune.train.config import TrainConfig


@dataclass(frozen=True)
class Method:
    """One tuning method."""

    name: str
    prepare: Callable[[Any, TrainConfig], Any]
    """Builder: (base model, config) -> model whose trainable parameters are the ones to tune."""
    save_dir: str
    """Run-directory folder for the tuned weights: ``model`` or ``adapter``."""


def apply_lora(
    model: Any,
    rank: int,
    alpha: float,
    dropout: float,
    targets: str | list[str],
    modules_to_save: list[str] | None = None,
) -> Any:
    """Wrap ``model`` with LoRA adapters (peft): only the adapter weights stay trainable."""
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        modules_to_save=modules_to_save,
    )
    return get_peft_model(model, config)


def _full(model: Any, cfg: TrainConfig) -> Any:
    model.requires_grad_(True)
    return model


def _lora(model: Any, cfg: TrainConfig) -> Any:
    targets = lora_targets(model.config.model_type, cfg.lora_target)
    return apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, targets)


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("full", _full, "model"),
        Method("lora", _lora, "adapter"),
    ]
}

"""Tuning methods as a registry: how each one prepares a model and where its weights go.

A method is data (:class:`Method`): a function that turns a loaded base model into the model to
train, the run-directory folder its weights are saved to (``model`` for full weights, ``adapter``
for an adapter loaded on top of the base), and optional hooks (an action after each optimizer
step, a custom save). Every PEFT method but the bottleneck adapters comes from peft; see
:mod:`zhtune.models.bottleneck` for why those are zhtune's own.

=========  ==========================================================================
full       every weight
freeze     the last ``freeze_layers`` decoder layers (negative: the first N)
embeddings input embeddings and LM head only (BELLE's recipe after vocabulary expansion)
lora       low-rank adapters (Hu et al. 2021)
dora       weight-decomposed LoRA (Liu et al. 2024)
rslora     rank-stabilised LoRA: scale alpha / sqrt(r) (Kalajdzievski 2023)
pissa      LoRA initialised from the principal singular vectors (Meng et al. 2024)
adalora    LoRA whose rank budget is reallocated during training (Zhang et al. 2023)
ia3        learned rescaling of keys, values and MLP activations (Liu et al. 2022)
prefix     prefix tuning: trained key/value prefixes in every layer (Li & Liang 2021)
prompt     prompt tuning: trained input embeddings (Lester et al. 2021)
ptuning    P-tuning: virtual tokens from a prompt encoder MLP (Liu et al. 2021)
houlsby    sequential bottleneck adapters after attention and MLP (SadapterH)
pfeiffer   sequential bottleneck adapter after the MLP (SadapterP)
parallel   bottleneck adapter parallel to the MLP (P-adapter)
qlora      LoRA on a 4-bit (or 8-bit) quantized frozen base (bitsandbytes)
=========  ==========================================================================
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zhtune.errors import ZhtuneError
from zhtune.models.bottleneck import BottleneckConfig, add_bottleneck_adapters, save_bottleneck
from zhtune.models.families import lora_targets
from zhtune.models.loading import attach_adapter

if TYPE_CHECKING:
    from zhtune.train.config import TrainConfig


def _save_pretrained(model: Any, directory: Path, cfg: TrainConfig, state_dict: Any = None) -> None:
    model.save_pretrained(str(directory), safe_serialization=True, state_dict=state_dict)


@dataclass(frozen=True)
class Method:
    """One tuning method."""

    name: str
    prepare: Callable[[Any, TrainConfig, int], Any]
    """(base model, config, total optimizer steps) -> the model to train, with only the
    parameters to tune left trainable."""
    save_dir: str
    """Run-directory folder for the tuned weights: ``model`` or ``adapter``."""
    save: Callable[..., None] = _save_pretrained
    """Write the tuned weights: (unwrapped model, folder, config, state_dict=None); ``state_dict``
    is the gathered full state when the weights were sharded (FSDP, ZeRO-3)."""
    after_step: Callable[[Any, int], None] | None = None
    """Called with (unwrapped model, step) after each optimizer step, before gradients are cleared."""
    virtual_tokens: bool = False
    """Prepends virtual tokens to the input (prefix/prompt/ptuning): no packing."""
    quantized: bool = False
    """The frozen base is loaded quantized (bitsandbytes)."""

    peft_state_resumes: bool = True
    """A run resumed from peft's saved adapter continues the same curve (False for the
    virtual-token methods: P-tuning's save is the prompt encoder's output, not the encoder; prefix
    and prompt tuning resumed from it drift, measured; they keep accelerate's full save)."""

    @property
    def adapter_checkpoints(self) -> bool:
        """Checkpoints hold the adapter alone, in peft's layout (``PeftModel.from_pretrained(base,
        CHECKPOINT)`` loads one), not the frozen base: every peft method saved as peft saves it
        and resumable from that (PiSSA converts its adapter only at the end, the bottleneck adapters
        are zhtune's own)."""
        return self.save_dir == "adapter" and self.save is _save_pretrained and self.peft_state_resumes


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------
def apply_lora(
    model: Any,
    rank: int,
    alpha: float,
    dropout: float,
    targets: str | list[str],
    **options: Any,
) -> Any:
    """Wrap ``model`` with LoRA adapters (peft): only the adapter weights stay trainable.

    ``options`` go to ``peft.LoraConfig`` (``use_dora``, ``use_rslora``, ``init_lora_weights``).
    """
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        **options,
    )
    return get_peft_model(model, config)


def _full(model: Any, cfg: TrainConfig, total_steps: int) -> Any:
    model.requires_grad_(True)
    return model


def decoder_layers(model: Any) -> Any:
    """The ``ModuleList`` of decoder layers: the one whose length is ``num_hidden_layers``."""
    from torch import nn

    n = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ZhtuneError(f"method freeze: cannot find the {n} decoder layers of {type(model).__name__}")


def _freeze(model: Any, cfg: TrainConfig, total_steps: int) -> Any:
    layers = decoder_layers(model)
    n = cfg.freeze_layers
    if n == 0 or abs(n) > len(layers):
        raise ZhtuneError(f"config key 'freeze_layers': must be in ±[1, {len(layers)}], got {n}")
    model.requires_grad_(False)
    for layer in layers[-n:] if n > 0 else layers[:-n]:
        layer.requires_grad_(True)
    return model


def _embeddings(model: Any, cfg: TrainConfig, total_steps: int) -> Any:
    """Train the input embeddings and the LM head (one matrix when tied), nothing else: learns
    the rows of new tokens after ``zhtune vocab resize`` without moving the rest of the model."""
    model.requires_grad_(False)
    model.get_input_embeddings().requires_grad_(True)
    head = model.get_output_embeddings()
    if head is not None:
        head.requires_grad_(True)
    return model


LORA_FAMILY = ("lora", "dora", "rslora", "pissa", "adalora", "qlora")
"""Methods that take ``modules_to_save`` (modules trained in full and saved with the adapter)."""


def _lora_with(**options: Any) -> Callable[[Any, TrainConfig, int], Any]:
    def prepare(model: Any, cfg: TrainConfig, total_steps: int) -> Any:
        targets = lora_targets(model.config.model_type, cfg.lora_target)
        return apply_lora(
            model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, targets,
            modules_to_save=cfg.modules_to_save or None, **options,
        )  # fmt: skip

    return prepare


PISSA_INIT = "pissa_init"
"""Run-directory folder holding the PiSSA adapter as initialised (to convert the final one)."""


def _pissa(model: Any, cfg: TrainConfig, total_steps: int) -> Any:
    """PiSSA moves the top singular directions of each weight into the adapter, so the frozen base
    becomes a residual. The saved adapter is converted into a plain LoRA on the *original* base
    (peft's conversion, from a copy of the initial adapter), so loading needs no residual base."""
    from accelerate import PartialState

    model = _lora_with(init_lora_weights="pissa")(model, cfg, total_steps)
    if PartialState().is_main_process:
        model.save_pretrained(str(Path(cfg.output_dir) / PISSA_INIT), safe_serialization=True)
    return model


def _save_pissa(model: Any, directory: Path, cfg: TrainConfig, state_dict: Any = None) -> None:
    init = Path(cfg.output_dir) / PISSA_INIT
    if not init.is_dir():  # continued from init_adapter: already a plain LoRA
        _save_pretrained(model, directory, cfg, state_dict)
        return
    model.save_pretrained(
        str(directory),
        safe_serialization=True,
        state_dict=state_dict,
        path_initial_model_for_weight_conversion=str(init),
    )
    shutil.rmtree(init, ignore_errors=True)


def _adalora(model: Any, cfg: TrainConfig, total_steps: int) -> Any:
    from peft import AdaLoraConfig, TaskType, get_peft_model

    tinit, tfinal = int(0.1 * total_steps), int(0.3 * total_steps)
    config = AdaLoraConfig(
        task_type=TaskType.CAUSAL_LM,
        init_r=cfg.adalora_init_rank,
        target_r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=lora_targets(model.config.model_type, cfg.lora_target),
        total_step=total_steps,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=max(1, (total_steps - tinit - tfinal) // 10),
        modules_to_save=cfg.modules_to_save or None,
    )
    return get_peft_model(model, config)


def _adalora_step(model: Any, step: int) -> None:
    model.base_model.update_and_allocate(step)


def _ia3(model: Any, cfg: TrainConfig, total_steps: int) -> Any:
    from peft import IA3Config, TaskType, get_peft_model

    try:
        config = IA3Config(task_type=TaskType.CAUSAL_LM)  # peft's per-family keys/values/MLP defaults
        return get_peft_model(model, config)
    except ValueError as err:
        raise ZhtuneError(f"method ia3: {err}") from None


def _prompt_learning(kind: str) -> Callable[[Any, TrainConfig, int], Any]:
    def prepare(model: Any, cfg: TrainConfig, total_steps: int) -> Any:
        import peft

        common = {"task_type": peft.TaskType.CAUSAL_LM, "num_virtual_tokens": cfg.num_virtual_tokens}
        config = {
            "prefix": lambda: peft.PrefixTuningConfig(**common),
            "prompt": lambda: peft.PromptTuningConfig(**common),
            "ptuning": lambda: peft.PromptEncoderConfig(
                **common, encoder_hidden_size=model.config.hidden_size
            ),
        }[kind]()
        return peft.get_peft_model(model, config)

    return prepare


def _bottleneck(kind: str) -> Callable[[Any, TrainConfig, int], Any]:
    def prepare(model: Any, cfg: TrainConfig, total_steps: int) -> Any:
        try:
            return add_bottleneck_adapters(model, BottleneckConfig(kind, cfg.adapter_size, cfg.adapter_scale))
        except ValueError as err:
            raise ZhtuneError(f"method {kind}: {err}") from None

    return prepare


def _save_bottleneck(model: Any, directory: Path, cfg: TrainConfig, state_dict: Any = None) -> None:

    save_bottleneck(model, directory, state_dict)


def _qlora(model: Any, cfg: TrainConfig, total_steps: int) -> Any:
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    return _lora_with()(model, cfg, total_steps)


_BOTTLENECK = {"save": _save_bottleneck}
METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("full", _full, "model"),
        Method("freeze", _freeze, "model"),
        Method("embeddings", _embeddings, "model"),
        Method("lora", _lora_with(), "adapter"),
        Method("dora", _lora_with(use_dora=True), "adapter"),
        Method("rslora", _lora_with(use_rslora=True), "adapter"),
        Method("pissa", _pissa, "adapter", save=_save_pissa),
        Method("adalora", _adalora, "adapter", after_step=_adalora_step),
        Method("ia3", _ia3, "adapter"),
        Method(
            "prefix", _prompt_learning("prefix"), "adapter", virtual_tokens=True, peft_state_resumes=False
        ),
        Method(
            "prompt", _prompt_learning("prompt"), "adapter", virtual_tokens=True, peft_state_resumes=False
        ),
        Method(
            "ptuning", _prompt_learning("ptuning"), "adapter", virtual_tokens=True, peft_state_resumes=False
        ),
        Method("houlsby", _bottleneck("houlsby"), "adapter", **_BOTTLENECK),
        Method("pfeiffer", _bottleneck("pfeiffer"), "adapter", **_BOTTLENECK),
        Method("parallel", _bottleneck("parallel"), "adapter", **_BOTTLENECK),
        Method("qlora", _qlora, "adapter", quantized=True),
    ]
}
ALIASES = {"sadapterh": "houlsby", "sadapterp": "pfeiffer", "p-adapter": "parallel", "p_adapter": "parallel"}
"""The Alpaca-CoT study's names for the bottleneck adapters."""


def check_method(cfg: TrainConfig) -> None:
    """Config-time checks of ``cfg.method`` (name, combinations, what it needs installed).

    Raises :class:`ZhtuneError` saying what is wrong and how to fix it.
    """
    import difflib

    name = ALIASES.get(cfg.method.lower(), cfg.method)
    if name != cfg.method:
        cfg.method = name
    if name not in METHODS:
        close = difflib.get_close_matches(name, METHODS, n=2)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ZhtuneError(
            f"config key 'method': unknown method '{name}'. Available: {', '.join(METHODS)}.{hint}"
        )
    method = METHODS[name]
    if method.virtual_tokens and cfg.packing:
        raise ZhtuneError(
            f"config key 'packing': method {name} prepends virtual tokens to each sequence, which packed "
            "samples cannot share; use packing=false (or group_by_length=true) with it"
        )
    if method.quantized and importlib.util.find_spec("bitsandbytes") is None:
        raise ZhtuneError(
            "method qlora needs bitsandbytes (4/8-bit weights): pip install -c constraints.txt 'zhtune[qlora]' "
            "(it runs on CUDA GPUs and, with bitsandbytes >= 0.46, on x86 CPUs)"
        )
    if cfg.modules_to_save and name not in LORA_FAMILY:
        raise ZhtuneError(
            f"config key 'modules_to_save': method {name} does not take it (LoRA family only: "
            f"{', '.join(LORA_FAMILY)}); to train only the embeddings use method=embeddings"
        )
    if cfg.init_adapter and method.save_dir != "adapter":
        raise ZhtuneError(f"config key 'init_adapter': method {name} has no adapter to continue")


def continue_adapter(model: Any, path: str, cfg: TrainConfig) -> Any:
    """Load the adapter at ``path`` (a run directory or its ``adapter/``) onto ``model``, trainable,
    instead of creating a fresh one: InstructGLM's recipe of tuning on Alpaca, then on BELLE."""

    folder = Path(path)
    if (folder / "adapter").is_dir():
        folder = folder / "adapter"
    if not folder.is_dir():
        raise ZhtuneError(f"config key 'init_adapter': no adapter directory at {path}")
    if METHODS[cfg.method].quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    return attach_adapter(model, str(folder), trainable=True)

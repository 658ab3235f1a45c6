"""LLaMA-Factory's training keys, as data: what each one becomes in zhtune's :class:`TrainConfig`.

A YAML written for ``llamafactory-cli train`` runs unchanged with ``zhtune train``: every key of
:data:`LF_KEYS` is either renamed (with its value translated: comma lists, scheduler and
template names, ``flash_attn`` modes), combined with others (:data:`COMBINED`: ``finetuning_type``
and its flags into ``method``, ``bf16``/``fp16`` into ``precision``), accepted as a no-op with a
note, or refused with the reason zhtune cannot honour it. Nothing is dropped silently: each
translation becomes a line of the start banner (and of ``config.yaml``'s ``translated``).

A config holding any LLaMA-Factory-only key also gets LLaMA-Factory's defaults where they differ
from zhtune's (:data:`LF_DEFAULTS`), so the run is the one its author expected. zhtune's own keys
keep working beside them (and on the command line, where they win).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from zhtune.config import NOTES
from zhtune.data.templates import TEMPLATES
from zhtune.errors import ZhtuneError


class Refused(ZhtuneError):
    """A LLaMA-Factory key (or value) zhtune cannot honour; the message says why."""


@dataclass(frozen=True)
class Alias:
    """One LLaMA-Factory key."""

    to: str = ""
    """zhtune key it sets ("" for a no-op or a refused key)."""
    value: Callable[[Any], Any] | None = None
    """LLaMA-Factory value -> zhtune value (None: unchanged); raises :class:`Refused`."""
    note: str = ""
    """For a no-op: what zhtune does instead (shown in the banner)."""
    refuse: str = ""
    """Why zhtune cannot honour it (the key is then an error)."""
    accept: tuple[Any, ...] = ()
    """Values that mean "off" and are accepted as no-ops (null always is, for a refused key)."""


# ---------------------------------------------------------------------------- value translations
def comma_list(value: Any) -> list[str]:
    """``"a, b"`` -> ``["a", "b"]`` (a YAML list stays a list)."""
    items = value if isinstance(value, list) else str(value).split(",")
    return [str(v).strip() for v in items if str(v).strip()]


def one_adapter(value: Any) -> str:
    adapters = comma_list(value)
    if len(adapters) != 1:
        raise Refused(
            f"zhtune continues one adapter (init_adapter), got {len(adapters)}: {value!r}; merge the others first"
        )
    return adapters[0]


def _lookup(table: dict[str, Any], what: str) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        if str(value) in table:
            return table[str(value)]
        raise Refused(f"{what} {value!r} is not supported (zhtune has: {', '.join(table)})")

    return convert


SCHEDULERS = {
    "cosine": "cosine",
    "linear": "linear",
    "constant": "constant",
    "constant_with_warmup": "constant",
}
FLASH_ATTN = {"auto": "auto", "sdpa": "sdpa", "fa2": "flash_attention_2", "disabled": "eager"}
STAGES = {"sft": "sft", "pt": "pt"}
NO_TEMPLATE = {"empty"}


def template_name(value: Any) -> str:
    """A template name zhtune has (alpaca, belle, chatml, qwen, llama3, llama2, gemma, default:
    LLaMA-Factory's of the same name) is kept; any other -> auto (the tokenizer's own chat
    template, else the family's), which is what LLaMA-Factory's family templates reproduce."""

    name = str(value)
    if name in NO_TEMPLATE:
        raise Refused(
            "template 'empty' (no chat formatting) has no zhtune counterpart; use stage pt for raw text"
        )
    return name if name in ("auto", "tokenizer") or name in TEMPLATES else "auto"


def report_list(value: Any) -> list[str]:
    """``none`` -> [], ``all`` refused (it would log to whatever happens to be installed)."""
    items = [v for v in comma_list(value) if v != "none"]
    if "all" in items:
        raise Refused(
            "report_to 'all' depends on what is installed; name the trackers (tensorboard, wandb, mlflow, swanlab)"
        )
    return items


def stage(value: Any) -> str:
    if str(value) in STAGES:
        return STAGES[str(value)]
    raise Refused(
        f"stage {value!r} (reward models, PPO, DPO, KTO) is not supported: zhtune trains sft and pt"
    )


def resume_flag(value: Any) -> bool:
    if value in (True, "true", "True"):
        return True
    raise Refused(
        f"resume_from_checkpoint: {value!r}: zhtune resumes from the newest checkpoint in output_dir; "
        "write resume_from_checkpoint: true (or resume: true)"
    )


def not_(value: Any) -> bool:
    return not value


_TEXT_ONLY = "zhtune trains text-only models (no images, videos or audio)"
_PREFERENCE = "preference training (DPO, KTO, reward models) is not supported: zhtune trains sft and pt"

#: Every LLaMA-Factory key zhtune knows, by name.
LF_KEYS: dict[str, Alias] = {
    # model
    "model_name_or_path": Alias("model"),
    "adapter_name_or_path": Alias("init_adapter", one_adapter),
    "trust_remote_code": Alias("trust_remote_code"),
    "flash_attn": Alias("attn_implementation", _lookup(FLASH_ATTN, "flash_attn")),
    "disable_gradient_checkpointing": Alias("gradient_checkpointing", not_),
    "gradient_checkpointing": Alias("gradient_checkpointing"),
    # method (finetuning_type and its flags: see COMBINED)
    "stage": Alias("stage", stage),
    "lora_rank": Alias("lora_rank"),
    "lora_alpha": Alias("lora_alpha"),
    "lora_dropout": Alias("lora_dropout"),
    "lora_target": Alias("lora_target", comma_list),
    "additional_target": Alias("modules_to_save", comma_list),
    "freeze_trainable_layers": Alias("freeze_layers"),
    "quantization_method": Alias(
        refuse="zhtune quantizes with bitsandbytes only", accept=("bnb", "bitsandbytes")
    ),
    "double_quantization": Alias(refuse="zhtune's qlora always uses double quantization", accept=(True,)),
    # data
    "dataset": Alias("data", comma_list),
    "eval_dataset": Alias("val_data", comma_list),
    "dataset_dir": Alias(note="where dataset_info.json is read from (registry)"),
    "template": Alias("template", template_name),
    "cutoff_len": Alias("cutoff_len"),
    "max_samples": Alias("max_samples"),
    "val_size": Alias("val_size"),
    "packing": Alias("packing"),
    "neat_packing": Alias("packing"),
    "train_on_prompt": Alias("train_on_prompt"),
    "dataloader_num_workers": Alias("num_workers"),
    "ddp_timeout": Alias("ddp_timeout"),
    # output
    "output_dir": Alias("output_dir"),
    "overwrite_output_dir": Alias("overwrite"),
    "logging_steps": Alias("logging_steps"),
    "save_steps": Alias("save_steps"),
    "save_total_limit": Alias("save_total_limit"),
    "report_to": Alias("report_to", report_list),
    "resume_from_checkpoint": Alias("resume", resume_flag, accept=(None, False)),
    "eval_steps": Alias("eval_steps"),
    # train
    "per_device_train_batch_size": Alias("batch_size"),
    "gradient_accumulation_steps": Alias("grad_accum"),
    "learning_rate": Alias("lr"),
    "num_train_epochs": Alias("epochs"),
    "max_steps": Alias("max_steps", lambda v: max(0, int(v))),
    "lr_scheduler_type": Alias("lr_scheduler", _lookup(SCHEDULERS, "lr_scheduler_type")),
    "warmup_ratio": Alias("warmup_ratio"),
    "warmup_steps": Alias("warmup_steps"),
    "weight_decay": Alias("weight_decay"),
    "max_grad_norm": Alias("max_grad_norm"),
    "seed": Alias("seed"),
    # no-ops, each with what zhtune does instead
    "do_train": Alias(note="zhtune train always trains"),
    "do_eval": Alias(note="validation runs whenever val_size > 0"),
    "overwrite_cache": Alias(note="zhtune keeps no tokenized cache"),
    "preprocessing_num_workers": Alias(note="zhtune tokenizes in one process (the fast tokenizer batches)"),
    "plot_loss": Alias(note="loss.png is always written"),
    "per_device_eval_batch_size": Alias(note="validation uses batch_size"),
    "eval_strategy": Alias(note="validation every eval_steps (0: each epoch)"),
    "include_num_input_tokens_seen": Alias(note="trainer_log.jsonl always counts tokens"),
    "run_name": Alias(note="trackers name the run after output_dir"),
    "save_only_model": Alias(
        refuse="zhtune's checkpoints are resumable: they always hold the optimizer state", accept=(False,)
    ),
    "streaming": Alias(refuse="zhtune reads the data into memory (no streaming)", accept=(False,)),
    "mix_strategy": Alias(
        refuse="zhtune concatenates datasets; for interleaving use `zhtune data mix`", accept=("concat",)
    ),
    "optim": Alias(refuse="zhtune trains with AdamW (torch)", accept=("adamw_torch", "adamw_hf")),
    # refused, with the reason
    "deepspeed": Alias(
        refuse="zhtune runs DeepSpeed through accelerate: `accelerate launch --use_deepspeed "
        "--deepspeed_config_file FILE -m zhtune train ...` (remove the key)"
    ),
    "tokenized_path": Alias(refuse="zhtune does not save or load pre-tokenized data"),
    "new_special_tokens": Alias(refuse="adding tokens is `zhtune vocab` (then train on the resized model)"),
    "resize_vocab": Alias(refuse="resizing the vocabulary is `zhtune vocab`"),
    "rope_scaling": Alias(refuse="zhtune trains at the model's own context length"),
    "neftune_noise_alpha": Alias(refuse="NEFTune noise is not implemented"),
    "enable_liger_kernel": Alias(
        refuse="zhtune computes its own chunked loss (fused_loss: true, the default)", accept=(False,)
    ),
    "use_unsloth": Alias(refuse="unsloth is not supported", accept=(False,)),
    "shift_attn": Alias(refuse="shift short attention (LongLoRA) is not implemented", accept=(False,)),
    "ray_num_workers": Alias(refuse="zhtune does not run on Ray; use accelerate launch"),
    "image_max_pixels": Alias(refuse=_TEXT_ONLY),
    "video_max_pixels": Alias(refuse=_TEXT_ONLY),
    "freeze_vision_tower": Alias(refuse=_TEXT_ONLY),
    "freeze_multi_modal_projector": Alias(refuse=_TEXT_ONLY),
    "freeze_language_model": Alias(refuse=_TEXT_ONLY),
    "pref_beta": Alias(refuse=_PREFERENCE),
    "pref_loss": Alias(refuse=_PREFERENCE),
}

#: Keys read together into one zhtune key (see :func:`method` and :func:`precision`).
METHOD_KEYS = (
    "finetuning_type",
    "use_dora",
    "use_rslora",
    "pissa_init",
    "quantization_bit",
    "freeze_trainable_modules",
)
PRECISION_KEYS = ("bf16", "fp16", "pure_bf16")
FINETUNING = {"lora": "lora", "full": "full", "freeze": "freeze"}
LORA_FLAGS = {"use_dora": "dora", "use_rslora": "rslora", "pissa_init": "pissa"}


def method(lf: dict[str, Any]) -> dict[str, Any]:
    """``finetuning_type`` (lora by default, as in LLaMA-Factory) + ``use_dora`` / ``use_rslora`` /
    ``pissa_init`` / ``quantization_bit`` -> ``method`` (and ``quantization_bits``)."""
    kind = _lookup(FINETUNING, "finetuning_type")(lf.get("finetuning_type", "lora"))
    if lf.get("freeze_trainable_modules", "all") != "all":
        raise Refused(
            "freeze_trainable_modules other than 'all' is not supported (zhtune freezes whole layers)"
        )
    flags = [name for key, name in LORA_FLAGS.items() if lf.get(key)]
    bits = lf.get("quantization_bit")
    if bits is not None and kind == "lora" and not flags:
        if int(bits) not in (4, 8):
            raise Refused(f"quantization_bit {bits}: zhtune's qlora quantizes to 4 or 8 bits")
        return {"method": "qlora", "quantization_bits": int(bits)}
    if bits is not None:
        raise Refused(
            f"quantization_bit with finetuning_type {kind} {' '.join(flags)}: zhtune quantizes plain LoRA only (qlora)"
        )
    if flags and kind != "lora" or len(flags) > 1:
        raise Refused(
            f"{', '.join(k for k in LORA_FLAGS if lf.get(k))} with finetuning_type {kind}: one LoRA variant at a time"
        )
    return {"method": flags[0] if flags else kind}


def precision(lf: dict[str, Any]) -> dict[str, Any]:
    """``bf16`` / ``pure_bf16`` / ``fp16`` -> ``precision`` (fp32 when none is set)."""
    on = [k for k in PRECISION_KEYS if lf.get(k)]
    if len(on) > 1:
        raise Refused(f"{' and '.join(on)} are both set; choose one precision")
    return {"precision": {"bf16": "bf16", "pure_bf16": "bf16", "fp16": "fp16"}[on[0]] if on else "fp32"}


#: Groups of LLaMA-Factory keys that together set zhtune keys.
COMBINED: dict[tuple[str, ...], Callable[[dict[str, Any]], dict[str, Any]]] = {
    METHOD_KEYS: method,
    PRECISION_KEYS: precision,
}

COMBINED_KEYS = frozenset(k for keys in COMBINED for k in keys)

#: LLaMA-Factory's (and transformers') defaults where they differ from zhtune's, applied to a
#: config written in its keys: key -> value (a function of the translated values for lora_alpha).
LF_DEFAULTS: dict[str, Any] = {
    "lr": 5.0e-5,
    "lr_scheduler": "linear",
    "cutoff_len": 2048,
    "logging_steps": 500,
    "save_steps": 500,
    "gradient_checkpointing": True,
    "lora_alpha": lambda values: 2.0 * values.get("lora_rank", 8),
}
DEFAULT_DATASET_DIR = "data"
"""LLaMA-Factory's dataset_dir when none is given."""
DATASET_INFO = "dataset_info.json"


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "[]"
    return str(value)


def is_lf_config(values: dict[str, Any], own: set[str]) -> bool:
    """Any key that only LLaMA-Factory has (a combined one counts)."""
    return any(k not in own and (k in LF_KEYS or k in COMBINED_KEYS) for k in values)


@dataclass
class Translation:
    """zhtune values being built from one layer of input, with a note per translation."""

    source: str
    out: dict[str, Any]
    notes: list[str]
    set_by: dict[str, str]

    def put(self, key: str, value: Any, origin: str) -> None:
        """Set zhtune ``key``; two different input keys for one setting is an error."""
        if key in self.set_by and self.set_by[key] != origin:
            raise ZhtuneError(
                f"{self.source}: '{self.set_by[key]}' and '{origin}' both set '{key}'; keep one"
            )
        self.set_by[key] = origin
        self.out[key] = value

    def key(self, key: str, value: Any, own: set[str]) -> None:
        """One input key: zhtune's own, or an alias of :data:`LF_KEYS` (raises :class:`Refused`)."""
        alias = LF_KEYS.get(key)
        if alias is None:
            if key not in own:
                known = [*own, *LF_KEYS, *COMBINED_KEYS]
                close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
                hint = f" Did you mean: {', '.join(close)}?" if close else ""
                raise ZhtuneError(
                    f"{self.source}: unknown config key '{key}'.{hint} (see --help for all keys)"
                )
            self.put(key, value, key)
        elif value in alias.accept or (alias.refuse and value is None):
            self.notes.append(f"{key}: {value} (no-op{f': {alias.refuse}' if alias.refuse else ''})")
        elif alias.refuse:
            raise Refused(f"'{key}' is not supported: {alias.refuse}")
        elif not alias.to:
            self.notes.append(f"{key}: {_show(value)} (no-op: {alias.note})")
        else:
            try:
                new = alias.value(value) if alias.value is not None else value
            except (TypeError, ValueError):
                raise ZhtuneError(f"{self.source}: config key '{key}': {value!r} is not a valid value") from None
            self.put(alias.to, new, key)
            if _show(new) != _show(value):
                self.notes.append(f"{key}: {_show(value)} -> {alias.to}: {_show(new)}")
            elif key != alias.to:
                self.notes.append(f"{key} -> {alias.to}")

    def combined(self, values: dict[str, Any], lf: bool) -> None:
        """The :data:`COMBINED` groups; a config in LLaMA-Factory's keys gets its default method
        (lora) unless zhtune's ``method`` is given."""
        for keys, combine in COMBINED.items():
            given = {k: values[k] for k in keys if k in values}
            if not (given or (lf and keys == METHOD_KEYS)):
                continue
            said = " + ".join(f"{k}: {v}" for k, v in given.items()) or "finetuning_type: lora (default)"
            for zkey, new in combine(given).items():
                if given or zkey not in self.out:
                    self.put(zkey, new, "+".join(given) or "finetuning_type")
                    self.notes.append(f"{said} -> {zkey}: {new}")

    def lf_defaults(self, values: dict[str, Any]) -> None:
        """Where names are looked up (``dataset_dir``) and :data:`LF_DEFAULTS`, for what is not set."""
        if "data" in self.out and "registry" not in self.out:
            directory = str(values.get("dataset_dir", DEFAULT_DATASET_DIR)).rstrip("/")
            self.out["registry"] = f"{directory}/{DATASET_INFO}"
            self.notes.append(f"dataset_dir: {directory} -> registry: {self.out['registry']}")
        for key, default in LF_DEFAULTS.items():
            if key not in self.out:
                self.out[key] = default(self.out) if callable(default) else default
                self.notes.append(f"(LLaMA-Factory default) {key}: {self.out[key]}")


def translate(values: dict[str, Any], own: set[str], source: str) -> dict[str, Any]:
    """``values`` (LLaMA-Factory keys, zhtune keys, or both) in zhtune's keys, with :data:`NOTES`
    listing every translation. A refused key or value, or two keys for one setting, is an error
    naming ``source``."""
    lf = is_lf_config(values, own)
    t = Translation(source, {}, list(values.get(NOTES) or []), {})
    try:
        for key, value in values.items():
            if key not in (NOTES, "dataset_dir") and key not in COMBINED_KEYS:  # those: below
                t.key(key, value, own)
        t.combined(values, lf)
    except Refused as err:
        raise ZhtuneError(f"{source}: {err}") from None
    if "neat_packing" in values:
        t.notes.append("packing: zhtune never attends across packed samples (LLaMA-Factory's neat_packing)")
    if lf:
        t.lf_defaults(values)
    return {**t.out, NOTES: t.notes} if t.notes else t.out

"""Load a model and tokenizer from a local Hugging Face directory or a zhtune run directory.

A run directory (``config.yaml`` plus ``model/`` or ``adapter/``) is self-describing: it names
its base model, its template, and carries the tokenizer. Chat, predict, eval and serve all go
through :func:`load_for_inference`, so they need nothing but the run directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zhtune.errors import ZhtuneError
from zhtune.models.gguf import gguf_model_dir, is_gguf
from zhtune.rundir import RunDir


@dataclass(frozen=True)
class ModelSource:
    """Where the pieces of a model live."""

    weights: str
    """Directory with config.json and the (base) weights."""
    tokenizer: str
    """Directory with the tokenizer files."""
    adapter: str | None = None
    """Adapter directory (peft or bottleneck) applied on top of ``weights``, if any."""
    template: str = "auto"
    """Template name recorded by the run (``auto`` for a plain model directory)."""
    trust_remote_code: bool = False
    quantization_bits: int | None = None
    """Bits of the base weights the adapter was trained on (QLoRA runs), else None."""


def is_run_dir(path: str | Path) -> bool:
    """True if ``path`` is a finished zhtune run (config.yaml and model/ or adapter/)."""
    return RunDir(path).finished


def resolve_source(path: str | Path) -> ModelSource:
    """Work out weights, tokenizer, adapter and template for a run or model directory, or a
GGUF file (:mod:`zhtune.models.gguf`)."""
    p = Path(path)
    if not p.exists():
        raise ZhtuneError(f"model path not found: {p}")
    if is_gguf(p) and p.is_file():  # dequantized once, then read from the cache
        converted = str(gguf_model_dir(p))
        return ModelSource(converted, converted)
    run = RunDir(p)
    if run.is_export:
        return export_source(p)
    if run.finished:
        cfg = run.config()
        trust = bool(cfg.get("trust_remote_code", False))  # run-dir metadata, written by zhtune itself
        template = str(cfg.get("template", "auto"))
        if run.model_dir.is_dir():
            return ModelSource(str(run.model_dir), str(p), None, template, trust)
        base = resolve_source(cfg["model"])
        bits = int(cfg.get("quantization_bits", 4)) if cfg.get("method") == "qlora" else None
        return ModelSource(base.weights, str(p), str(run.adapter_dir), template, trust, bits)
    if not (p / "config.json").is_file():
        if run.config_path.is_file():
            raise ZhtuneError(f"{p} is a run directory without model/ or adapter/ (training did not finish?)")
        raise ZhtuneError(
            f"{p} is not a Hugging Face model directory (no config.json) nor a zhtune run directory"
        )
    return ModelSource(str(p), str(p))


def export_source(path: str | Path) -> ModelSource:
    """The :class:`ModelSource` of a ``zhtune export`` directory: its own weights and tokenizer,
    the template the run was trained with, and its ``adapter/`` when exported without merging."""
    p = Path(path)
    manifest = RunDir(p).export_manifest()
    adapter = manifest.get("adapter")
    return ModelSource(
        str(p),
        str(p),
        str(p / adapter) if adapter else None,
        str(manifest.get("template") or "auto"),
        bool(manifest.get("trust_remote_code", False)),
        manifest.get("adapter_base_bits"),
    )


def quiet_transformers() -> None:
    """Silence transformers' own per-file progress bars (zhtune shows its own progress), and
    bitsandbytes' import-time notice about optional CPU kernels."""
    import logging as std_logging

    from transformers.utils import logging

    logging.disable_progress_bar()
    std_logging.getLogger("bitsandbytes").setLevel(std_logging.ERROR)


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    """``AutoTokenizer.from_pretrained`` on a local directory (never the hub), with a clear error.
    A ``.gguf`` file gives the tokenizer of its cached conversion."""
    from transformers import AutoTokenizer

    if is_gguf(path) and Path(path).is_file():
        path = str(gguf_model_dir(path))
    if not Path(path).is_dir():
        raise ZhtuneError(f"tokenizer directory not found: {path}")
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ZhtuneError(f"cannot load a tokenizer from {path}: {err}") from None


def load_model(
    path: str,
    dtype: str = "fp32",
    trust_remote_code: bool = False,
    quantization_config: Any = None,
    device: str | None = None,
) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` on a local directory in the given dtype
    (optionally quantized by a ``transformers.BitsAndBytesConfig``), loaded straight onto
    ``device`` when one is given (else where transformers puts it: the CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    quiet_transformers()
    extra: dict[str, Any] = {"quantization_config": quantization_config} if quantization_config is not None else {}
    if device is not None:
        extra["device_map"] = {"": device}
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, trust_remote_code=trust_remote_code, **extra
        )
    except (OSError, ValueError) as err:
        raise ZhtuneError(f"cannot load a causal LM from {path}: {err}") from None


def load_for_inference(path: str | Path, dtype: str = "auto", device: str = "auto") -> tuple[Any, Any, str]:
    """Load ``(model, tokenizer, template_name)`` for generation, in eval mode, on ``device``
    (``auto``: the best one present) in ``dtype`` (``auto``: bf16 on a GPU, fp32 on a CPU; see
    :mod:`zhtune.models.device`).

    An adapter run loads its adapter on the base; LoRA-like adapters are merged in memory (same
    outputs, faster generation). A QLoRA run loads its base quantized as in training. On a CPU,
    freed memory is then kept for reuse (:mod:`zhtune.allocator`: every decoding step allocates
    and frees the same tensors; about 5% faster batched generation).
    """
    from zhtune.models.device import resolve_device, resolve_dtype

    src = resolve_source(path)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    quant = None
    if src.quantization_bits:
        from zhtune.models.quantization import quantization_config

        quant = quantization_config(src.quantization_bits, dtype)
    loaded = load_source(src, dtype, quant, adapter="merge" if quant is None else "attach", device=device)
    if next(loaded[0].parameters()).device.type == "cpu":
        from zhtune.allocator import keep_freed_memory

        keep_freed_memory()
    return loaded


def load_source(
    src: ModelSource, dtype: str, quantization: Any = None, adapter: str = "merge", device: str | None = None
) -> tuple[Any, Any, str]:
    """``(model, tokenizer, template_name)`` of a resolved source, in eval mode: the weights in
    ``dtype`` on ``device`` (quantized with a ``quantization`` config if given), embeddings grown to the
    tokenizer, and its adapter (if any) merged (``adapter="merge"``), attached unmerged
    (``"attach"``) or left out (``"skip"``); ``auto`` resolved by :func:`~zhtune.models.families.resolve_template`."""
    tokenizer = load_tokenizer(src.tokenizer, src.trust_remote_code)
    model = load_model(src.weights, dtype, src.trust_remote_code, quantization, device)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    if src.adapter and adapter != "skip":
        model = attach_adapter(model, src.adapter, merge=adapter == "merge")
    model.eval()
    from zhtune.models.families import resolve_template

    template, _ = resolve_template(
        src.template, model.config.model_type, tokenizer.get_vocab(), tokenizer.chat_template
    )
    return model, tokenizer, template


MERGEABLE = ("LORA", "ADALORA", "IA3")
"""peft adapter types whose weights fold into the base (``merge_and_unload``)."""


def attach_adapter(model: Any, adapter_dir: str, trainable: bool = False, merge: bool = False) -> Any:
    """Load the adapter saved in ``adapter_dir`` (peft or bottleneck) onto ``model``.

    ``merge`` folds LoRA-like adapters into the base weights; other kinds (prefix, prompt,
    ptuning, bottleneck) stay attached, which gives the same outputs.
    """
    from zhtune.models.bottleneck import is_bottleneck_dir, load_bottleneck

    if is_bottleneck_dir(adapter_dir):
        return load_bottleneck(model, adapter_dir, trainable=trainable)
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)
    if merge and model.peft_config["default"].peft_type.value in MERGEABLE:
        model = model.merge_and_unload()
    return model

"""Load a model and tokenizer from a local Hugging Face directory or a zhtune run directory.

A run directory (``config.yaml`` plus ``model/`` or ``adapter/``) is self-describing: it names
its base model, its template, and carries the tokenizer. Chat, predict, eval and serve all go
through :func:`load_for_inference`, so they need nothing but the run directory.

Remote code (a model's own Python files, named by ``auto_map`` in its ``config.json`` or
``tokenizer_config.json``) runs only when the command that loads it says so
(``--trust-remote-code``; ``trust_remote_code: true`` in ``zhtune train``'s own config). Nothing
read from a run directory, an export or a model folder switches it on: a run's ``config.yaml`` or
an export's ``zhtune_export.json`` that sets ``trust_remote_code`` only *asks*
(:attr:`ModelSource.asks_remote_code`), and :func:`check_remote_code` refuses to load such a
model without the flag, naming the file that asked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zhtune.allocator import keep_freed_memory
from zhtune.errors import ZhtuneError
from zhtune.models.bottleneck import is_bottleneck_dir, load_bottleneck
from zhtune.models.device import resolve_device, resolve_dtype
from zhtune.models.families import resolve_template
from zhtune.models.gguf import gguf_model_dir, is_gguf
from zhtune.models.quantization import quantization_config
from zhtune.rundir import EXPORT_MANIFEST, RunDir, checkpoint_run


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
    """Whether the model's own Python code (``auto_map``) may run: the loading command's
    ``--trust-remote-code`` only, never anything read from the run, export or model directory."""
    quantization_bits: int | None = None
    """Bits of the base weights the adapter was trained on (QLoRA runs), else None."""
    asks_remote_code: str | None = None
    """The file whose ``trust_remote_code: true`` asks for remote code (a run's ``config.yaml``,
    an export's ``zhtune_export.json``), else None. Asking enables nothing (:func:`check_remote_code`)."""


def is_run_dir(path: str | Path) -> bool:
    """True if ``path`` is a finished zhtune run (config.yaml and model/ or adapter/)."""
    return RunDir(path).finished


def resolve_source(path: str | Path, trust_remote_code: bool = False) -> ModelSource:
    """Work out weights, tokenizer, adapter and template for a run or model directory, or a
    GGUF file (:mod:`zhtune.models.gguf`).

    ``trust_remote_code`` is the caller's flag (``--trust-remote-code``) and the only thing that
    sets :attr:`ModelSource.trust_remote_code`; a run's or export's ``trust_remote_code: true`` is
    kept as :attr:`ModelSource.asks_remote_code` (the file that asked) and enables nothing."""
    p = Path(path)
    if not p.exists():
        raise ZhtuneError(f"model path not found: {p}")
    if is_gguf(p) and p.is_file():  # dequantized once, then read from the cache
        converted = str(gguf_model_dir(p))
        return ModelSource(converted, converted, trust_remote_code=trust_remote_code)
    run = RunDir(p)
    if run.is_export:
        return export_source(p, trust_remote_code)
    if run.finished:
        cfg = run.config()
        asks = str(run.config_path) if cfg.get("trust_remote_code") else None
        template = str(cfg.get("template", "auto"))
        if run.model_dir.is_dir():
            return ModelSource(
                str(run.model_dir), str(p), None, template, trust_remote_code, asks_remote_code=asks
            )
        base = resolve_source(cfg["model"], trust_remote_code)
        bits = int(cfg.get("quantization_bits", 4)) if cfg.get("method") == "qlora" else None
        return ModelSource(
            base.weights, str(p), str(run.adapter_dir), template, trust_remote_code, bits,
            asks_remote_code=asks or base.asks_remote_code,
        )  # fmt: skip
    if checkpoint_run(p) is not None:
        return checkpoint_source(p, trust_remote_code)
    if not (p / "config.json").is_file():
        if run.config_path.is_file():
            raise ZhtuneError(f"{p} is a run directory without model/ or adapter/ (training did not finish?)")
        raise ZhtuneError(
            f"{p} is not a Hugging Face model directory (no config.json) nor a zhtune run directory"
        )
    return ModelSource(str(p), str(p), trust_remote_code=trust_remote_code)


def checkpoint_source(path: Path, trust_remote_code: bool = False) -> ModelSource:
    """A run's ``checkpoints/step-N`` of an adapter: the run's base model, with the checkpoint's
    adapter and tokenizer and the run's template."""
    run = RunDir(checkpoint_run(path) or path)
    cfg = run.config() if run.config_path.is_file() else {}
    if not (path / "adapter_config.json").is_file() or "model" not in cfg:
        what = f"a {cfg['method']} run" if "method" in cfg else "a run"
        raise ZhtuneError(
            f"{path} is a checkpoint of {what} without an adapter (no adapter_config.json): it holds "
            "accelerate's training state only; resume the run (resume=true) to finish it"
        )
    base = resolve_source(cfg["model"], trust_remote_code)
    bits = int(cfg.get("quantization_bits", 4)) if cfg.get("method") == "qlora" else None
    asks = str(run.config_path) if cfg.get("trust_remote_code") else None
    return ModelSource(
        base.weights, str(path), str(path), str(cfg.get("template", "auto")), trust_remote_code, bits,
        asks_remote_code=asks or base.asks_remote_code,
    )  # fmt: skip


def export_source(path: str | Path, trust_remote_code: bool = False) -> ModelSource:
    """The :class:`ModelSource` of a ``zhtune export`` directory: its own weights and tokenizer,
    the template the run was trained with, and its ``adapter/`` when exported without merging.
    The manifest's ``trust_remote_code`` only asks (:attr:`ModelSource.asks_remote_code`)."""

    p = Path(path)
    manifest = RunDir(p).export_manifest()
    adapter = manifest.get("adapter")
    return ModelSource(
        str(p),
        str(p),
        str(p / adapter) if adapter else None,
        str(manifest.get("template") or "auto"),
        trust_remote_code,
        manifest.get("adapter_base_bits"),
        asks_remote_code=str(p / EXPORT_MANIFEST) if manifest.get("trust_remote_code") else None,
    )


# --------------------------------------------------------------------------------------------
# Remote code: only the loading command's flag lets it run
# --------------------------------------------------------------------------------------------
TRUST_HINT = "pass --trust-remote-code to allow that"
"""How a loading command allows remote code."""
TRAIN_TRUST_HINT = "set trust_remote_code: true in the training config to allow that"
"""How ``zhtune train`` allows it: its own config key (a run used as ``model:`` passes on nothing)."""


def remote_code_files(*directories: str | Path) -> list[str]:
    """The Python files (``modeling_x.py``, ...) that the ``auto_map`` of ``config.json`` and
    ``tokenizer_config.json`` in ``directories`` would import, in order, without repeats."""
    import json

    found: list[str] = []
    for directory in directories:
        for name in ("config.json", "tokenizer_config.json"):
            path = Path(directory) / name
            try:
                auto_map = json.loads(path.read_text(encoding="utf-8")).get("auto_map") or {}
            except (OSError, ValueError, AttributeError):
                continue
            refs = auto_map.values() if isinstance(auto_map, dict) else auto_map
            for ref in refs:
                for item in ref if isinstance(ref, list | tuple) else [ref]:
                    if isinstance(item, str) and "." in item:
                        module = item.split("--")[-1].rsplit(".", 1)[0]
                        file = module.replace(".", "/") + ".py"
                        if file not in found:
                            found.append(file)
    return found


def remote_code_error(
    directory: str | Path, files: list[str], asked_by: str | None, hint: str
) -> ZhtuneError:
    """The error for loading ``directory``'s own Python ``files`` without the user's permission."""
    example = f" (e.g. {files[0]})" if files else ""
    if asked_by:
        return ZhtuneError(
            f"{asked_by} sets trust_remote_code: loading it would run the Python files in {directory}"
            f"{example}; {hint}"
        )
    named = f"its auto_map names {', '.join(files)}" if files else "its auto_map names code"
    return ZhtuneError(
        f"{directory} ships its own model code ({named}): loading it would run the Python files in "
        f"{directory}; {hint}"
    )


def check_remote_code(src: ModelSource, hint: str = TRUST_HINT) -> None:
    """Refuse (:class:`ZhtuneError`, naming the file that asked and ``hint``: how to allow it) to
    load a source whose run or export metadata asks for remote code that its weights or tokenizer
    directory holds, unless the caller's flag (:attr:`ModelSource.trust_remote_code`) allows it.
    Metadata that asks where no ``auto_map`` names any code changes nothing: nothing would run."""
    if src.trust_remote_code or not src.asks_remote_code:
        return
    for directory in (src.weights, src.tokenizer):
        files = remote_code_files(directory)
        if files:
            raise remote_code_error(directory, files, src.asks_remote_code, hint)


def load_error(what: str, path: str, err: Exception) -> ZhtuneError:
    """A transformers loading error as a :class:`ZhtuneError`; its refusal to run a directory's
    own code (``trust_remote_code`` not given) names the directory and the flag."""
    if isinstance(err, ValueError) and "trust_remote_code" in str(err):
        hint = f"{TRUST_HINT} (zhtune train: trust_remote_code: true in its config)"
        return remote_code_error(path, remote_code_files(path), None, hint)
    return ZhtuneError(f"cannot load {what} from {path}: {err}")


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
        raise load_error("a tokenizer", path, err) from None


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
        raise load_error("a causal LM", path, err) from None


def load_for_inference(
    path: str | Path, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False
) -> tuple[Any, Any, str]:
    """Load ``(model, tokenizer, template_name)`` for generation, in eval mode, on ``device``
    (``auto``: the best one present) in ``dtype`` (``auto``: bf16 on a GPU, fp32 on a CPU; see
    :mod:`zhtune.models.device`). The model's own code runs only with ``trust_remote_code``
    (the command's ``--trust-remote-code``; see :func:`check_remote_code`).

    An adapter run loads its adapter on the base; LoRA-like adapters are merged in memory (same
    outputs, faster generation). A QLoRA run loads its base quantized as in training. On a CPU,
    freed memory is then kept for reuse (:mod:`zhtune.allocator`: every decoding step allocates
    and frees the same tensors; about 5% faster batched generation).
    """

    src = resolve_source(path, trust_remote_code)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    quant = None
    if src.quantization_bits:

        quant = quantization_config(src.quantization_bits, dtype)
    loaded = load_source(src, dtype, quant, adapter="merge" if quant is None else "attach", device=device)
    if next(loaded[0].parameters()).device.type == "cpu":

        keep_freed_memory()
    return loaded


def load_source(
    src: ModelSource, dtype: str, quantization: Any = None, adapter: str = "merge", device: str | None = None
) -> tuple[Any, Any, str]:
    """``(model, tokenizer, template_name)`` of a resolved source, in eval mode: the weights in
    ``dtype`` on ``device`` (quantized with a ``quantization`` config if given), embeddings grown to the
    tokenizer, and its adapter (if any) merged (``adapter="merge"``), attached unmerged
    (``"attach"``) or left out (``"skip"``); ``auto`` resolved by :func:`~zhtune.models.families.resolve_template`.
    Refused if its metadata asks for remote code the caller did not allow (:func:`check_remote_code`)."""
    check_remote_code(src)
    tokenizer = load_tokenizer(src.tokenizer, src.trust_remote_code)
    model = load_model(src.weights, dtype, src.trust_remote_code, quantization, device)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    if src.adapter and adapter != "skip":
        model = attach_adapter(model, src.adapter, merge=adapter == "merge")
    model.eval()

    template, _ = resolve_template(
        src.template, model.config.model_type, tokenizer.get_vocab(), tokenizer.chat_template
    )
    return model, tokenizer, template


def load_tokenizer_and_template(path: str | Path, trust_remote_code: bool = False) -> tuple[Any, str]:
    """``(tokenizer, template name)`` of a run, export or model directory, without its weights
    (for a backend that holds the weights itself, such as llama.cpp)."""
    src = resolve_source(path, trust_remote_code)
    check_remote_code(src)
    tokenizer = load_tokenizer(src.tokenizer, src.trust_remote_code)
    config = Path(src.weights) / "config.json"
    model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type", "") if config.is_file() else ""
    template, _ = resolve_template(src.template, model_type, tokenizer.get_vocab(), tokenizer.chat_template)
    return tokenizer, template


MERGEABLE = ("LORA", "ADALORA", "IA3")
"""peft adapter types whose weights fold into the base (``merge_and_unload``)."""


def attach_adapter(model: Any, adapter_dir: str, trainable: bool = False, merge: bool = False) -> Any:
    """Load the adapter saved in ``adapter_dir`` (peft or bottleneck) onto ``model``.

    ``merge`` folds LoRA-like adapters into the base weights; other kinds (prefix, prompt,
    ptuning, bottleneck) stay attached, which gives the same outputs.
    """

    if is_bottleneck_dir(adapter_dir):
        return load_bottleneck(model, adapter_dir, trainable=trainable)
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)
    if merge and model.peft_config["default"].peft_type.value in MERGEABLE:
        model = model.merge_and_unload()
    return model

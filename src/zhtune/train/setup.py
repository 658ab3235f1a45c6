"""Everything a training run needs before its first step, in the order it is built:
accelerator -> run directory -> model source, tokenizer and template -> data -> model and method
-> optimizer and schedule, all gathered in one :class:`Setup` for the loop
(:mod:`zhtune.train.loop`) and the save (:mod:`zhtune.train.sft`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from zhtune import rundir
from zhtune.data.batching import batches_per_epoch, split_validation
from zhtune.data.convert import RejectWriter
from zhtune.data.dataset import Tokenized, pack_examples, tokenize_records, tokenize_texts
from zhtune.data.registry import load_records
from zhtune.data.templates import Template, get_template, prepare_tokenizer
from zhtune.errors import ZhtuneError
from zhtune.models.device import grouped_query_attention_in_kernel
from zhtune.models.families import can_pack, check_packing, has_plain_head, resolve_template
from zhtune.models.gguf import is_gguf
from zhtune.models.loading import (
    TRAIN_TRUST_HINT,
    ModelSource,
    check_remote_code,
    load_error,
    load_model,
    load_tokenizer,
    resolve_source,
)
from zhtune.models.quantization import quantization_config
from zhtune.rundir import RunDir
from zhtune.train import native
from zhtune.train.compile import (
    CompileMode,
    blocks_repay,
    check_compile,
    compile_blocks,
    compile_mode,
    trust_probed_vec_isa,
)
from zhtune.train.config import TrainConfig
from zhtune.train.methods import METHODS, Method, continue_adapter


@dataclass
class TrainData:
    """The tokenized data of a run."""

    train_set: list[dict[str, list[int]]]
    """Training sequences (packed when ``packing``)."""
    val_set: list[dict[str, list[int]]]
    n_samples: int
    """Training examples before packing."""
    n_docs: int
    """Documents read (stage pt)."""
    n_rejected: int
    """Records rejected while reading or rendering."""
    tokenized: Tokenized


@dataclass
class Setup:
    """A run ready for its first step."""

    cfg: TrainConfig
    """The resolved config (template name, absolute model path): what config.yaml records."""
    accelerator: Any
    out: Path
    src: ModelSource
    tokenizer: Any
    template: Template | None
    template_why: str
    model_type: str
    data: TrainData
    method: Method
    model: Any
    """Prepared by accelerate (wrapped under DDP / FSDP / DeepSpeed)."""
    optimizer: Any
    scheduler: Any
    fused: Any
    """The output layer when the loss is computed here (:mod:`zhtune.train.loss`), else None."""
    compiled: CompileMode
    """What torch.compile compiles (``compile`` resolved for this device)."""
    n_compiled: int
    """Decoder blocks (``blocks``), or RMSNorms and LLaMA attention modules (``kernels``: their
    norm and rotation kernels) compiled."""
    cpu_attention: str
    """Which of :mod:`zhtune.train.attention`'s kernels attention runs: ``native`` (C++), ``compiled``
    (the backward compiled; rows of fixed length), or ``""`` (transformers' own)."""
    native_ops: bool
    """Whether the norms, the MLP activation and the rotation run zhtune's native elementwise
    kernels (:func:`zhtune.train.native.elementwise`; the loss runs them wherever that holds)."""
    n_trainable: int
    n_total: int
    n_batches: int
    """Global micro-batches per epoch."""
    steps_per_epoch: int
    total_steps: int
    warmup: int

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


def setup(cfg: TrainConfig) -> Setup:
    """Build everything for ``cfg``, in order (see the module docstring)."""
    import torch
    from accelerate.utils import set_seed

    from zhtune.train.loss import output_layer

    accelerator = make_accelerator(cfg)
    grouped_query_attention_in_kernel(accelerator.device.type)
    if cfg.compile not in (False, "auto"):
        check_compile(accelerator.device.type)  # before the data and the model take their time
    out = prepare_output_dir(cfg) if accelerator.is_main_process else Path(cfg.output_dir)
    accelerator.wait_for_everyone()
    set_seed(cfg.seed)

    cfg, src, tokenizer, template, why, model_type, n_added = resolve_model(cfg)
    data = load_train_data(cfg, tokenizer, template, model_type, out, accelerator.is_main_process)
    n_batches = batches_per_epoch(len(data.train_set), cfg.batch_size, accelerator.num_processes)
    steps_per_epoch = math.ceil(n_batches / cfg.grad_accum)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * steps_per_epoch))

    method = METHODS[cfg.method]
    engine = accelerator.distributed_type.value  # FSDP and DeepSpeed shard the weights
    sharded = engine in ("FSDP", "DEEPSPEED")
    model, compiled, n_compiled, cpu_attention, native_ops = build_model(
        cfg, src, tokenizer, n_added, method, total_steps, sharded, accelerator.device.type
    )
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, fused=not sharded)
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.lr_scheduler, warmup, total_steps))
    configure_deepspeed(accelerator, cfg)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    # The loop autocasts itself and the loss is computed inside forward; Accelerate's wrapper would
    # also cast the returned logits to fp32, ~10% of a CPU step with a 4k vocabulary, for nothing.
    accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    model.train()
    fuse = cfg.fused_loss and not sharded and not method.virtual_tokens
    fused = output_layer(accelerator.unwrap_model(model)) if fuse and has_plain_head(model_type) else None
    return Setup(
        cfg, accelerator, out, src, tokenizer, template, why, model_type, data, method, model, optimizer,
        scheduler, fused, compiled, n_compiled, cpu_attention, native_ops, n_trainable, n_total, n_batches, steps_per_epoch, total_steps, warmup,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# The pieces, in order
# --------------------------------------------------------------------------------------------
def make_accelerator(cfg: TrainConfig) -> Any:
    """An ``Accelerator`` for ``cfg``'s precision and accumulation, checked against the launcher."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, parse_flag_from_env

    if cfg.precision == "fp16" and not torch.cuda.is_available():
        raise ZhtuneError("config key 'precision': fp16 needs a GPU; use bf16 or fp32 on a CPU")
    # Accelerate keeps one process-wide state; a second run in the same process (tests, experiment
    # grids) may want another precision, so start its mixed-precision state afresh. The process
    # group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    # Under torchrun on a machine without GPUs, Accelerate forms a (gloo) process group only when
    # told to use the CPU; otherwise every process would train alone and all would write the run.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    has_accelerator = (
        torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    )
    # Accelerate sets FSDP up on GPUs only: on CPUs it would drop the launcher's FSDP settings (and
    # train as DDP) or fail. Torch's FSDP2 runs on CPUs too (gloo): switch to it below.
    fsdp_on_cpu = world_size > 1 and not has_accelerator and parse_flag_from_env("ACCELERATE_USE_FSDP")
    if fsdp_on_cpu and os.environ.get("FSDP_VERSION", "1") != "2":
        raise ZhtuneError(
            "FSDP on CPUs needs FSDP2: launch with configs/accelerate/fsdp2.yaml (fsdp_version: 2); "
            "fsdp.yaml (FSDP1) runs on GPUs only"
        )
    accelerator = Accelerator(
        mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.precision],
        cpu=world_size > 1 and not has_accelerator,
        gradient_accumulation_steps=cfg.grad_accum,
        # zhtune shards the data itself and counts optimizer steps globally: one scheduler step
        # per optimizer step (by default Accelerate steps it num_processes times)
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        log_with=cfg.report_to or None,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.ddp_timeout))],
        project_dir=str(Path(cfg.output_dir) / rundir.TRACKING),
    )
    accelerator.gradient_accumulation_steps = cfg.grad_accum  # a launcher's setting must not win
    if fsdp_on_cpu:
        switch_to_fsdp2(accelerator)
    if accelerator.num_processes != world_size:
        raise ZhtuneError(
            f"launched {world_size} processes but Accelerate sees {accelerator.num_processes}; "
            "check the launcher (accelerate launch / torchrun) and its config"
        )
    return accelerator


def switch_to_fsdp2(accelerator: Any) -> None:
    """Turn ``accelerator``'s CPU (gloo) process group into FSDP2 with the launcher's ``FSDP_*``
    settings: what Accelerate itself does with a GPU process group (its ``AcceleratorState``, and
    the shared ``PartialState`` every later state copies the type from)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # reads FSDP_VERSION, FSDP_AUTO_WRAP_POLICY, ...
    state = accelerator.state
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def prepare_output_dir(cfg: TrainConfig) -> Path:
    """Create the run directory; refuse to clobber a finished run unless asked."""
    out = Path(cfg.output_dir)
    run = RunDir(out)
    finished = run.model_dir.exists() or run.adapter_dir.exists()
    if finished and not (cfg.overwrite or cfg.resume):
        raise ZhtuneError(
            f"{out} already holds a finished run; choose another output_dir, or pass overwrite=true "
            "(or resume=true to continue from its last checkpoint)"
        )
    if cfg.overwrite and not cfg.resume:
        stale = (rundir.MODEL, rundir.ADAPTER, rundir.CHECKPOINTS, rundir.LOG, rundir.TRUNCATED, rundir.REJECTS)
        for name in (*stale, "pissa_init"):
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def resolve_model(
    cfg: TrainConfig,
) -> tuple[TrainConfig, ModelSource, Any, Template | None, str, str, int]:
    """``(resolved cfg, source, tokenizer, template, why that template, model type, tokens
    added)``: the base model's files, its tokenizer made ready for the template."""
    import transformers


    # only this run's own config key lets model code run; a run used as `model:` passes on nothing
    src = resolve_source(cfg.model, cfg.trust_remote_code)
    if src.adapter:
        raise ZhtuneError(f"{cfg.model} is a LoRA run; merge it first (export --merge) to train on top of it")
    check_remote_code(src, TRAIN_TRUST_HINT)
    tokenizer = load_tokenizer(src.tokenizer, src.trust_remote_code)
    try:
        model_type = transformers.AutoConfig.from_pretrained(
            src.weights, trust_remote_code=src.trust_remote_code
        ).model_type
    except (OSError, ValueError) as err:
        raise load_error("a model config", src.weights, err) from None
    name, why = resolve_template(cfg.template, model_type, tokenizer.get_vocab(), tokenizer.chat_template)
    template = get_template(name)
    n_added = prepare_tokenizer(tokenizer, template)
    # A GGUF base stays recorded as the file (the run directory says where it came from; its
    # dequantized copy is a cache, rebuilt from the file if removed).
    base = cfg.model if is_gguf(cfg.model) else src.weights
    cfg = replace(cfg, template=name, model=str(Path(base).resolve()))
    return cfg, src, tokenizer, template, why, model_type, n_added


def read_examples(
    cfg: TrainConfig, sources: list[str], tokenizer: Any, template: Template | None, rejects: RejectWriter
) -> tuple[Tokenized, int]:
    """``sources`` (files or registered names) read and tokenized for ``cfg.stage``:
    ``(examples, documents)``. Records that cannot be read go to ``rejects``; those that cannot be
    rendered are in the result's ``rejects``."""
    records = load_records(sources, rejects, cfg.format, cfg.registry or None, cfg.max_samples)
    if cfg.stage == "pt":
        blocks, n_docs = tokenize_texts(records, tokenizer, cfg.cutoff_len)
        return Tokenized(examples=blocks), n_docs
    return tokenize_records(records, tokenizer, template, cfg.cutoff_len, cfg.train_on_prompt), 0


def load_train_data(
    cfg: TrainConfig, tokenizer: Any, template: Template | None, model_type: str, out: Path, is_main: bool
) -> TrainData:
    """Read, render, split (and pack) the data, and the validation data when ``val_data`` names
    its own; rejects (of both) and truncations (of training data) go to the run directory."""
    rejects_path = out / rundir.REJECTS
    with RejectWriter(str(rejects_path) if is_main else None) as unreadable:
        tok, n_docs = read_examples(cfg, cfg.data, tokenizer, template, unreadable)
        val = read_examples(cfg, cfg.val_data, tokenizer, template, unreadable)[0] if cfg.val_data else Tokenized()
    unrendered = tok.rejects + val.rejects
    if is_main:
        write_jsonl(rejects_path, unrendered, append=True)
        write_jsonl(out / rundir.TRUNCATED, tok.truncated)
    for name, sources, got in (("training", cfg.data, tok), ("validation", cfg.val_data, val)):
        if sources and not got.examples:
            raise ZhtuneError(f"no usable {name} records in {', '.join(sources)} (see {rejects_path})")
    if cfg.val_data:
        train_set, val_set = tok.examples, val.examples
    else:
        train_set, val_set = split_validation(tok.examples, cfg.val_size, cfg.seed)
    n_samples = len(train_set)
    if cfg.packing and cfg.stage == "sft":
        check_packing(model_type)
        train_set = pack_examples(train_set, cfg.cutoff_len)
    return TrainData(train_set, val_set, n_samples, n_docs, unreadable.count + len(unrendered), tok)


def build_model(
    cfg: TrainConfig,
    src: ModelSource,
    tokenizer: Any,
    n_added: int,
    method: Method,
    total_steps: int,
    sharded: bool = False,
    device_type: str = "cpu",
) -> tuple[Any, CompileMode, int, str, bool]:
    """The base model with the method applied (or an adapter continued), its LoRA layers and
    RMSNorms fused unless ``sharded`` (FSDP, DeepSpeed) or configured off, and compiled as
    ``compile`` resolves for ``device_type`` and this run's length; ``(model, what is compiled,
    how many decoder blocks or RMSNorms, which CPU attention kernels run (:attr:`Setup.cpu_attention`),
    whether the native elementwise kernels run (:attr:`Setup.native_ops`))``. On a CPU in bf16
    attention runs the native kernels where they are built, else, when the run compiles, a
    backward compiled once for packed rows (or pre-training blocks), which the loop pads to
    ``cutoff_len``, and once per tile count (128 tokens) met for unpacked rows."""
    import torch

    from zhtune.train.attention import use_cpu_attention
    from zhtune.train.fused import fuse_for_training
    from zhtune.train.loss import frozen_to
    from zhtune.train.residual import swap_decoder_layers
    from zhtune.train.rope import swap_attention

    quant = quantization_config(cfg.quantization_bits, cfg.precision) if method.quantized else None
    model = load_model(src.weights, "fp32", src.trust_remote_code, quant)  # = cfg.trust_remote_code
    if n_added or len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.use_cache = False
    if cfg.attn_implementation != "auto":
        try:
            model.set_attn_implementation(cfg.attn_implementation)
        except (ImportError, ValueError) as err:
            raise ZhtuneError(f"config key 'attn_implementation': {err}") from None
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.init_adapter:
        model = continue_adapter(model, cfg.init_adapter, cfg)
    else:
        model = method.prepare(model, cfg, total_steps)
    if cfg.precision == "bf16" and cfg.bf16_frozen and method.save_dir == "adapter" and not method.quantized:
        frozen_to(model, torch.bfloat16)
    fused = cfg.fused_kernels and not sharded
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.cutoff_len
    long_run = not sharded and blocks_repay(sum(p.numel() for p in model.parameters()), tokens_per_step, total_steps)
    compiled = compile_mode(cfg.compile, device_type, fused, long_run)
    if compiled != "off" and device_type == "cpu":
        trust_probed_vec_isa()  # Inductor's per-process probe, once per machine
    native_ops = fused and compiled != "blocks" and native.elementwise(device_type, cfg.precision == "bf16")  # (blocks compile these)
    n_kernels = fuse_for_training(model, compiled == "kernels", not cfg.gradient_checkpointing, native_ops)["rmsnorm"] if fused else 0
    attention = (
        use_cpu_attention(model, one_batch_shape(cfg, compiled), compiled=compiled != "off")
        if fused and device_type == "cpu" and cfg.precision == "bf16"
        else ""
    )
    if native_ops:  # (the residual stream through the native norms)
        swap_decoder_layers(model)
    if fused and compiled != "blocks":  # q/k/v stacked; the rotation compiled, for one shape if so
        n_attention = swap_attention(model, compiled == "kernels", one_batch_shape(cfg, compiled), native_ops)
        n_kernels += n_attention if compiled == "kernels" and not native_ops else 0
    if compiled == "blocks":
        dynamic_rows = packs_batches(cfg, model.config.model_type, method)
        return model, compiled, compile_blocks(model, dynamic_rows), attention, native_ops
    if compiled == "kernels" and (n_kernels or attention == "compiled"):
        return model, compiled, n_kernels, attention, native_ops
    return model, "off", 0, attention, native_ops  # (kernels: a family without LLaMA's RMSNorm has none to compile)


def packs_batches(cfg: TrainConfig, model_type: str, method: Method) -> bool:
    """Whether each micro-batch of unpacked SFT samples runs as packed rows (``padding_free``):
    the family keeps packed samples apart and the method prepends no virtual tokens."""
    return (
        cfg.padding_free and not cfg.packing and cfg.stage == "sft"
        and can_pack(model_type) and not method.virtual_tokens
    )  # fmt: skip


def fixed_rows(cfg: TrainConfig) -> bool:
    """Whether ``cfg``'s rows can all be padded to ``cutoff_len`` at little cost (packed samples,
    pre-training blocks): what compiled code with one shape wants (the blocks; the attention kernel
    compiles fewer shapes)."""
    return cfg.packing or cfg.stage == "pt"


def one_batch_shape(cfg: TrainConfig, compiled: str) -> bool:
    """Whether the loop pads every micro-batch to ``(batch_size, cutoff_len)`` (:func:`fixed_rows`,
    when anything is compiled: the blocks, the rotation, attention's backward): the compiled code
    then meets one shape, traced static (less tracing than symbolic sizes)."""
    return compiled != "off" and fixed_rows(cfg)


def configure_deepspeed(accelerator: Any, cfg: TrainConfig) -> None:
    """DeepSpeed has no DataLoader to read the batch size from, and steps and clips itself: give
    it zhtune's micro-batch, accumulation and clipping."""
    if accelerator.state.deepspeed_plugin is None:
        return
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds["gradient_accumulation_steps"] = cfg.grad_accum
    ds["train_batch_size"] = cfg.batch_size * cfg.grad_accum * accelerator.num_processes
    ds["gradient_clipping"] = cfg.max_grad_norm


def build_optimizer(model: Any, lr: float, weight_decay: float, fused: bool = False) -> Any:
    """AdamW over trainable parameters; no weight decay on biases and norm weights (1-D).

    ``fused``: PyTorch's fused AdamW kernel, one vectorised pass over each parameter and its
    moments. The default on a CPU runs each parameter through a chain of tensor ops with
    temporaries the size of the parameter: SmolLM2's full fine-tuning step spends 330-390 ms
    there against 90 ms fused (the same update to fp32 rounding, tested). Not with FSDP or
    DeepSpeed, which shard (or replace) the optimizer's parameters."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, fused=fused or None)


def lr_lambda(kind: str, warmup: int, total: int) -> Any:
    """Multiplier of the peak lr at each step: linear warm-up, then cosine/linear/constant."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def write_jsonl(path: Path, rows: list[dict[str, Any]], append: bool = False) -> None:
    """Write ``rows`` as JSON Lines (nothing, not even a file, when there are none)."""
    if not rows:
        return
    with path.open("a" if append else "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def parallelism(accelerator: Any) -> str:
    """How the processes share the model: DDP, FSDP1 / FSDP2 or DeepSpeed ZeRO-N ("" for one)."""
    kind = accelerator.distributed_type.value
    if kind == "FSDP":
        return f"FSDP{accelerator.state.fsdp_plugin.fsdp_version}"
    if kind == "DEEPSPEED":
        return f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    return "DDP" if accelerator.num_processes > 1 else ""


def banner(s: Setup) -> str:
    """The start-up lines: what is trained on what, template and why, data, schedule, device."""

    cfg, data, tok = s.cfg, s.data, s.data.tokenized
    n_trainable, n_total = s.n_trainable, s.n_total
    if cfg.stage == "pt":
        data_line = (
            f"{data.n_docs} documents -> {data.n_samples} train / {len(data.val_set)} validation blocks "
            f"of {cfg.cutoff_len} tokens"
        )
    else:
        lost = sum(t["lost_response_tokens"] > 0 for t in tok.truncated)
        data_line = (
            f"{data.n_samples} train / {len(data.val_set)} validation examples"
            + (f" packed into {len(data.train_set)} sequences" if cfg.packing else "")
            + f", {data.n_rejected} rejected, {tok.n_truncated} truncated to {cfg.cutoff_len} tokens"
            + (f" ({lost} lost response tokens; see {rundir.TRUNCATED})" if tok.truncated else "")
        )
    gguf = f", dequantized copy {s.src.weights}" if is_gguf(cfg.model) else ""
    epochs = cfg.epochs if cfg.max_steps <= 0 else "-"
    acc = s.accelerator
    engine = parallelism(acc)
    lines = [
        f"zhtune train: {cfg.stage} {cfg.method} on {cfg.model} ({s.model_type}{gguf}), "
        f"{n_trainable:,} trainable / {n_total:,} params ({100 * n_trainable / n_total:.2f}%)",
        f"  template: {cfg.template} ({s.template_why})",
        f"  data: {data_line}",
        f"  {s.total_steps} steps = {epochs} epochs x {s.steps_per_epoch} steps (batch {cfg.batch_size} x "
        f"accum {cfg.grad_accum} x {acc.num_processes} proc), lr {cfg.lr} {cfg.lr_scheduler}, warmup "
        f"{s.warmup}, {cfg.precision}, device {acc.device}" + (f", {engine}" if engine else ""),
        f"  run directory: {s.out}",
    ]
    if cfg.translated:
        lines.append(f"  LLaMA-Factory keys translated ({len(cfg.translated)}):")
        lines += [f"    {note}" for note in cfg.translated]
    if cfg.report_to:
        lines.append(f"  reporting to: {', '.join(cfg.report_to)} (files under {s.out / rundir.TRACKING})")
    if s.compiled != "off":
        what = (
            f"{s.n_compiled} decoder blocks"
            if s.compiled == "blocks"
            else f"kernels for {s.n_compiled} modules (RMSNorm, LLaMA's rotary embedding, full fine-tuning's MLP activation)"
        )
        if s.cpu_attention == "compiled":
            what += ", attention's backward"
        lines.append(f"  compiling {what} (torch.compile, compile={cfg.compile}; the first step waits for it)")
    if s.cpu_attention == "native":
        lines.append("  attention: zhtune's CPU kernels (C++, bf16 on AMX; ZHTUNE_NATIVE=0 for SDPA)")
    native_loss = s.fused is not None and native.elementwise(s.accelerator.device.type, cfg.precision == "bf16")
    parts = ["the loss"] * native_loss + ["RMSNorm, SwiGLU, rotary embedding"] * s.native_ops
    if parts:
        lines.append(f"  native kernels (C++, AVX-512 bf16): {', '.join(parts)}")
    return "\n".join(lines)

"""Training, top to bottom: config -> data -> model -> loop -> run directory.

Two stages share the loop: ``sft`` (conversations rendered by a chat template, loss on the
assistant turns; optionally packed) and ``pt`` (continued pre-training: texts concatenated and cut
into blocks). The method registry (:mod:`zhtune.train.methods`) decides what is trained.

The loop is explicit (no ``Trainer`` subclass) and runs on 🤗 Accelerate, so the same code runs
on one CPU, one GPU, or many processes under ``accelerate launch`` / ``torchrun``.

Loss normalisation: the loss of an optimizer step is the sum of token losses over all of its
micro-batches (and processes) divided by the number of labelled tokens in the whole step. So
``batch_size=1, grad_accum=8`` gives the same update as ``batch_size=8, grad_accum=1``.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

from zhtune import rundir
from zhtune.config import save_config
from zhtune.data.dataset import Tokenized
from zhtune.errors import ZhtuneError
from zhtune.plots import plot_loss
from zhtune.rundir import RunDir
from zhtune.train.config import TrainConfig


# --------------------------------------------------------------------------------------------
# Run directory
# --------------------------------------------------------------------------------------------
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
        for name in (rundir.MODEL, rundir.ADAPTER, rundir.CHECKPOINTS, rundir.LOG, rundir.TRUNCATED, rundir.REJECTS, "pissa_init"):
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
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
) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """Yield ``(epoch, batch_index, batch)`` forever, starting at a given position.

    Batches are padded to a multiple of 8 tokens; with ``fixed_length`` (packed samples or
    pre-training blocks, none longer), every batch is padded to exactly that many tokens and
    ``batch_size`` rows, with empty rows (no labels, no attention) after an epoch's short last
    batch: one shape, which compiled code needs to run without recompiling.

    Data parallel: every process draws the same seeded global batches of ``batch_size *
    num_processes`` samples and keeps its own share of each, so N processes together see exactly
    what one process with an N times larger batch sees. ``batch_index`` counts global batches.
    """
    from zhtune.data.dataset import pad_batch

    lengths = [len(ex["input_ids"]) for ex in examples] if group_by_length else None
    epoch = start_epoch
    while True:
        batches = epoch_batches(len(examples), batch_size * num_processes, seed, epoch, lengths)
        batches = [b for b in batches if len(b) >= num_processes]  # see batches_per_epoch
        for b in range(start_batch if epoch == start_epoch else 0, len(batches)):
            rows = [examples[i] for i in shard(batches[b], rank, num_processes)]
            if fixed_length:
                rows += [{k: [] for k in rows[0]}] * (batch_size - len(rows))
            yield epoch, b, pad_batch(rows, pad_id, fixed_length or 8)
        epoch += 1


# --------------------------------------------------------------------------------------------
# Logging and plots
# --------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------
# Optimisation
# --------------------------------------------------------------------------------------------
def build_optimizer(model: Any, lr: float, weight_decay: float) -> Any:
    """AdamW over trainable parameters; no weight decay on biases and norm weights (1-D)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


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


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, progress: bool = True) -> Path:
    """Train as configured (stage sft or pt, any registered method); return the run directory."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from zhtune.allocator import keep_freed_memory
    from zhtune.data.dataset import model_inputs, pack_examples, tokenize_records, tokenize_texts
    from zhtune.data.registry import load_data
    from zhtune.data.templates import get_template, prepare_tokenizer, stop_token_ids
    from zhtune.models.families import check_packing, has_plain_head, resolve_template
    from zhtune.models.gguf import is_gguf
    from zhtune.models.loading import load_model, load_tokenizer, resolve_source
    from zhtune.models.quantization import quantization_config
    from zhtune.models.token_loss import mean_token_loss
    from zhtune.progress import progress_bar
    from zhtune.train.compile import check_compile, compile_blocks
    from zhtune.train.loss import frozen_to, fused_causal_lm_loss, output_layer
    from zhtune.train.methods import METHODS, continue_adapter

    started = time.time()
    if cfg.precision == "fp16" and not torch.cuda.is_available():
        raise ZhtuneError("config key 'precision': fp16 needs a GPU; use bf16 or fp32 on a CPU")
    # Accelerate keeps one process-wide state; a second run in the same process (tests, experiment
    # grids) may want another precision, so start its mixed-precision state afresh. The process
    # group (PartialState) is kept.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    from accelerate.utils import DataLoaderConfiguration

    # Under torchrun on a machine without GPUs, Accelerate forms a (gloo) process group only when
    # told to use the CPU; otherwise every process would train alone and all would write the run.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    has_accelerator = (
        torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    )
    accelerator = Accelerator(
        mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.precision],
        cpu=world_size > 1 and not has_accelerator,
        gradient_accumulation_steps=cfg.grad_accum,
        # zhtune shards the data itself and counts optimizer steps globally: one scheduler step
        # per optimizer step (by default Accelerate steps it num_processes times)
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )
    accelerator.gradient_accumulation_steps = cfg.grad_accum  # a launcher's setting must not win
    if accelerator.num_processes != world_size:
        raise ZhtuneError(
            f"launched {world_size} processes but Accelerate sees {accelerator.num_processes}; "
            "check the launcher (accelerate launch / torchrun) and its config"
        )
    if cfg.compile:
        check_compile(accelerator.device.type)
    is_main = accelerator.is_main_process
    say = accelerator.print
    out = prepare_output_dir(cfg) if is_main else Path(cfg.output_dir)
    accelerator.wait_for_everyone()
    set_seed(cfg.seed)

    # -- model source, tokenizer and template -------------------------------------------------
    src = resolve_source(cfg.model)
    if src.adapter:
        raise ZhtuneError(f"{cfg.model} is a LoRA run; merge it first (export --merge) to train on top of it")
    tokenizer = load_tokenizer(src.tokenizer, cfg.trust_remote_code)
    import transformers

    model_type = transformers.AutoConfig.from_pretrained(
        src.weights, trust_remote_code=cfg.trust_remote_code
    ).model_type
    template_name, template_why = resolve_template(
        cfg.template, model_type, tokenizer.get_vocab(), tokenizer.chat_template
    )
    template = get_template(template_name)
    n_added = prepare_tokenizer(tokenizer, template)
    # A GGUF base stays recorded as the file (the run directory says where it came from; its
    # dequantized copy is a cache, rebuilt from the file if removed).
    base = cfg.model if is_gguf(cfg.model) else src.weights
    cfg = replace(cfg, template=template_name, model=str(Path(base).resolve()))

    # -- data ---------------------------------------------------------------------------------
    rejects_path = out / rundir.REJECTS
    records, n_rejected = load_data(
        cfg.data,
        fmt=cfg.format,
        registry=cfg.registry or None,
        rejects_path=rejects_path if is_main else None,
    )
    if cfg.stage == "pt":
        blocks, n_docs = tokenize_texts(records, tokenizer, cfg.cutoff_len)
        tok = Tokenized(examples=blocks)
    else:
        tok = tokenize_records(records, tokenizer, template, cfg.cutoff_len, cfg.train_on_prompt)
    if is_main:
        write_jsonl(rejects_path, tok.rejects, append=True)
        write_jsonl(out / rundir.TRUNCATED, tok.truncated)
    if not tok.examples:
        raise ZhtuneError(f"no usable training records in {', '.join(cfg.data)} (see {rejects_path})")
    train_set, val_set = split_validation(tok.examples, cfg.val_size, cfg.seed)
    n_samples = len(train_set)
    if cfg.packing and cfg.stage == "sft":
        check_packing(model_type)
        train_set = pack_examples(train_set, cfg.cutoff_len)
    n_batches = batches_per_epoch(len(train_set), cfg.batch_size, accelerator.num_processes)
    steps_per_epoch = math.ceil(n_batches / cfg.grad_accum)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * steps_per_epoch))

    # -- model and method ---------------------------------------------------------------------
    method = METHODS[cfg.method]
    quant = quantization_config(cfg.quantization_bits, cfg.precision) if method.quantized else None
    model = load_model(src.weights, "fp32", cfg.trust_remote_code, quant)
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
    n_compiled = compile_blocks(model) if cfg.compile else 0
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())

    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    warmup = int(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.lr_scheduler, warmup, total_steps))
    if accelerator.state.deepspeed_plugin is not None:
        # DeepSpeed: no DataLoader to read the batch size from, and it steps and clips itself
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
        ds["gradient_accumulation_steps"] = cfg.grad_accum
        ds["train_batch_size"] = cfg.batch_size * cfg.grad_accum * accelerator.num_processes
        ds["gradient_clipping"] = cfg.max_grad_norm
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    # The loop autocasts itself and the loss is computed inside forward; Accelerate's wrapper would
    # also cast the returned logits to fp32, ~10% of a CPU step with a 4k vocabulary, for nothing.
    accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    model.train()
    fused = None  # the output layer, when the loss is computed here (see zhtune.train.loss)
    engine = accelerator.distributed_type.value  # FSDP and DeepSpeed shard the output layer's weight
    if (
        cfg.fused_loss
        and engine not in ("FSDP", "DEEPSPEED")
        and not method.virtual_tokens
        and has_plain_head(model_type)
    ):
        fused = output_layer(accelerator.unwrap_model(model))

    # -- resume -------------------------------------------------------------------------------
    step, epoch, batch_pos = 0, 0, 0
    tokens_seen = 0  # non-pad input tokens so far, all processes
    run = RunDir(out)
    log_path = run.log_path
    ckpt = run.latest_checkpoint() if cfg.resume else None
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        state = json.loads((ckpt / rundir.STATE).read_text())
        step, epoch, batch_pos, tokens_seen = state["step"], state["epoch"], state["batch"], state["tokens"]
        if is_main:  # drop log rows written after the checkpoint: the curve continues from it
            rows = [r for r in run.log() if r["step"] <= step]
            log_path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif cfg.resume:
        say(f"resume=true but no checkpoint in {run.checkpoints_dir}; starting from scratch")
    if is_main:
        save_config(cfg, run.config_path)

    if cfg.stage == "pt":
        data_line = f"{n_docs} documents -> {n_samples} train / {len(val_set)} validation blocks of {cfg.cutoff_len} tokens"
    else:
        data_line = (
            f"{n_samples} train / {len(val_set)} validation examples"
            + (f" packed into {len(train_set)} sequences" if cfg.packing else "")
            + f", {n_rejected + len(tok.rejects)} rejected, {tok.n_truncated} truncated to {cfg.cutoff_len} tokens"
            + (
                f" ({sum(t['lost_response_tokens'] > 0 for t in tok.truncated)} lost response tokens; see truncated.jsonl)"
                if tok.truncated
                else ""
            )
        )
    say(
        f"zhtune train: {cfg.stage} {cfg.method} on {cfg.model} ({model_type}"
        + (f", dequantized copy {src.weights}" if is_gguf(cfg.model) else "")
        + "), "
        f"{n_trainable:,} trainable / {n_total:,} params ({100 * n_trainable / n_total:.2f}%)\n"
        f"  template: {template_name} ({template_why})\n"
        f"  data: {data_line}\n"
        f"  {total_steps} steps = {cfg.epochs if cfg.max_steps <= 0 else '-'} epochs x {steps_per_epoch} steps "
        f"(batch {cfg.batch_size} x accum {cfg.grad_accum} x {accelerator.num_processes} proc), lr {cfg.lr} "
        f"{cfg.lr_scheduler}, warmup {warmup}, {cfg.precision}, device {accelerator.device}\n"
        f"  run directory: {out}"
        + (
            f"\n  compiling {n_compiled} decoder blocks (torch.compile; the first steps wait for it)"
            if n_compiled
            else ""
        )
    )

    # -- loop ---------------------------------------------------------------------------------
    if accelerator.device.type == "cpu":
        keep_freed_memory()  # every step frees and allocates the same activations again
    pad_id = tokenizer.pad_token_id
    stream = micro_batches(
        train_set,
        cfg.batch_size,
        cfg.seed,
        pad_id,
        epoch,
        batch_pos,
        cfg.group_by_length,
        rank=accelerator.process_index,
        num_processes=accelerator.num_processes,
        fixed_length=cfg.cutoff_len if cfg.compile and (cfg.packing or cfg.stage == "pt") else 0,
    )
    bar = progress_bar("train", progress and is_main, total=total_steps, initial=step, dynamic_ncols=True)
    window_loss, window_tokens, window_seen, window_start = 0.0, 0, 0, time.time()
    last_eval_epoch = epoch
    log_file = log_path.open("a", encoding="utf-8") if is_main else None
    while step < total_steps:
        group = [next(stream) for _ in range(cfg.grad_accum)]
        epoch, batch_pos = group[-1][0], group[-1][1] + 1
        n_tokens = torch.tensor(
            sum(int((b["labels"][:, 1:] != -100).sum()) for _, _, b in group), device=accelerator.device
        )
        n_tokens = int(accelerator.reduce(n_tokens, "sum"))
        local = torch.zeros(2, dtype=torch.float64)  # this process's share of the loss, tokens seen
        for _, _, batch in group:
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            # accumulate(): gradients are synchronised (and DeepSpeed steps) on the last
            # micro-batch of the step only
            with accelerator.accumulate(model), accelerator.autocast():
                # sum(token losses of this micro-batch) / tokens of the whole step, all processes
                if fused is not None:
                    loss = fused_causal_lm_loss(model, fused, model_inputs(batch), n_tokens)
                else:
                    loss = model(**model_inputs(batch), num_items_in_batch=n_tokens, use_cache=False).loss
                # the processes' gradients are averaged and Accelerate divides by grad_accum:
                # scale back so the step's gradient is that of the loss above, summed
                accelerator.backward(loss * accelerator.num_processes * cfg.grad_accum)
            local[0] += loss.item()
            local[1] += int(batch["attention_mask"].sum())
        step_loss, seen = accelerator.reduce(local.to(accelerator.device), "sum").tolist()
        window_seen += int(seen)
        grad_norm = (
            accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            if cfg.max_grad_norm > 0
            else None
        )
        optimizer.step()
        if method.after_step is not None:
            method.after_step(accelerator.unwrap_model(model), step)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_loss += step_loss * n_tokens
        window_tokens += n_tokens
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", epoch=f"{epoch + batch_pos / n_batches:.2f}", refresh=False)

        row: dict[str, Any] = {}
        if step % cfg.logging_steps == 0 or step == total_steps:
            elapsed = time.time() - window_start
            row.update(
                loss=round(window_loss / max(window_tokens, 1), 6),
                lr=scheduler.get_last_lr()[0],
                grad_norm=round(float(grad_norm), 6) if grad_norm is not None else None,
                tokens_per_s=round(window_seen / max(elapsed, 1e-9), 1),
            )
            tokens_seen += window_seen
            window_loss, window_tokens, window_seen, window_start = 0.0, 0, 0, time.time()
        epoch_done = epoch > last_eval_epoch or batch_pos >= n_batches
        if val_set and (
            (cfg.eval_steps > 0 and step % cfg.eval_steps == 0)
            or (cfg.eval_steps == 0 and epoch_done)
            or step == total_steps
        ):
            # compiled blocks: evaluate eagerly (its no-grad graphs and padded shapes would be
            # compiled too, and would turn the training graph's shapes dynamic: a recompile)
            eval_start = time.time()
            with torch.compiler.set_stance("force_eager") if cfg.compile else nullcontext():
                loss = mean_token_loss(model, val_set, cfg.batch_size, pad_id, accelerator.device, accelerator.autocast)
            row["eval_loss"] = round(loss, 6)
            model.train()
            window_start += time.time() - eval_start  # tokens/s counts training time only
            last_eval_epoch = epoch + (batch_pos >= n_batches)
        if row and log_file is not None:
            row = {
                "step": step,
                "epoch": round(epoch + batch_pos / n_batches, 4),
                **row,
                "tokens": tokens_seen,
                "elapsed_s": round(time.time() - started, 2),
            }
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()
        if cfg.save_steps > 0 and step % cfg.save_steps == 0 and step < total_steps:
            position = {"step": step, "epoch": epoch, "batch": batch_pos, "tokens": tokens_seen + window_seen}
            save_checkpoint(accelerator, out, position, cfg.save_total_limit)
    bar.close()
    if log_file is not None:
        log_file.close()

    # -- save the run directory ---------------------------------------------------------------
    accelerator.wait_for_everyone()
    # FSDP and ZeRO-3 keep a shard of the weights on each process: gather them (every process
    # takes part); with DDP, ZeRO-2 or one process the model holds them whole
    from accelerate.utils import DistributedType

    ds_plugin = accelerator.state.deepspeed_plugin
    sharded = accelerator.distributed_type == DistributedType.FSDP or (
        ds_plugin is not None and ds_plugin.zero_stage == 3
    )
    full_state = {"state_dict": accelerator.get_state_dict(model)} if sharded else {}
    if is_main:
        unwrapped = accelerator.unwrap_model(model)
        weights_dir = out / method.save_dir
        method.save(unwrapped, weights_dir, cfg, **full_state)
        tokenizer.save_pretrained(str(out))
        if method.save_dir == "model":
            tokenizer.save_pretrained(str(weights_dir))  # model/ alone loads in vLLM / transformers
            gen = unwrapped.generation_config
            gen.eos_token_id = stop_token_ids(template, tokenizer)
            gen.pad_token_id = pad_id
            gen.save_pretrained(str(weights_dir))
        log = run.log()
        plot_loss(log, out / rundir.LOSS_PLOT, title=f"{out.name}: {cfg.method}")
        results = {
            "steps": step,
            "train_examples": n_samples,
            "train_sequences": len(train_set),
            "val_examples": len(val_set),
            "rejected": n_rejected + len(tok.rejects),
            "truncated": tok.n_truncated,
            "trainable_params": n_trainable,
            "total_params": n_total,
            "final_loss": next((r["loss"] for r in reversed(log) if "loss" in r), None),
            "final_eval_loss": next((r["eval_loss"] for r in reversed(log) if "eval_loss" in r), None),
            "train_seconds": round(time.time() - started, 2),
        }
        run.results_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        say(f"done in {results['train_seconds']} s: final loss {results['final_loss']}; run directory {out}")
    accelerator.wait_for_everyone()
    return out


def write_jsonl(path: Path, rows: list[dict[str, Any]], append: bool = False) -> None:
    """Write ``rows`` as JSON Lines (nothing, not even a file, when there are none)."""
    if not rows:
        return
    with path.open("a" if append else "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def save_checkpoint(accelerator: Any, out: Path, position: dict[str, int], keep: int) -> None:
    """Save a resumable state (weights, optimizer, scheduler, RNG) plus ``position`` (step,
    epoch, batch within the epoch, tokens seen) and prune old checkpoints."""
    run = RunDir(out)
    ckpt = run.checkpoint(position["step"])
    accelerator.save_state(str(ckpt))
    if accelerator.is_main_process:
        (ckpt / rundir.STATE).write_text(json.dumps(position) + "\n")
        ckpts = run.checkpoints()
        for old in ckpts[: max(0, len(ckpts) - keep)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()

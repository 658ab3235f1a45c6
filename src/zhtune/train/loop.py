"""The training loop: optimizer steps over accumulated micro-batches, logging, validation and
checkpoints, from a :class:`~zhtune.train.setup.Setup` and a :class:`Position` (where a resumed
run stood).

Loss normalisation: the loss of an optimizer step is the sum of token losses over all of its
micro-batches (and processes) divided by the number of labelled tokens in the whole step. So
``batch_size=1, grad_accum=8`` gives the same update as ``batch_size=8, grad_accum=1``.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from zhtune import rundir
from zhtune.allocator import hand_back_memory, keep_freed_memory
from zhtune.data.batching import micro_batches
from zhtune.data.dataset import model_inputs
from zhtune.models.token_loss import mean_token_loss
from zhtune.progress import progress_bar
from zhtune.rundir import RunDir, write_text_atomic
from zhtune.train.setup import Setup, one_batch_shape, packs_batches
from zhtune.train.tracking import scalars


@dataclass
class Position:
    """Where the loop stands: what a checkpoint records and a resumed run starts from."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    """Global micro-batches of the epoch already consumed."""
    tokens: int = 0
    """Non-pad input tokens seen so far, all processes."""


def resume(s: Setup) -> Position:
    """The newest checkpoint's position (its state loaded into the accelerator), trimming log
    rows written after it so the curve continues from it; a fresh Position without one.

    A checkpoint that cannot be loaded (a truncated or corrupt file) is reported and the one
    before it is tried."""
    run = RunDir(s.out)
    candidates = [c for c in reversed(run.checkpoints()) if (c / rundir.STATE).is_file()] if s.cfg.resume else []
    for ckpt in candidates:
        problem = rundir.checkpoint_problem(ckpt)
        if problem:
            s.accelerator.print(
                f"warning: checkpoint {ckpt} cannot be loaded ({problem}); trying an older one"
            )
            continue
        try:
            position = Position(**json.loads((ckpt / rundir.STATE).read_text()))
            s.accelerator.load_state(str(ckpt))
            break
        except Exception as err:  # any unreadable part: fall back to the previous checkpoint
            reason = " ".join(str(err).split())[:300] or type(err).__name__
            s.accelerator.print(f"warning: checkpoint {ckpt} cannot be loaded ({reason}); trying an older one")
    else:
        if s.cfg.resume:
            what = "no usable checkpoint" if candidates else "no checkpoint"
            s.accelerator.print(f"resume=true but {what} in {run.checkpoints_dir}; starting from scratch")
        return Position()
    if s.is_main:
        rows = [r for r in run.log() if r["step"] <= position.step]
        run.log_path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return position


def adapter_checkpoint_hooks(s: Setup) -> None:
    """For a peft method (:attr:`~zhtune.train.methods.Method.adapter_checkpoints`), under one
    process or DDP: a checkpoint holds the adapter in peft's layout plus the tokenizer (plain
    ``PeftModel.from_pretrained(base, CHECKPOINT)`` loads it; chat, eval and export take it), and
    accelerate saves only the optimizer, scheduler and RNG state beside it. Sharded engines (FSDP,
    DeepSpeed) keep accelerate's own save of everything."""
    acc = s.accelerator
    if not s.method.adapter_checkpoints or acc.distributed_type.value in ("FSDP", "DEEPSPEED"):
        return

    def save(models: list[Any], weights: list[Any], output_dir: str) -> None:
        if acc.is_main_process:
            acc.unwrap_model(models[0]).save_pretrained(output_dir, safe_serialization=True)
            s.tokenizer.save_pretrained(output_dir)
            shutil.copy(RunDir(s.out).config_path, Path(output_dir) / rundir.CONFIG)  # for export
        weights.clear()  # no copy of the frozen base

    def load(models: list[Any], input_dir: str) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = Path(input_dir) / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} is missing")
        result = set_peft_model_state_dict(acc.unwrap_model(models[0]), load_file(str(weights)))
        if result.unexpected_keys:
            raise ValueError(f"{weights} holds weights this model has not: {result.unexpected_keys[:3]}")
        models.clear()

    acc.register_save_state_pre_hook(save)
    acc.register_load_state_pre_hook(load)


ADAPTER_WEIGHTS = "adapter_model.safetensors"
"""peft's adapter weights file."""


def save_checkpoint(accelerator: Any, out: Path, position: Position, keep: int) -> None:
    """Save a resumable state (weights, optimizer, scheduler, RNG) plus ``position`` and prune
    old checkpoints down to ``keep``."""
    run = RunDir(out)
    ckpt = run.checkpoint(position.step)
    # written under a temporary name, then renamed: a crash mid-write leaves no step-N to resume
    tmp = ckpt.with_name(f"tmp-{ckpt.name}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_text_atomic(tmp / rundir.STATE, json.dumps(asdict(position)) + "\n")
        shutil.rmtree(ckpt, ignore_errors=True)
        tmp.rename(ckpt)
        ckpts = run.checkpoints()
        for old in ckpts[: max(0, len(ckpts) - keep)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _clipped(s: Setup) -> Any:
    """The parameters whose gradients are clipped: on one process or under DDP the optimizer's (the
    same gradients as the whole model's, whose frozen ones have none, without walking its module
    tree: ~2.5 ms a step on SmolLM2's 692 tensors); under FSDP, DeepSpeed or XLA the model's own,
    as Accelerate expects them there (it runs FSDP's sharded clipping only when handed exactly
    those)."""
    from accelerate.utils import DistributedType

    if s.accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        return [p for group in s.optimizer.param_groups for p in group["params"]]
    return s.model.parameters()


def optimizer_step(s: Setup, group: list[dict[str, Any]], step: int) -> tuple[float, int, int, Any]:
    """Optimizer step ``step + 1`` over the micro-batches of ``group``; ``(step loss, labelled tokens
    of the step, input tokens seen, grad norm or None)``, all processes together."""
    import torch

    from zhtune.train.loss import fused_causal_lm_loss

    acc, model, cfg = s.accelerator, s.model, s.cfg
    n_tokens = torch.tensor(sum(int((b["labels"][:, 1:] != -100).sum()) for b in group), device=acc.device)
    n_tokens = int(acc.reduce(n_tokens, "sum"))
    local = torch.zeros(2, dtype=torch.float64)  # this process's share of the loss, tokens seen
    for batch in group:
        batch = {k: v.to(acc.device) for k, v in batch.items()}
        # accumulate(): gradients are synchronised (and DeepSpeed steps) on the last micro-batch only
        with acc.accumulate(model), acc.autocast():
            # sum(token losses of this micro-batch) / tokens of the whole step, all processes
            if s.fused is not None:
                loss = fused_causal_lm_loss(model, s.fused, model_inputs(batch), n_tokens)
            else:
                loss = model(**model_inputs(batch), num_items_in_batch=n_tokens, use_cache=False).loss
            # the processes' gradients are averaged and Accelerate divides by grad_accum: scale
            # back so the step's gradient is that of the loss above, summed
            acc.backward(loss * acc.num_processes * cfg.grad_accum)
        local[0] += loss.item()
        local[1] += int(batch["attention_mask"].sum())
    step_loss, seen = acc.reduce(local.to(acc.device), "sum").tolist()
    grad_norm = acc.clip_grad_norm_(_clipped(s), cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
    s.optimizer.step()
    if s.method.after_step is not None:
        s.method.after_step(acc.unwrap_model(model), step)
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    return step_loss, n_tokens, int(seen), grad_norm


def validation_loss(s: Setup) -> float:
    """Mean token loss on the validation set; compiled code runs eagerly for it (its no-grad
    graphs and padded shapes would be compiled too, and turn the training graph's shapes dynamic)."""
    import torch


    acc = s.accelerator
    with torch.compiler.set_stance("force_eager") if s.compiled != "off" else nullcontext():
        loss = mean_token_loss(s.model, s.data.val_set, s.cfg.batch_size, s.tokenizer.pad_token_id, acc.device, acc.autocast)
    s.model.train()
    return loss


def batch_stream(s: Setup, epoch: int, batch: int) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """This process's micro-batches from ``(epoch, batch)`` on, as the loop trains them: rows
    padded to ``cutoff_len`` where compiled code wants one shape, unpacked samples packed into
    rows where the family allows (``(epoch, batch index, batch)`` each)."""
    cfg, acc = s.cfg, s.accelerator
    return micro_batches(
        s.data.train_set, cfg.batch_size, cfg.seed, s.tokenizer.pad_token_id, epoch, batch,
        cfg.group_by_length, rank=acc.process_index, num_processes=acc.num_processes,
        fixed_length=cfg.cutoff_len if one_batch_shape(cfg, s.compiled) else 0,
        pack_rows=packs_batches(cfg, s.model_type, s.method),
    )  # fmt: skip


def fit(s: Setup, position: Position, progress: bool, started: float) -> Position:
    """Train from ``position`` to ``s.total_steps``; logs to ``trainer_log.jsonl`` (main process),
    validates every ``eval_steps`` (or epoch) and checkpoints every ``save_steps``."""

    cfg, acc, pos = s.cfg, s.accelerator, position
    if acc.device.type == "cpu":
        # set-up freed what loading made (a bf16 checkpoint read as fp32, then its frozen weights
        # cast back): return that to the kernel first (0.4 GiB for SmolLM2), then keep what every
        # step frees and allocates again
        hand_back_memory()
        keep_freed_memory()
    stream = batch_stream(s, pos.epoch, pos.batch)
    bar = progress_bar("train", progress and s.is_main, total=s.total_steps, initial=pos.step, dynamic_ncols=True)
    window = Window()
    last_eval_epoch = pos.epoch
    log_file = RunDir(s.out).log_path.open("a", encoding="utf-8") if s.is_main else None
    while pos.step < s.total_steps:
        group = [next(stream) for _ in range(cfg.grad_accum)]
        pos.epoch, pos.batch = group[-1][0], group[-1][1] + 1
        step_loss, n_tokens, seen, grad_norm = optimizer_step(s, [b for _, _, b in group], pos.step)
        pos.step += 1
        window.add(step_loss, n_tokens, seen)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", epoch=f"{pos.epoch + pos.batch / s.n_batches:.2f}", refresh=False)

        row: dict[str, Any] = {}
        if pos.step % cfg.logging_steps == 0 or pos.step == s.total_steps:
            row.update(window.row(s.scheduler.get_last_lr()[0], grad_norm))
            pos.tokens += window.seen
            window = Window()
        epoch_done = pos.epoch > last_eval_epoch or pos.batch >= s.n_batches
        if s.data.val_set and (
            (cfg.eval_steps > 0 and pos.step % cfg.eval_steps == 0)
            or (cfg.eval_steps == 0 and epoch_done)
            or pos.step == s.total_steps
        ):
            eval_start = time.time()
            row["eval_loss"] = round(validation_loss(s), 6)
            window.start += time.time() - eval_start  # tokens/s counts training time only
            last_eval_epoch = pos.epoch + (pos.batch >= s.n_batches)
        if row and log_file is not None:
            epoch = round(pos.epoch + pos.batch / s.n_batches, 4)
            row = {"step": pos.step, "epoch": epoch, **row, "tokens": pos.tokens, "elapsed_s": round(time.time() - started, 2)}
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()
        if row and cfg.report_to:
            acc.log(scalars(row), step=pos.step)
        if cfg.save_steps > 0 and pos.step % cfg.save_steps == 0 and pos.step < s.total_steps:
            at = Position(pos.step, pos.epoch, pos.batch, pos.tokens + window.seen)
            save_checkpoint(acc, s.out, at, cfg.save_total_limit)
    bar.close()
    if log_file is not None:
        log_file.close()
    return pos


@dataclass
class Window:
    """Losses and tokens since the last logged row."""

    loss: float = 0.0
    """Sum over steps of step loss x labelled tokens."""
    tokens: int = 0
    seen: int = 0
    """Input tokens seen (for tokens/s)."""
    start: float = 0.0

    def __post_init__(self) -> None:
        self.start = self.start or time.time()

    def add(self, step_loss: float, n_tokens: int, seen: int) -> None:
        self.loss += step_loss * n_tokens
        self.tokens += n_tokens
        self.seen += seen

    def row(self, lr: float, grad_norm: Any) -> dict[str, Any]:
        """The logged fields of this window."""
        elapsed = time.time() - self.start
        return {
            "loss": round(self.loss / max(self.tokens, 1), 6),
            "lr": lr,
            "grad_norm": round(float(grad_norm), 6) if grad_norm is not None else None,
            "tokens_per_s": round(self.seen / max(elapsed, 1e-9), 1),
        }

"""Training, top to bottom: :func:`train` sets up (:mod:`zhtune.train.setup`: accelerator, run
directory, tokenizer and template, data, model and method, optimizer), resumes, runs the loop
(:mod:`zhtune.train.loop`) and saves the run directory.

Two stages share the loop: ``sft`` (conversations rendered by a chat template, loss on the
assistant turns; optionally packed) and ``pt`` (continued pre-training: texts concatenated and cut
into blocks). The method registry (:mod:`zhtune.train.methods`) decides what is trained.

The loop is explicit (no ``Trainer`` subclass) and runs on 🤗 Accelerate, so the same code runs
on one CPU, one GPU, or many processes under ``accelerate launch`` / ``torchrun``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from zhtune import rundir
from zhtune.config import save_config, to_dict
from zhtune.data.templates import stop_token_ids
from zhtune.plots import plot_loss
from zhtune.rundir import RunDir
from zhtune.train.config import TrainConfig
from zhtune.train.loop import Position, adapter_checkpoint_hooks, fit, resume
from zhtune.train.setup import Setup, banner, setup
from zhtune.train.tracking import hyperparameters


def train(cfg: TrainConfig, progress: bool = True) -> Path:
    """Train as configured (stage sft or pt, any registered method); return the run directory."""
    started = time.time()
    s = setup(cfg)
    adapter_checkpoint_hooks(s)
    position = resume(s)
    if s.is_main:
        save_config(s.cfg, RunDir(s.out).config_path)
    s.accelerator.print(banner(s))
    if cfg.report_to:
        s.accelerator.init_trackers(s.out.name, config=hyperparameters(to_dict(s.cfg)))
    position = fit(s, position, progress, started)
    save_run(s, position, started)
    s.accelerator.end_training()
    return s.out


def save_run(s: Setup, position: Position, started: float) -> None:
    """Weights (gathered first when sharded), tokenizer, generation config, loss plot and
    ``train_results.json``; written by the main process, every process taking part."""
    from accelerate.utils import DistributedType


    acc, cfg, out, data = s.accelerator, s.cfg, s.out, s.data
    acc.wait_for_everyone()
    # FSDP and ZeRO-3 keep a shard of the weights on each process: gather them (every process
    # takes part); with DDP, ZeRO-2 or one process the model holds them whole
    ds_plugin = acc.state.deepspeed_plugin
    sharded = acc.distributed_type == DistributedType.FSDP or (ds_plugin is not None and ds_plugin.zero_stage == 3)
    full_state = {"state_dict": acc.get_state_dict(s.model)} if sharded else {}
    if s.is_main:
        run = RunDir(out)
        unwrapped = acc.unwrap_model(s.model)
        if full_state:
            share_tied(full_state["state_dict"], unwrapped)
        weights_dir = out / s.method.save_dir
        s.method.save(unwrapped, weights_dir, cfg, **full_state)
        s.tokenizer.save_pretrained(str(out))
        if s.method.save_dir == "model":
            s.tokenizer.save_pretrained(str(weights_dir))  # model/ alone loads in vLLM / transformers
            gen = unwrapped.generation_config
            gen.eos_token_id = stop_token_ids(s.template, s.tokenizer)
            gen.pad_token_id = s.tokenizer.pad_token_id
            gen.save_pretrained(str(weights_dir))
        log = run.log()
        plot_loss(log, out / rundir.LOSS_PLOT, title=f"{out.name}: {cfg.method}")
        results = {
            "steps": position.step,
            "train_examples": data.n_samples,
            "train_sequences": len(data.train_set),
            "val_examples": len(data.val_set),
            "rejected": data.n_rejected,
            "truncated": data.tokenized.n_truncated,
            "trainable_params": s.n_trainable,
            "total_params": s.n_total,
            "final_loss": next((r["loss"] for r in reversed(log) if "loss" in r), None),
            "final_eval_loss": next((r["eval_loss"] for r in reversed(log) if "eval_loss" in r), None),
            "train_seconds": round(time.time() - started, 2),
        }
        run.results_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        acc.print(f"done in {results['train_seconds']} s: final loss {results['final_loss']}; run directory {out}")
    acc.wait_for_everyone()


def share_tied(state: dict[str, Any], model: Any) -> None:
    """Point the names of one parameter (tied input and output embeddings) at one tensor in
    ``state``, as in the model: a gathered state (FSDP2) holds a copy per name, which
    ``save_pretrained`` cannot tell from two weights and writes twice (``lm_head.weight`` beside
    ``embed_tokens.weight``)."""
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in state:
            state[name] = state[first.setdefault(id(param), name)]

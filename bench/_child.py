"""Run one training job in this process and print what it measured as the last line (JSON):
peak RSS of this process (and of its waited-for children), and what the tool reported.

``python bench/_child.py zhtune ARGS...`` runs ``zhtune ARGS...``;
``python bench/_child.py trl MODEL DATA STEPS BATCH MAX_LEN PACKING OUT [OPTIONS_JSON]`` runs TRL's
SFTTrainer (STEPS 0: one epoch; OPTIONS_JSON: see :func:`run_trl`);
``python bench/_child.py llamafactory ARGS...`` runs ``llamafactory-cli ARGS...`` (in the Python of
LLaMA-Factory's own environment; this file imports nothing but the standard library at the top).
``python bench/_child.py cmd PROGRAM ARGS...`` runs another program (another venv's, e.g. lm-eval's
``lm_eval``) as a child; its peak RSS is that of the waited-for children (grandchildren included).
"""

from __future__ import annotations

import json
import resource
import sys
import time


def run_zhtune(argv: list[str]) -> dict:
    from zhtune.allocator import use_huge_pages
    from zhtune.cli import TRAINING_COMMANDS, main

    if argv[:1] and argv[0] in TRAINING_COMMANDS:
        use_huge_pages()  # as the `zhtune` command does for them before anything else (runs this file again)

    code = main(argv)
    if code:
        raise SystemExit(code)
    return {}


def huge_pages_mb() -> float:
    """This process's anonymous memory in transparent huge pages now (``AnonHugePages``; 0 where
    it cannot be read): whether the job ran on them (its heap keeps what it grew to)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            return next((int(line.split()[1]) / 1024 for line in f if line.startswith("AnonHugePages")), 0.0)
    except OSError:
        return 0.0


def run_cmd(argv: list[str]) -> dict:
    import subprocess

    code = subprocess.run(argv).returncode
    if code:
        raise SystemExit(code)
    return {}


def run_trl(
    model_dir: str, data: str, steps: int, batch: int, max_len: int, packing: bool, out: str, options: dict
) -> dict:
    """TRL's SFTTrainer on ``data`` (``{"messages": ...}`` records). ``options``: ``bf16`` (false:
    fp32, said explicitly since TRL's own default is bf16), ``full`` (full fine-tuning instead of LoRA
    r8/alpha 16/all linear), ``lr`` (2e-4), ``logging_steps`` (STEPS, or 1 for an epoch),
    ``scheduler`` (HF's default, linear). The frozen base of a bf16 LoRA run is loaded in bf16 (as
    LLaMA-Factory and zhtune keep it); gradient checkpointing is off (TRL's default is on)."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    bf16, full = options.get("bf16", False), options.get("full", False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dtype = torch.bfloat16 if bf16 and not full else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    dataset = load_dataset("json", data_files=data, split="train").select_columns(["messages"])
    args = SFTConfig(
        output_dir=out,
        max_steps=steps if steps > 0 else -1,
        num_train_epochs=1,
        per_device_train_batch_size=batch,
        max_length=max_len,
        packing=packing,
        learning_rate=options.get("lr", 2e-4),
        lr_scheduler_type=options.get("scheduler", "linear"),
        logging_steps=options.get("logging_steps", steps if steps > 0 else 1),
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=bf16,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        seed=42,
    )
    peft = None if full else LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )  # fmt: skip
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft
    )
    result = trainer.train()
    history = trainer.state.log_history
    tokens = next((r["num_tokens"] for r in reversed(history) if "num_tokens" in r), None)
    trained = {str(p.dtype).removeprefix("torch.") for p in trainer.model.parameters() if p.requires_grad}
    return {
        "train_seconds": result.metrics["train_runtime"],
        "tokens": tokens,
        "steps": trainer.state.global_step,
        "losses": [r["loss"] for r in history if "loss" in r],
        "trainable_dtype": ",".join(sorted(trained)),
    }


def run_llamafactory(argv: list[str]) -> dict:
    """``llamafactory-cli ARGS`` in this process (on a CPU it trains in-process, no torchrun).

    PyPI's torchvision and torchaudio wheels are CUDA builds that do not load beside a CPU-only
    torch. A torchvision that does not import is hidden (transformers then does without it, as
    when it is not installed); LLaMA-Factory imports torchaudio at start (for audio datasets), so
    one that does not load is replaced by an empty module (text training never touches it). The
    result's ``hidden`` names what was."""
    import importlib
    import importlib.machinery
    import types

    hidden = []
    for name in ("torchvision", "torchaudio"):
        try:
            importlib.import_module(name)
        except (OSError, RuntimeError):
            for loaded in [n for n in sys.modules if n == name or n.startswith(name + ".")]:
                del sys.modules[loaded]
            stub = None
            if name == "torchaudio":
                stub = types.ModuleType(name)
                stub.__spec__ = importlib.machinery.ModuleSpec(name, None)
            sys.modules[name] = stub
            hidden.append(name)
        except ImportError:
            pass
    from llamafactory.cli import main

    sys.argv = ["llamafactory-cli", *argv]
    main()
    return {"hidden": hidden}


if __name__ == "__main__":
    kind, rest = sys.argv[1], sys.argv[2:]
    t0 = time.perf_counter()
    if kind == "zhtune":
        info = run_zhtune(rest)
    elif kind == "cmd":
        info = run_cmd(rest)
    elif kind == "llamafactory":
        info = run_llamafactory(rest)
    else:
        model_dir, data, steps, batch, max_len, packing, out, *options = rest
        opts = json.loads(options[0]) if options else {}
        info = run_trl(model_dir, data, int(steps), int(batch), int(max_len), packing == "1", out, opts)
    info["child_seconds"] = time.perf_counter() - t0
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    info["peak_rss_mb"] = max(own, children) / 1024
    info["peak_children_rss_mb"] = children / 1024
    info["huge_pages_mb"] = huge_pages_mb()
    print(json.dumps(info))

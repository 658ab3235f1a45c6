"""Run one job in this process and print its peak RSS as the last line (JSON).

``python bench/_child.py zhtune ARGS...`` runs ``zhtune ARGS...``;
``python bench/_child.py trl MODEL DATA STEPS BATCH MAX_LEN PACKING OUT`` runs TRL's SFTTrainer;
``python bench/_child.py cmd PROGRAM ARGS...`` runs another program (another venv's, e.g. lm-eval's
``lm_eval``) as a child and reports the peak RSS of the largest process under it (``ru_maxrss`` of
the waited-for children, grandchildren included).
"""

from __future__ import annotations

import json
import resource
import sys
import time


def run_zhtune(argv: list[str]) -> dict:
    from zhtune.cli import main

    code = main(argv)
    if code:
        raise SystemExit(code)
    return {}


def run_cmd(argv: list[str]) -> dict:
    import subprocess

    code = subprocess.run(argv).returncode
    if code:
        raise SystemExit(code)
    return {}


def run_trl(model_dir: str, data: str, steps: int, batch: int, max_len: int, packing: bool, out: str) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    dataset = load_dataset("json", data_files=data, split="train").select_columns(["messages"])
    args = SFTConfig(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=batch,
        max_length=max_len,
        packing=packing,
        learning_rate=2e-4,
        logging_steps=steps,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        seed=42,
    )
    peft = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft
    )
    result = trainer.train()
    tokens = next((r["num_tokens"] for r in reversed(trainer.state.log_history) if "num_tokens" in r), None)
    return {"train_seconds": result.metrics["train_runtime"], "tokens": tokens}


if __name__ == "__main__":
    kind, rest = sys.argv[1], sys.argv[2:]
    t0 = time.perf_counter()
    if kind == "zhtune":
        info = run_zhtune(rest)
    elif kind == "cmd":
        info = run_cmd(rest)
    else:
        model_dir, data, steps, batch, max_len, packing, out = rest
        info = run_trl(model_dir, data, int(steps), int(batch), int(max_len), packing == "1", out)
    info["child_seconds"] = time.perf_counter() - t0
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    info["peak_rss_mb"] = max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    print(json.dumps(info))

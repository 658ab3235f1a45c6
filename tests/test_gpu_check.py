"""bench/gpu_check.py, the script written for the lent GPU machine, run here with ``--device cpu``:
every step (train LoRA and full, chat, predict, serve, eval exam, export, LoRA with compile: true,
full fine-tuning under the shipped FSDP configs) runs and is reported. On a CPU fsdp.yaml (FSDP1)
is skipped and fsdp2.yaml runs 2 processes (gloo); compiling needs a C++ compiler."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # 109 s of a 657 s default run with an empty Inductor cache (it compiles)
def test_gpu_check_runs_every_step_on_the_cpu(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--steps", "4",
         "--hidden", "64", "--layers", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    table = done.stdout.split("GPU check on cpu")[-1]
    for step in ("build model", "train lora", "train full", "load run", "chat", "predict", "serve",
                 "eval exam", "export", "train lora compile", "train fsdp", "train fsdp2"):  # fmt: skip
        assert f"| {step} |" in table
    assert "FAILED" not in table
    assert "| predict |" in table and "64 rows" in table
    assert "on cpu, torch.float32, template tokenizer" in table and "device cpu" in table
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    compiled = rows["train lora compile"]
    if shutil.which("g++") or shutil.which("c++") or shutil.which("clang++"):
        assert "2 blocks compiled; loss " in compiled and " ms vs eager " in compiled
    assert "skipped: FSDP1 runs on GPUs only" in rows["train fsdp"]
    fsdp2 = rows["train fsdp2"]
    assert "FSDP2 x 2 proc; loss " in fsdp2 and "(train full " in fsdp2
    assert "model/ loads (LlamaForCausalLM, missing none, unexpected none), tensors as train full's" in fsdp2

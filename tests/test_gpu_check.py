"""bench/gpu_check.py, the script written for the lent GPU machine, run here with ``--device cpu``:
every step (train LoRA and full, chat, predict, serve, eval exam, export) runs and is reported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_runs_every_step_on_the_cpu(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--steps", "4",
         "--hidden", "64", "--layers", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    table = done.stdout.split("GPU check on cpu")[-1]
    for step in ("build model", "train lora", "train full", "load run", "chat", "predict", "serve",
                 "eval exam", "export"):  # fmt: skip
        assert f"| {step} |" in table
    assert "FAILED" not in table
    assert "| predict |" in table and "64 rows" in table
    assert "on cpu, torch.float32, template tokenizer" in table and "device cpu" in table

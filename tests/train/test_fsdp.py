"""Sharded training (FSDP2) without a GPU: 2 CPU processes (gloo), launched as users launch them,
``accelerate launch --config_file <shipped fsdp2.yaml> --num_processes 2 -m zhtune train
key=value ...``, with any GPU hidden. Accelerate sets FSDP up on GPUs only; zhtune switches a CPU
process group to it (``zhtune.train.setup.switch_to_fsdp2``), so this runs torch's ``fully_shard``
through Accelerate's FSDP2 preparation, gathering and sharded checkpoints, driven by zhtune's loop
and save.

Checks, for full fine-tuning and LoRA: the run is sharded (the banner says FSDP2, the step-4
checkpoint holds one shard file per process); 2 processes x batch 4 equal 1 process x batch 8
(per-step loss and grad norm within 1e-5 relative; lr, epoch, tokens equal; final weights within
1e-4 relative / 1e-5 absolute, as tests/train/test_ddp.py); the gathered model/ (adapter/) holds
exactly the single run's tensors (tied embeddings written once) and loads to the same outputs.
Resuming from the sharded checkpoint continues the same run (marked slow).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.train.test_ddp import LAUNCHER_ENV, log_rows
from tests.train.test_ddp import pytestmark as pytestmark  # needs torch.distributed with gloo

STEPS = 5
FSDP2 = Path(__file__).parents[2] / "src" / "zhtune" / "configs" / "accelerate" / "fsdp2.yaml"
WEIGHTS = {"full": "model/model.safetensors", "lora": "adapter/adapter_model.safetensors"}


def launch(out: Path, nproc: int, method: str, model: Path, data: Path, *extra: str) -> str:
    """``zhtune train`` in ``nproc`` processes under the shipped FSDP2 config (plain ``python -m
    zhtune`` for 1), the global batch 8 either way; the combined output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith((*LAUNCHER_ENV, "FSDP_"))}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    launcher = [sys.executable, "-m", "zhtune"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP2),
                    "--num_processes", str(nproc), "-m", "zhtune"]  # fmt: skip
    cmd = [
        *launcher, "train", f"model={model}", f"data={data}", f"output_dir={out}", "template=chatml",
        f"method={method}", f"max_steps={STEPS}", f"batch_size={8 // nproc}", "grad_accum=1", "lr=3e-3",
        "warmup_ratio=0.2", "lr_scheduler=cosine", "logging_steps=1", "cutoff_len=64", "save_steps=4",
        "--no-progress", *extra,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return output


@pytest.fixture(scope="module", params=["full", "lora"])
def runs(request, tmp_path_factory, tiny_model_dir, train_file):
    """``(method, 2-process FSDP2 run, 1-process run, the FSDP2 run's output)``."""
    method = request.param
    tmp = tmp_path_factory.mktemp(f"fsdp-{method}")
    output = launch(tmp / "sharded", 2, method, tiny_model_dir, train_file)
    launch(tmp / "single", 1, method, tiny_model_dir, train_file)
    return method, tmp / "sharded", tmp / "single", output


def test_two_sharded_processes_train_like_one(runs, tiny_model_dir):
    method, sharded, single, output = runs
    # one banner (rank 0's), saying the run is sharded; every process wrote its own shard
    banner = [line for line in output.splitlines() if "(batch 4 x accum 1 x 2 proc)" in line]
    assert output.count("zhtune train: sft") == 1 and len(banner) == 1, output[-3000:]
    assert banner[0].endswith(", FSDP2"), banner
    shards = sharded / "checkpoints" / "step-4" / "pytorch_model_fsdp_0"
    assert sorted(p.name for p in shards.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]

    two, one = log_rows(sharded), log_rows(single)
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-5), key
    for key in ("lr", "epoch", "tokens"):
        assert [r[key] for r in two] == [r[key] for r in one], key

    # the gathered weights: the same tensors (names, shapes) as one process wrote, the same values
    w2, w1 = load_file(sharded / WEIGHTS[method]), load_file(single / WEIGHTS[method])
    assert w2.keys() == w1.keys()
    for k in w2:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)
    if method == "full":
        base = load_file(tiny_model_dir / "model.safetensors")
        assert w2.keys() == base.keys()  # lm_head.weight, tied to the embeddings, is not written
        assert all(not torch.equal(w2[k], base[k]) for k in w2)


def test_sharded_run_loads_to_the_single_runs_outputs(runs):
    from zhtune.models.loading import load_for_inference

    method, sharded, single, _ = runs
    ids = torch.tensor([[1, 5, 9, 40, 7, 3]])
    logits = []
    for run in (sharded, single):
        model, _, template = load_for_inference(run, device="cpu")
        assert template == "chatml"
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_resume_from_the_sharded_checkpoint_continues_the_run(runs, tmp_path, tiny_model_dir, train_file):
    """The run stopped after its step-4 checkpoint (one shard per process) and resumed under 2
    processes: step 5 and the final weights are the uninterrupted run's."""
    method, sharded, _, _ = runs
    resumed = tmp_path / "resumed"
    shutil.copytree(sharded, resumed)
    shutil.rmtree(resumed / WEIGHTS[method].split("/")[0])
    output = launch(resumed, 2, method, tiny_model_dir, train_file, "resume=true")
    assert "cannot be loaded" not in output and "from scratch" not in output, output[-3000:]

    def curve(run: Path) -> list[list]:
        return [[r[k] for k in ("step", "loss", "grad_norm", "lr", "tokens")] for r in log_rows(run)]

    assert curve(resumed) == curve(sharded)
    w_resumed, w_whole = load_file(resumed / WEIGHTS[method]), load_file(sharded / WEIGHTS[method])
    assert w_resumed.keys() == w_whole.keys()
    for k in w_resumed:
        assert torch.equal(w_resumed[k], w_whole[k]), k


def test_fsdp1_on_cpus_is_refused_with_the_fsdp2_config_named(monkeypatch, tmp_path):
    """Accelerate's FSDP1 needs a GPU; zhtune says so before any process group forms."""
    from zhtune.errors import ZhtuneError
    from zhtune.train.config import TrainConfig
    from zhtune.train.setup import make_accelerator

    if torch.cuda.is_available() or (hasattr(torch, "accelerator") and torch.accelerator.is_available()):
        pytest.skip("an accelerator is present: FSDP1 is Accelerate's to set up there")
    for key, value in {"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}.items():
        monkeypatch.setenv(key, value)
    cfg = TrainConfig(model="m", data=["d.jsonl"], output_dir=str(tmp_path), method="full")
    with pytest.raises(ZhtuneError, match="fsdp2.yaml"):
        make_accelerator(cfg)

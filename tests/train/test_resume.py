"""Kill training with SIGKILL after a checkpoint, resume, and continue the same loss curve."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest


def args(model, data, out, *extra):
    return [
        sys.executable, "-m", "zhtune", "train", f"model={model}", f"data={data}", f"output_dir={out}",
        "template=chatml", "method=full", "max_steps=60", "batch_size=8", "lr=3e-3", "logging_steps=1",
        "save_steps=5", "save_total_limit=2", "warmup_ratio=0.1", "--no-progress", *extra,
    ]  # fmt: skip


def curve(out) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_sigkill_then_resume_continues_the_same_curve(tmp_path, tiny_model_dir, train_file):
    ref = tmp_path / "ref"
    subprocess.run(args(tiny_model_dir, train_file, ref), check=True, capture_output=True, timeout=300)

    out = tmp_path / "crashed"
    proc = subprocess.Popen(
        args(tiny_model_dir, train_file, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    while not (out / "checkpoints" / "step-10" / "trainer_state.json").exists():
        assert proc.poll() is None, "training finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "model").exists()
    killed_at = max(curve(out))
    assert killed_at < 60

    subprocess.run(
        args(tiny_model_dir, train_file, out, "resume=true"), check=True, capture_output=True, timeout=300
    )
    expected, got = curve(ref), curve(out)
    assert sorted(got) == list(range(1, 61))
    for step in range(1, 61):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    assert len(list((out / "checkpoints").glob("step-*"))) <= 2


def test_cumulative_token_count_continues_after_resume(tmp_path, tiny_model_dir, train_file):
    """Checkpoint at step 5, resume: the logged token count matches an uninterrupted run."""
    base = args(tiny_model_dir, train_file, tmp_path / "ref")[:-1]
    ref = tmp_path / "ref"
    subprocess.run([*base, "max_steps=10", "--no-progress"], check=True, capture_output=True, timeout=300)
    out = tmp_path / "resumed"
    short = args(tiny_model_dir, train_file, out)[:-1]
    subprocess.run([*short, "max_steps=10", "--no-progress"], check=True, capture_output=True, timeout=300)
    shutil.rmtree(out / "model")  # pretend it died after the step-5 checkpoint
    (out / "trainer_log.jsonl").unlink()
    subprocess.run(
        [*short, "max_steps=10", "resume=true", "--no-progress"], check=True, capture_output=True, timeout=300
    )

    def tokens(run):
        rows = [json.loads(line) for line in (run / "trainer_log.jsonl").read_text().splitlines()]
        return {r["step"]: r["tokens"] for r in rows}

    assert tokens(out)[10] == tokens(ref)[10]


@pytest.mark.parametrize("damage", ["truncate-weights", pytest.param("corrupt-state", marks=pytest.mark.slow)])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, tiny_model_dir, train_file, damage):
    """A newest checkpoint that cannot be loaded is reported and the one before it is used: the
    resumed curve is still the uninterrupted one. Checkpoints appear only once complete."""
    ref = tmp_path / "ref"
    base = args(tiny_model_dir, train_file, ref)[:-1]
    subprocess.run([*base, "max_steps=12", "--no-progress"], check=True, capture_output=True, timeout=300)
    out = tmp_path / "damaged"
    short = args(tiny_model_dir, train_file, out)[:-1]
    subprocess.run([*short, "max_steps=12", "--no-progress"], check=True, capture_output=True, timeout=300)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-10", "step-5"]  # no temporary directory is left behind
    newest = out / "checkpoints" / "step-10"
    if damage == "truncate-weights":
        weights = next(newest.glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        (newest / "trainer_state.json").write_text("{not json")
    shutil.rmtree(out / "model")  # pretend it died after the step-10 checkpoint
    done = subprocess.run(
        [*short, "max_steps=12", "resume=true", "--no-progress"], check=True, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert f"warning: checkpoint {newest} cannot be loaded" in done.stdout + done.stderr
    expected, got = curve(ref), curve(out)
    assert sorted(got) == list(range(1, 13))
    for step in range(1, 13):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step

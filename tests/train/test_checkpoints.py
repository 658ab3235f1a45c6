"""Checkpoints users can use: an adapter run's checkpoint is a peft adapter directory (plus the
optimizer, scheduler and RNG state), loadable by plain peft and by zhtune's loading; resume still
continues the same curve; a corrupt newest checkpoint is detected before loading."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from zhtune.config import build_config
from zhtune.rundir import checkpoint_problem
from zhtune.train.config import TrainConfig
from zhtune.train.sft import train


def cfg(model, data, out, **kw):
    values = dict(
        model=str(model), data=[str(data)], output_dir=str(out), template="chatml", method="lora",
        max_steps=12, batch_size=8, lr=3e-3, logging_steps=1, save_steps=5, save_total_limit=2,
        warmup_ratio=0.1, lora_target=["q_proj", "v_proj"],
    )  # fmt: skip
    return build_config(TrainConfig, {**values, **kw})


def curve(out) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, train_file):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    train(cfg(tiny_model_dir, train_file, out), progress=False)
    return out


def test_an_adapter_checkpoint_holds_the_adapter_not_the_base(lora_run):
    ckpt = lora_run / "checkpoints" / "step-10"
    names = {p.name for p in ckpt.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "config.yaml"} <= names
    assert {
        "optimizer.bin",
        "scheduler.bin",
        "trainer_state.json",
    } <= names and "random_states_0.pkl" in names
    assert "model.safetensors" not in names  # no copy of the frozen base
    from safetensors.torch import load_file

    saved = load_file(str(ckpt / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved)


def test_plain_peft_loads_every_checkpoint(lora_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for ckpt in sorted((lora_run / "checkpoints").iterdir()):
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        model = PeftModel.from_pretrained(base, str(ckpt))
        AutoTokenizer.from_pretrained(str(ckpt))
        from safetensors.torch import load_file

        saved = load_file(str(ckpt / "adapter_model.safetensors"))
        state = model.state_dict()
        key = next(iter(saved))
        loaded = state[key.replace(".weight", ".default.weight")]
        assert torch.equal(loaded, saved[key])


def test_zhtune_loads_a_checkpoint_like_a_run(lora_run):
    from zhtune.models.loading import load_for_inference, resolve_source

    ckpt = lora_run / "checkpoints" / "step-10"
    src = resolve_source(ckpt)
    assert src.adapter == str(ckpt) and src.tokenizer == str(ckpt) and src.template == "chatml"
    model, tokenizer, template = load_for_inference(ckpt, device="cpu")
    assert template == "chatml" and len(tokenizer) > 0
    assert not any("lora_" in n for n, _ in model.named_parameters())  # merged in memory


def test_lora_resume_continues_the_same_curve(lora_run, tmp_path, tiny_model_dir, train_file):
    out = tmp_path / "resumed"
    shutil.copytree(lora_run, out)
    shutil.rmtree(out / "adapter")  # pretend it died after the step-10 checkpoint
    (out / "config.yaml").write_text((out / "config.yaml").read_text().replace(str(lora_run), str(out)))
    train(cfg(tiny_model_dir, train_file, out, resume=True), progress=False)
    expected, got = curve(lora_run), curve(out)
    assert sorted(got) == list(range(1, 13))
    for step in (11, 12):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step


def test_a_truncated_checkpoint_is_named_before_loading(lora_run, tmp_path):
    ckpt = tmp_path / "step-10"
    shutil.copytree(lora_run / "checkpoints" / "step-10", ckpt)
    assert checkpoint_problem(ckpt) == ""
    weights = ckpt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    assert checkpoint_problem(ckpt).startswith(f"{weights} is truncated")
    weights.write_bytes(b"\x00" * 4)
    assert "is truncated (4 bytes)" in checkpoint_problem(ckpt)
    shutil.copy(lora_run / "checkpoints" / "step-10" / weights.name, weights)
    (ckpt / "optimizer.bin").write_bytes(b"")
    assert checkpoint_problem(ckpt) == f"{ckpt / 'optimizer.bin'} is empty"
    (ckpt / "trainer_state.json").unlink()
    assert checkpoint_problem(ckpt) == f"{ckpt / 'trainer_state.json'} is missing"


def test_resume_skips_a_truncated_newest_checkpoint(lora_run, tmp_path, tiny_model_dir, train_file, capsys):
    out = tmp_path / "damaged"
    shutil.copytree(lora_run, out)
    shutil.rmtree(out / "adapter")
    newest = out / "checkpoints" / "step-10" / "adapter_model.safetensors"
    newest.write_bytes(newest.read_bytes()[:200])
    train(cfg(tiny_model_dir, train_file, out, resume=True), progress=False)
    printed = capsys.readouterr().out
    assert f"warning: checkpoint {newest.parent} cannot be loaded ({newest} is truncated" in printed
    expected, got = curve(lora_run), curve(out)
    for step in range(6, 13):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step


@pytest.mark.parametrize(
    "damage, message",
    [
        ("delete:adapter_model.safetensors", "holds no weights file (model.safetensors or "),
        ("delete:random_states_0.pkl", "random_states_0.pkl is missing"),
        ("flip:random_states_0.pkl", "random_states_0.pkl is corrupt"),
        ("cut:optimizer.bin", "optimizer.bin is not a readable torch file"),
    ],
)
def test_each_missing_or_corrupt_file_is_named(lora_run, tmp_path, damage, message):
    ckpt = tmp_path / "step-10"
    shutil.copytree(lora_run / "checkpoints" / "step-10", ckpt)
    how, name = damage.split(":")
    f = ckpt / name
    if how == "delete":
        f.unlink()
    elif how == "cut":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    else:  # one byte changed inside the data: only the checksum can tell
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    assert message in checkpoint_problem(ckpt)


@pytest.mark.parametrize("method", ["dora", "ia3", "prompt"])
def test_other_peft_methods_resume_on_the_same_curve(method, tmp_path, tiny_model_dir, train_file):
    """dora and ia3 from their adapter checkpoints; prompt (a virtual-token method) from
    accelerate's full save, kept for it."""
    ref = tmp_path / "ref"
    kw = dict(method=method, max_steps=7, lora_target=["all"], lr=1e-2)
    train(cfg(tiny_model_dir, train_file, ref, **kw), progress=False)
    adapter_ckpt = (ref / "checkpoints" / "step-5" / "adapter_config.json").is_file()
    assert adapter_ckpt == (method != "prompt")
    out = tmp_path / "resumed"
    shutil.copytree(ref, out)
    shutil.rmtree(out / "adapter")
    train(cfg(tiny_model_dir, train_file, out, resume=True, **kw), progress=False)
    expected, got = curve(ref), curve(out)
    for step in (6, 7):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step

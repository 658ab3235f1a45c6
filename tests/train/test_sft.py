"""The SFT loop on a tiny model: loss falls, the right weights change, the run directory is
complete and loadable by plain transformers/peft, accumulation is invariant."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import write_jsonl
from zhtune.config import build_config
from zhtune.train.config import TrainConfig
from zhtune.train.sft import train


def make_cfg(tiny_model_dir, train_file, out, **kw) -> TrainConfig:
    values = {
        "model": str(tiny_model_dir),
        "data": [str(train_file)],
        "output_dir": str(out),
        "template": "chatml",
        "max_steps": 40,
        "batch_size": 16,
        "lr": 3e-3,
        "logging_steps": 5,
        "cutoff_len": 64,
        **kw,
    }
    return build_config(TrainConfig, values)


def losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "trainer_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def base_state(tiny_model_dir) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_model_dir, train_file):
    out = tmp_path_factory.mktemp("full") / "run"
    cfg = make_cfg(
        tiny_model_dir, train_file, out, method="full", val_size=32, max_steps=120, logging_steps=15
    )
    return train(cfg, progress=False)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, full_run, skill_records):
    """LoRA teaches the fully tuned model (a run directory works as a base model) a new reply
    style: every answer becomes the same digits. (LoRA cannot sharpen a *random* tiny model's
    outputs: its norms and embeddings stay frozen, so a tuned base is the honest test.)"""
    tmp = tmp_path_factory.mktemp("lora")
    records = [
        {**r, "messages": [r["messages"][0], {"role": "assistant", "content": "一二三四五"}]}
        for r in skill_records[0][:128]
    ]
    data = write_jsonl(tmp / "ack.jsonl", records)
    return train(make_cfg(full_run, data, tmp / "run", method="lora", lr=1e-2, max_steps=30), progress=False)


def test_full_finetuning_loss_falls(full_run):
    curve = losses(full_run)
    assert len(curve) == 8
    assert curve[-1] < 0.5 * curve[0]


def test_full_finetuning_changes_every_base_weight(full_run, tiny_model_dir):
    before = base_state(tiny_model_dir)
    after = load_file(full_run / "model" / "model.safetensors")
    changed = [k for k, v in after.items() if not torch.equal(v, before[k])]
    assert set(changed) == set(after)


def test_run_directory_is_self_describing(full_run, tiny_model_dir):
    for name in (
        "config.yaml",
        "trainer_log.jsonl",
        "loss.png",
        "train_results.json",
        "tokenizer.json",
        "model/config.json",
    ):
        assert (full_run / name).exists(), name
    cfg = yaml.safe_load((full_run / "config.yaml").read_text())
    assert cfg["template"] == "chatml" and cfg["method"] == "full"
    assert cfg["model"] == str(tiny_model_dir.resolve())
    rows = [json.loads(line) for line in (full_run / "trainer_log.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"} <= set(train_rows[0])
    assert [r["step"] for r in rows if "eval_loss" in r][:2] == [14, 28]  # end of each 14-step epoch
    assert rows[-1]["step"] == 120 and "eval_loss" in rows[-1]
    results = json.loads((full_run / "train_results.json").read_text())
    assert results["train_examples"] == 256 - 32 and results["val_examples"] == 32
    # plain transformers loads model/ on its own, and the saved tokenizer knows the template
    model = AutoModelForCausalLM.from_pretrained(full_run / "model")
    tok = AutoTokenizer.from_pretrained(full_run)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id


def test_lora_loss_falls_and_only_adapter_weights_change(lora_run, full_run):
    from peft import PeftModel

    curve = losses(lora_run)
    assert curve[-1] < 0.7 * curve[0]
    tiny_model_dir = full_run / "model"  # the base weights of this LoRA run
    saved = load_file(lora_run / "adapter" / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in saved.items())  # B starts at 0
    before = base_state(tiny_model_dir)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora_run / "adapter"
    )
    for name, value in model.get_base_model().state_dict().items():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer", "")
        assert torch.equal(value, before[key]), name
    assert json.loads((lora_run / "adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ] == str(tiny_model_dir.resolve())


def test_grad_accumulation_is_invariant(tmp_path, tiny_model_dir, train_file):
    """batch 1 x accumulation 8 gives the same weights as batch 8 x accumulation 1."""
    common = dict(
        method="full", max_steps=3, lr=1e-3, logging_steps=1, warmup_ratio=0.0, lr_scheduler="constant"
    )
    a = train(
        make_cfg(tiny_model_dir, train_file, tmp_path / "a", batch_size=8, grad_accum=1, **common),
        progress=False,
    )
    b = train(
        make_cfg(tiny_model_dir, train_file, tmp_path / "b", batch_size=1, grad_accum=8, **common),
        progress=False,
    )
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    assert losses(a) == pytest.approx(losses(b), rel=1e-4)


def test_refuses_to_overwrite_a_finished_run(full_run, tiny_model_dir, train_file):
    from zhtune.errors import ZhtuneError

    with pytest.raises(ZhtuneError, match="already holds a finished run"):
        train(make_cfg(tiny_model_dir, train_file, full_run), progress=False)


def test_bf16_autocast_trains_on_cpu(tmp_path, tiny_model_dir, train_file):
    out = train(
        make_cfg(
            tiny_model_dir, train_file, tmp_path / "bf16", method="full", precision="bf16", max_steps=20
        ),
        progress=False,
    )
    curve = losses(out)
    assert curve[-1] < 0.8 * curve[0]
    weights = load_file(out / "model" / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in weights.values())  # master weights stay fp32


def test_fp16_on_cpu_is_refused_with_a_reason(tmp_path, tiny_model_dir, train_file):
    from zhtune.errors import ZhtuneError

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(ZhtuneError, match="fp16 needs a GPU"):
        train(make_cfg(tiny_model_dir, train_file, tmp_path / "fp16", precision="fp16"), progress=False)


def test_the_fused_optimizer_takes_the_same_steps():
    """AdamW's fused kernel (zhtune's default unless sharded) updates as the default one does,
    weight decay on matrices only, to fp32 rounding."""
    import torch

    from zhtune.train.setup import build_optimizer

    def trained(fused: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))
        start = [p.detach().clone() for p in model.parameters()]
        opt = build_optimizer(model, 1e-2, 0.1, fused=fused)
        assert bool(opt.defaults["fused"]) is fused and [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
        for _ in range(5):
            model(torch.randn(8, 16)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        assert all((p - p0).abs().max() > 1e-3 for p, p0 in zip(model.parameters(), start))  # every one moved
        return [p.detach().clone() for p in model.parameters()]

    fused, plain = trained(True), trained(False)
    assert all(torch.allclose(f, p, rtol=0, atol=1e-6) for f, p in zip(fused, plain))

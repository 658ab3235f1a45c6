"""LLaMA-Factory YAML runs unchanged: its keys translated into TrainConfig's (zhtune.train.lf_keys)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from zhtune.config import load_config
from zhtune.errors import ZhtuneError
from zhtune.train.config import TrainConfig

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "llamafactory"

# The keys of LLaMA-Factory's examples/train_lora/qwen3_lora_sft.yaml, with the model and the
# dataset pointed at local files.
LF_LORA_SFT = """\
### model
model_name_or_path: {model}
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: {target}

### dataset
dataset: alpaca_zh_demo,support_chat
dataset_dir: {dataset_dir}
template: qwen3_nothink
cutoff_len: 256
max_samples: 1000
preprocessing_num_workers: 16
dataloader_num_workers: 0

### output
output_dir: {out}
logging_steps: 1
save_steps: 2
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: {report_to}  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### train
per_device_train_batch_size: 2
gradient_accumulation_steps: 1
learning_rate: 2e-4
max_steps: 4
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: false
ddp_timeout: 180000000
resume_from_checkpoint: null
"""


def lf_yaml(tmp_path, model="m", target="all", report_to="none", out="out", **replace: str) -> str:
    text = LF_LORA_SFT.format(model=model, target=target, dataset_dir=FIXTURES, out=out, report_to=report_to)
    for old, new in replace.items():
        text = text.replace(old, new)
    path = tmp_path / "lf.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_lf_example_keys_translate(tmp_path):
    cfg = load_config(TrainConfig, lf_yaml(tmp_path, target="q_proj, v_proj"))
    assert cfg.model == "m" and cfg.method == "lora" and cfg.stage == "sft"
    assert cfg.data == ["alpaca_zh_demo", "support_chat"]  # comma list
    assert cfg.registry == f"{FIXTURES}/dataset_info.json"
    assert cfg.lora_target == ["q_proj", "v_proj"]
    assert cfg.lr == 2e-4 and isinstance(cfg.lr, float)  # YAML leaves 2e-4 a string
    assert (cfg.batch_size, cfg.grad_accum, cfg.max_steps, cfg.max_samples) == (2, 1, 4, 1000)
    assert cfg.template == "auto"  # qwen3_nothink: the tokenizer's own template
    assert cfg.precision == "fp32" and cfg.overwrite is True and cfg.report_to == []
    assert cfg.lora_alpha == 16.0  # LLaMA-Factory's default: 2 x rank
    notes = "\n".join(cfg.translated)
    assert "learning_rate -> lr" in notes and "do_train: True (no-op" in notes
    assert "template: qwen3_nothink -> template: auto" in notes


def test_zhtune_keys_on_the_command_line_win(tmp_path):
    cfg = load_config(TrainConfig, lf_yaml(tmp_path), ["lr=1e-3", "model=other", "method=dora"])
    assert (cfg.lr, cfg.model, cfg.method) == (1e-3, "other", "dora")
    cfg = load_config(TrainConfig, lf_yaml(tmp_path), ["learning_rate=5e-4", "lora_target=q_proj,k_proj"])
    assert cfg.lr == 5e-4 and cfg.lora_target == ["q_proj", "k_proj"]


def test_both_spellings_in_one_file_is_an_error(tmp_path):
    with pytest.raises(ZhtuneError, match="'learning_rate' and 'lr' both set 'lr'"):
        load_config(TrainConfig, lf_yaml(tmp_path, **{"max_steps: 4": "max_steps: 4\nlr: 1e-3"}))


@pytest.mark.parametrize(
    "old, new, message",
    [
        (
            "finetuning_type: lora",
            "finetuning_type: full\ndeepspeed: ds_z3_config.json",
            "accelerate launch --use_deepspeed",
        ),
        ("stage: sft", "stage: dpo", "stage 'dpo'"),
        (
            "lr_scheduler_type: cosine",
            "lr_scheduler_type: polynomial",
            "lr_scheduler_type 'polynomial' is not supported",
        ),
        ("save_only_model: false", "save_only_model: true", "always hold the optimizer state"),
        (
            "resume_from_checkpoint: null",
            "resume_from_checkpoint: saves/checkpoint-100",
            "resumes from the newest",
        ),
        ("bf16: false", "bf16: true\nfp16: true", "choose one precision"),
        ("do_train: true", "do_train: true\neval_dataset: x\nval_size: 0.1", "choose one source of validation"),
    ],
)
def test_keys_zhtune_cannot_honour_are_refused_with_the_reason(tmp_path, old, new, message):
    with pytest.raises(ZhtuneError, match=message.replace("(", r"\(")):
        load_config(TrainConfig, lf_yaml(tmp_path, **{old: new}))


def test_unknown_key_still_gets_a_close_match(tmp_path):
    with pytest.raises(ZhtuneError, match="Did you mean: learning_rate"):
        load_config(TrainConfig, lf_yaml(tmp_path, **{"learning_rate:": "learnig_rate:"}))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("finetuning_type: lora\nuse_dora: true", {"method": "dora"}),
        ("finetuning_type: lora\nquantization_bit: 8", {"method": "qlora", "quantization_bits": 8}),
        ("finetuning_type: freeze\nfreeze_trainable_layers: 1", {"method": "freeze", "freeze_layers": 1}),
        ("finetuning_type: full\nbf16: true", {"method": "full", "precision": "bf16"}),
        ("flash_attn: fa2", {"attn_implementation": "flash_attention_2"}),
        ("neat_packing: true", {"packing": True}),
        ("num_train_epochs: 2.0\nwarmup_steps: 3", {"epochs": 2.0, "warmup_steps": 3}),
        ("disable_gradient_checkpointing: true", {"gradient_checkpointing": False}),
        ("ddp_timeout: 180000000", {"ddp_timeout": 180000000}),
        ("lora_rank: 16", {"lora_rank": 16, "lora_alpha": 32.0, "lr": 5e-5, "lr_scheduler": "linear"}),
    ],
)
def test_value_translations(tmp_path, text, expected):
    if "quantization_bit" in text and importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("qlora needs bitsandbytes")
    path = tmp_path / "c.yaml"
    path.write_text(f"model_name_or_path: m\ndataset: a\noutput_dir: o\n{text}\n", encoding="utf-8")
    cfg = load_config(TrainConfig, str(path))
    assert {k: getattr(cfg, k) for k in expected} == expected


def test_lf_yaml_trains_unchanged(tmp_path, tiny_model_dir, capsys):
    from zhtune.train.sft import train

    has_tb = importlib.util.find_spec("tensorboard") is not None
    out = tmp_path / "run"
    cfg = load_config(
        TrainConfig, lf_yaml(tmp_path, model=tiny_model_dir, target="q_proj,v_proj", out=out,
                             report_to="tensorboard" if has_tb else "none"),
    )  # fmt: skip
    train(cfg, progress=False)
    banner = capsys.readouterr().out
    assert "LLaMA-Factory keys translated" in banner and "per_device_train_batch_size -> batch_size" in banner
    assert (out / "adapter" / "adapter_config.json").is_file()
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    results = json.loads((out / "train_results.json").read_text())
    assert results["steps"] == 4 and results["train_examples"] == 6 + 4  # the tool-call record rejected
    assert "translated" in (out / "config.yaml").read_text(encoding="utf-8")
    if has_tb:
        assert_events_hold_the_loss(out)


def assert_events_hold_the_loss(out: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((out / "tracking").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard events file"
    logged = {}
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            logged[tag] = [e.step for e in acc.Scalars(tag)]
    assert logged["train/loss"] == [1, 2, 3, 4]
    rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == logged["train/loss"]


def test_eval_dataset_is_the_validation_set(tmp_path, tiny_model_dir):
    """LLaMA-Factory's eval_dataset (zhtune's val_data): names from dataset_info.json validated on
    every eval_steps; its unreadable records join the one rejects file, and all of dataset trains."""
    from zhtune.train.sft import train

    out = tmp_path / "run"
    keys = {"dataset: alpaca_zh_demo,support_chat": "dataset: alpaca_zh_demo\neval_dataset: support_chat\neval_steps: 2"}
    cfg = load_config(TrainConfig, lf_yaml(tmp_path, model=tiny_model_dir, out=out, **keys))
    assert cfg.data == ["alpaca_zh_demo"] and cfg.val_data == ["support_chat"] and cfg.val_size == 0
    train(cfg, progress=False)
    results = json.loads((out / "train_results.json").read_text())
    assert (results["train_examples"], results["val_examples"]) == (6, 4)
    rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4]
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 1 and rejects[0]["file"].endswith("support_chat.json")


def test_lf_full_example_trains_without_its_deepspeed_key(tmp_path, tiny_model_dir):
    """examples/train_full/qwen3_full_sft.yaml: its deepspeed key is refused with the launch
    command; without it the full fine-tuning runs and saves model/."""
    from zhtune.train.sft import train

    full = {"finetuning_type: lora": "finetuning_type: full", "lora_rank: 8\n": "", "lora_target: all\n": ""}
    ds = {"finetuning_type: lora": "finetuning_type: full\ndeepspeed: examples/deepspeed/ds_z3_config.json"}
    with pytest.raises(
        ZhtuneError, match="'deepspeed' is not supported: zhtune runs DeepSpeed through accelerate"
    ):
        load_config(TrainConfig, lf_yaml(tmp_path, model=tiny_model_dir, **ds))
    out = tmp_path / "full"
    cfg = load_config(TrainConfig, lf_yaml(tmp_path, model=tiny_model_dir, out=out, **full), ["max_steps=2"])
    assert cfg.method == "full" and cfg.lr == 2e-4
    train(cfg, progress=False)
    assert (out / "model" / "config.json").is_file()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb installed")
def test_a_tracker_that_is_not_installed_is_a_config_error(tmp_path):
    with pytest.raises(ZhtuneError, match="report_to': wandb needs its package: pip install wandb"):
        load_config(TrainConfig, lf_yaml(tmp_path, report_to="wandb"))


def test_tracking_scalars_and_hyperparameters():
    from zhtune.train.tracking import hyperparameters, scalars

    row = {"step": 3, "epoch": 0.5, "loss": 1.5, "lr": 1e-4, "grad_norm": None, "eval_loss": 2.0}
    assert scalars(row) == {"train/epoch": 0.5, "train/loss": 1.5, "train/lr": 1e-4, "eval/loss": 2.0}
    assert hyperparameters({"data": ["a", "b"], "lr": 1e-4, "x": None}) == {
        "data": "a,b",
        "lr": 1e-4,
        "x": None,
    }


def test_zhtune_keys_mix_with_lf_keys_in_one_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "model_name_or_path: m\ndataset: a\noutput_dir: o\nmethod: dora\nlr: 2e-4\n", encoding="utf-8"
    )
    cfg = load_config(TrainConfig, str(path))
    assert (cfg.method, cfg.lr, cfg.model) == ("dora", 2e-4, "m")


def test_ddp_timeout_reaches_the_process_group_settings(tmp_path):
    from datetime import timedelta

    from zhtune.train.setup import make_accelerator

    cfg = load_config(TrainConfig, lf_yaml(tmp_path, out=tmp_path / "o"))
    assert make_accelerator(cfg).init_handler.timeout == timedelta(seconds=180000000)

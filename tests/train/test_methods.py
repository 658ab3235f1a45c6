"""Every tuning method on a tiny model: loss falls, only the intended parameters change, the saved
run reloads to the same outputs, merged adapters equal unmerged ones, and config-time errors."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.conftest import write_jsonl
from zhtune.config import build_config
from zhtune.data.batching import split_validation
from zhtune.data.dataset import pad_batch, tokenize_records
from zhtune.data.templates import get_template
from zhtune.errors import ZhtuneError
from zhtune.models.loading import attach_adapter, load_for_inference
from zhtune.models.token_loss import summed_token_loss
from zhtune.train.config import TrainConfig
from zhtune.train.methods import METHODS
from zhtune.train.sft import train

TRAINED = {
    "freeze": r"layers\.1\.",  # freeze_layers=1 of 2: the last layer only
    "embeddings": r"embed_tokens|lm_head",  # tied: one matrix
    "lora": r"lora_[AB]",
    "dora": r"lora_[AB]|lora_magnitude",
    "rslora": r"lora_[AB]",
    "pissa": r"lora_[AB]",
    "adalora": r"lora_[ABE]\.",
    "ia3": r"ia3_l",
    "prefix": r"prompt_encoder",
    "prompt": r"prompt_encoder",
    "ptuning": r"prompt_encoder",
    "houlsby": r"\.bottleneck\.",
    "pfeiffer": r"\.bottleneck\.",
    "parallel": r"\.bottleneck\.",
    "qlora": r"lora_[AB]",
}
"""Method -> pattern of the parameter names it trains (everything else must stay frozen)."""
SAVED_AS = {
    "adalora": r"lora_[ABE]$",  # saved as parameters, without .weight
    "prefix": r"prompt_embeddings",
    "prompt": r"prompt_embeddings",
    "ptuning": r"prompt_embeddings",
}
"""Where peft's saved adapter names the trained parameters otherwise."""
LR = {"prompt": 1e-1, "ia3": 3e-2, "ptuning": 3e-3}
MERGEABLE = ("lora", "dora", "rslora", "pissa", "adalora", "ia3")
VAL = 16


def test_every_registered_method_is_tested():
    assert set(METHODS) == {"full", *TRAINED}


@pytest.fixture(scope="module")
def tuned_base(tmp_path_factory, tiny_model_dir, skill_records):
    """A briefly fully-tuned model: PEFT methods steer a trained model, not a random one (a random
    tiny model's frozen embeddings and norms leave adapters little to work with)."""
    tmp = tmp_path_factory.mktemp("base")
    data = write_jsonl(tmp / "skills.jsonl", skill_records[0][:512])
    cfg = build_config(
        TrainConfig,
        dict(
            model=str(tiny_model_dir), data=[str(data)], output_dir=str(tmp / "run"), template="chatml",
            method="full", max_steps=100, batch_size=16, lr=3e-3, logging_steps=50, cutoff_len=64,
        ),
    )  # fmt: skip
    return train(cfg, progress=False) / "model"


@pytest.fixture(scope="module")
def ack_file(tmp_path_factory, skill_records):
    """A new reply style to learn: every answer becomes the same digits."""
    records = [
        {**r, "messages": [r["messages"][0], {"role": "assistant", "content": "一二三四五"}]}
        for r in skill_records[0][:128]
    ]
    return write_jsonl(tmp_path_factory.mktemp("ack") / "ack.jsonl", records)


def method_cfg(base, data, out, method: str, **kw) -> TrainConfig:
    values = dict(
        model=str(base), data=[str(data)], output_dir=str(out), template="chatml", method=method,
        max_steps=21, save_steps=10, batch_size=16, lr=LR.get(method, 1e-2), logging_steps=3,
        cutoff_len=64, val_size=VAL, freeze_layers=1, num_virtual_tokens=8, adapter_size=16,
    )  # fmt: skip
    return build_config(TrainConfig, {**values, **kw})


def rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "trainer_log.jsonl").read_text().splitlines()]


def reloaded_eval_loss(run, data) -> float:
    """The validation loss of the run as reloaded from disk (same split, same tokenization)."""
    model, tokenizer, template = load_for_inference(run)
    records = [json.loads(line) for line in data.read_text().splitlines()]
    examples = tokenize_records(records, tokenizer, get_template(template), 64).examples
    _, val = split_validation(examples, VAL, 42)
    batch = pad_batch(val, tokenizer.pad_token_id)
    with torch.no_grad():
        total = summed_token_loss(model, batch)
    return float(total) / int((batch["labels"][:, 1:] != -100).sum())


@pytest.mark.parametrize("method", sorted(TRAINED))
def test_method_trains_only_its_parameters_and_reloads(method, tmp_path, tuned_base, ack_file):
    run = train(method_cfg(tuned_base, ack_file, tmp_path / method, method), progress=False)
    log = rows(run)
    curve = [r["loss"] for r in log if "loss" in r]
    assert curve[-1] < (0.9 if method == "ptuning" else 0.85) * curve[0], curve  # P-tuning v1 is the weakest

    # between two checkpoints exactly the method's parameters moved (a peft method's checkpoint
    # holds its adapter alone, under peft's names)
    adapter = METHODS[method].adapter_checkpoints
    weights = "adapter_model.safetensors" if adapter else "model.safetensors"
    a = load_file(run / "checkpoints" / "step-10" / weights)
    b = load_file(run / "checkpoints" / "step-20" / weights)
    pattern = re.compile(SAVED_AS.get(method, TRAINED[method]) if adapter else TRAINED[method])
    changed = {k for k in a if a[k].is_floating_point() and not torch.equal(a[k], b[k])}
    intended = {k for k in a if pattern.search(k) and a[k].is_floating_point()}
    # (bitsandbytes re-serialises a 4-bit base's quantization state slightly differently per save)
    changed = {k for k in changed if not (method == "qlora" and ".base_layer.weight." in k)}
    assert changed and changed <= intended, changed - intended
    if method != "adalora":  # AdaLoRA prunes its rank budget: pruned singular values stay at zero
        assert changed == intended, intended - changed

    # the saved run reloads to the model that was trained: same validation loss
    tolerance = 1e-3 if method == "qlora" else 1e-4
    assert reloaded_eval_loss(run, ack_file) == pytest.approx(log[-1]["eval_loss"], rel=tolerance)
    assert not (run / "pissa_init").exists()


@pytest.mark.parametrize("method", MERGEABLE)
def test_merged_adapter_equals_unmerged(method, tmp_path, tuned_base, ack_file):
    run = train(method_cfg(tuned_base, ack_file, tmp_path / method, method, max_steps=6), progress=False)
    merged, tokenizer, _ = load_for_inference(run)
    unmerged = attach_adapter(AutoModelForCausalLM.from_pretrained(tuned_base), str(run / "adapter")).eval()
    ids = torch.tensor(
        [tokenizer.encode("<|im_start|>user\n把 123 写成中文<|im_end|>\n<|im_start|>assistant\n")]
    )
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, unmerged(ids).logits, rtol=1e-5, atol=1e-5)
    assert not any("lora_" in n or "ia3_" in n for n, _ in merged.named_parameters())  # really merged


def test_pissa_adapter_applies_to_the_original_base(tmp_path, tuned_base, ack_file):
    """PiSSA trains on a residual base; the saved adapter is converted to apply to the original."""
    run = train(method_cfg(tuned_base, ack_file, tmp_path / "p", "pissa", max_steps=6), progress=False)
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 2 * 8


def test_fresh_bottleneck_adapters_leave_outputs_unchanged(tiny_model_dir):
    from zhtune.models.bottleneck import BottleneckConfig, add_bottleneck_adapters

    ids = torch.tensor([[1, 5, 9, 12, 40]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        expected = base(ids).logits
        for kind, per_layer in (("houlsby", 2), ("pfeiffer", 1), ("parallel", 1)):
            model = add_bottleneck_adapters(
                AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), BottleneckConfig(kind, 8)
            )
            torch.testing.assert_close(model(ids).logits, expected)
            adapters = {
                n.rsplit(".bottleneck.", 1)[0] for n, p in model.named_parameters() if p.requires_grad
            }
            assert len(adapters) == per_layer * 2  # 2 layers


def test_init_adapter_continues_an_existing_lora(tmp_path, tuned_base, ack_file):
    first = train(method_cfg(tuned_base, ack_file, tmp_path / "a", "lora", max_steps=8), progress=False)
    fresh_start = rows(first)[0]["loss"]
    second = train(
        method_cfg(tuned_base, ack_file, tmp_path / "b", "lora", max_steps=4, init_adapter=str(first)),
        progress=False,
    )
    continued_start = rows(second)[0]["loss"]
    assert continued_start < 0.9 * fresh_start  # picks up where the first run ended
    assert continued_start == pytest.approx(rows(first)[-1]["loss"], rel=0.15)
    saved = load_file(second / "adapter" / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)


def test_method_errors_are_raised_at_config_time(tmp_path, monkeypatch, tuned_base, ack_file):
    with pytest.raises(ZhtuneError, match="unknown method 'lorra'.*Did you mean: lora"):
        method_cfg(tuned_base, ack_file, tmp_path / "x", "lorra")
    with pytest.raises(ZhtuneError, match="method prefix prepends virtual tokens"):
        method_cfg(tuned_base, ack_file, tmp_path / "x", "prefix", packing=True)
    with pytest.raises(ZhtuneError, match="init_adapter.*method full has no adapter"):
        method_cfg(tuned_base, ack_file, tmp_path / "x", "full", init_adapter="somewhere")
    assert method_cfg(tuned_base, ack_file, tmp_path / "x", "SadapterH").method == "houlsby"

    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a)
    )
    with pytest.raises(ZhtuneError, match=r"qlora needs bitsandbytes.*zhtune\[qlora\]"):
        method_cfg(tuned_base, ack_file, tmp_path / "x", "qlora")

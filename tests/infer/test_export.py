"""zhtune export: a merged LoRA run equals the run as zhtune loads it, under plain transformers;
adapters that cannot merge are refused (and kept apart without --merge); 8- and 4-bit exports are
smaller, reload, and keep their perplexity; GPTQ is refused without a GPU."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from zhtune.cli import main
from zhtune.config import build_config
from zhtune.models.loading import load_for_inference
from zhtune.train.config import TrainConfig
from zhtune.train.sft import train

PROMPT = "<|im_start|>user\n把 123 写成中文数字。<|im_end|>\n<|im_start|>assistant\n"
PERPLEXITY_BOUND = {8: 0.01, 4: 0.05}
"""Largest relative change of perplexity allowed. Measured on the tuned tiny model (64 records):
int8 +0.01%, NF4 +0.34%; the bounds leave room for other seeds and CPU kernels."""


def run_cfg(model, data, out, **kw) -> TrainConfig:
    values = dict(model=str(model), data=[str(data)], output_dir=str(out), template="chatml", cutoff_len=64)
    return build_config(TrainConfig, {**values, **kw})


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory, tiny_model_dir, train_file):
    """A briefly fully-tuned model: quantization error is only meaningful on trained weights (a
    random model's perplexity is the vocabulary size whatever its weights)."""
    out = tmp_path_factory.mktemp("export") / "full"
    cfg = run_cfg(tiny_model_dir, train_file, out, method="full", max_steps=100, batch_size=16, lr=3e-3)
    return train(cfg, progress=False)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tuned_run, train_file):
    out = tmp_path_factory.mktemp("export") / "lora"
    return train(run_cfg(tuned_run, train_file, out, method="lora", max_steps=4, lr=1e-2), progress=False)


@pytest.fixture(scope="module")
def prefix_run(tmp_path_factory, tuned_run, train_file):
    out = tmp_path_factory.mktemp("export") / "prefix"
    cfg = run_cfg(tuned_run, train_file, out, method="prefix", max_steps=1, num_virtual_tokens=4)
    return train(cfg, progress=False)


def logits(model, tokenizer) -> torch.Tensor:
    ids = torch.tensor([tokenizer.encode(PROMPT, add_special_tokens=False)])
    with torch.no_grad():
        return model(ids).logits


def test_merged_lora_loads_in_plain_transformers_with_the_same_logits(lora_run, tmp_path):
    out = tmp_path / "merged"
    assert main(["export", str(lora_run), "-o", str(out), "--merge"]) == 0

    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ref_model, ref_tokenizer, _ = load_for_inference(lora_run)
    torch.testing.assert_close(
        logits(exported, tokenizer), logits(ref_model, ref_tokenizer), rtol=0, atol=1e-5
    )
    weights = load_file(out / "model.safetensors")
    assert not any("lora_" in k for k in weights) and all(v.dtype == torch.float32 for v in weights.values())

    # the chat template and its stop token travel with the model
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in exported.generation_config.eos_token_id
    manifest = json.loads((out / "zhtune_export.json").read_text())
    assert manifest["source"] == str(lora_run.resolve()) and manifest["method"] == "lora"
    assert (
        manifest["merged"] is True and manifest["quantization"] is None and manifest["template"] == "chatml"
    )
    assert not list(tmp_path.glob(".*tmp-export"))  # the staging directory is gone


def test_merge_is_refused_for_a_prefix_run_which_exports_with_its_adapter(prefix_run, tmp_path, capsys):
    out = tmp_path / "prefix"
    assert main(["export", str(prefix_run), "-o", str(out), "--merge"]) == 1
    err = capsys.readouterr().err
    assert "prefix adapter cannot be folded into the weights" in err and "without --merge" in err
    assert not out.exists()

    assert main(["export", str(prefix_run), "-o", str(out)]) == 0
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "model.safetensors").is_file()
    # zhtune loads base + adapter from the export (its manifest names the adapter and template) ...
    model, tokenizer, template = load_for_inference(out)
    ref_model, ref_tokenizer, _ = load_for_inference(prefix_run)
    assert template == "chatml"
    torch.testing.assert_close(logits(model, tokenizer), logits(ref_model, ref_tokenizer), rtol=0, atol=1e-5)
    # ... and so does peft, whose adapter config now names the export as its base
    from peft import AutoPeftModelForCausalLM

    peft_model = AutoPeftModelForCausalLM.from_pretrained(out / "adapter").eval()
    torch.testing.assert_close(
        logits(peft_model, tokenizer), logits(ref_model, ref_tokenizer), rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_export_is_smaller_reloads_and_keeps_its_perplexity(bits, tuned_run, tmp_path):
    import bitsandbytes as bnb

    from zhtune.infer.export import perplexity, read_records

    out = tmp_path / f"q{bits}"
    assert (
        main(["export", str(tuned_run), "-o", str(out), "--quantize", str(bits), "--eval-records", "64"]) == 0
    )
    report = json.loads((out / "export_report.json").read_text())
    before, after = report["rows"]
    fp32_bytes = (tuned_run / "model" / "model.safetensors").stat().st_size
    assert before["bytes"] == fp32_bytes and after["bytes"] < 0.6 * fp32_bytes
    assert abs(after["perplexity"] / before["perplexity"] - 1) <= PERPLEXITY_BOUND[bits]
    assert before["perplexity"] < 50  # a trained model (a random one scores ~ the vocabulary size, 800)

    # plain transformers reloads the quantized layers; the reported perplexity is the reloaded model's
    model = AutoModelForCausalLM.from_pretrained(out)
    layer = {8: bnb.nn.Linear8bitLt, 4: bnb.nn.Linear4bit}[bits]
    assert isinstance(model.model.layers[0].mlp.up_proj, layer)
    records = read_records(
        yaml.safe_load((tuned_run / "config.yaml").read_text())["data"], "auto", "", 64, True
    )
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert perplexity(model, tokenizer, "chatml", records, 64) == pytest.approx(after["perplexity"], rel=1e-6)
    manifest = json.loads((out / "zhtune_export.json").read_text())
    assert manifest["quantization"]["bits"] == bits and manifest["quantization"]["backend"] == "bitsandbytes"


def test_gptq_without_a_gpu_is_refused_clearly(tuned_run, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    assert (
        main(["export", str(tuned_run), "-o", str(tmp_path / "g"), "--quantize", "4", "--backend", "gptq"])
        == 1
    )
    assert "--backend gptq needs a CUDA GPU" in capsys.readouterr().err


def test_refusals_before_any_weight_is_loaded(tuned_run, lora_run, tmp_path, capsys):
    assert main(["export", str(lora_run), "-o", str(tmp_path / "q"), "--quantize", "4"]) == 1
    assert "--quantize needs the full weights" in capsys.readouterr().err
    assert main(["export", str(tuned_run), "-o", str(tuned_run), "--overwrite"]) == 1  # never over the run
    assert "would overwrite" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x")
    assert main(["export", str(tuned_run), "-o", str(tmp_path / "busy")]) == 1
    assert "--overwrite" in capsys.readouterr().err


def test_export_on_the_cpu_keeps_the_weights(tuned_run, tmp_path, capsys):
    out = tmp_path / "cpu"
    assert main(["export", str(tuned_run), "-o", str(out), "--device", "cpu"]) == 0
    assert "-> " + str(out) + ": fp32 (on cpu)" in capsys.readouterr().err
    tokenizer = AutoTokenizer.from_pretrained(out)
    model, ref = (AutoModelForCausalLM.from_pretrained(d) for d in (out, tuned_run / "model"))
    torch.testing.assert_close(logits(model, tokenizer), logits(ref, tokenizer))


def test_sharded_export_reloads(tuned_run, tmp_path):
    out = tmp_path / "sharded"
    assert (
        main(["export", str(tuned_run), "-o", str(out), "--max-shard-size", "100KB", "--dtype", "bf16"]) == 0
    )
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    ref = AutoModelForCausalLM.from_pretrained(tuned_run / "model", dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(out)
    torch.testing.assert_close(logits(model, tokenizer), logits(ref, tokenizer))

"""Every model family zhtune knows natively trains with its registry defaults: a tiny random
model of each family takes LoRA on its default modules under its default chat template, and the
run directory loads back to the same outputs as plain peft."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import CONV
from zhtune.data.templates import TEMPLATES, get_template, render_text
from zhtune.errors import ZhtuneError
from zhtune.models.families import FAMILIES, lora_targets, resolve_template
from zhtune.models.tiny import TINY_CONFIG_KEYS, build_tiny_model
from zhtune.train.config import TrainConfig
from zhtune.train.sft import train

FAMILY_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "bloom", "gpt_neox", "glm4")


def losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "trainer_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


# -- the registry, without training ---------------------------------------------------------------
@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_registry_resolves_template_and_lora_targets(model_type):
    fam = FAMILIES[model_type]
    assert fam.template in TEMPLATES
    assert resolve_template("auto", model_type, {}, None)[0] == fam.template
    assert lora_targets(model_type, ["default"]) == list(fam.lora_default)
    assert lora_targets(model_type, ["all"]) == "all-linear"
    assert lora_targets(model_type, ["q_proj"]) == ["q_proj"]


def test_auto_prefers_the_tokenizers_own_template_over_the_family():
    """An instruct model is tuned in its own format: a LLaMA-architecture model with a ChatML
    chat_template (SmolLM2, Yi, ...) gets 'tokenizer', never the family's LLaMA-2 format."""
    chatml = "{% for m in messages %}<|im_start|>{{ m.role }}{% endfor %}"
    for model_type in ("llama", "mistral", "qwen3", "glm4", "no-such-family"):
        name, why = resolve_template("auto", model_type, {}, chatml)
        assert (name, why) == ("tokenizer", "auto: the tokenizer's own chat_template")
    assert resolve_template("llama2", "llama", {}, chatml) == ("llama2", "set by template:")


def test_registry_template_overrides_and_unknown_families():
    assert resolve_template("auto", "llama", {"<|eot_id|>": 7}, None)[0] == "llama3"
    assert resolve_template("auto", "llama", {}, None)[0] == "llama2"
    name, why = resolve_template("auto", "no-such-family", {}, None)
    assert name == "default" and "no-such-family" in why
    assert lora_targets("no-such-family", ["default"]) == "all-linear"
    assert all(f.template in TEMPLATES for f in FAMILIES.values())


def test_tiny_models_cover_the_families_and_refuse_others(tiny_tokenizer):
    assert set(TINY_CONFIG_KEYS) == set(FAMILY_TYPES)
    with pytest.raises(ZhtuneError, match="no tiny model"):
        build_tiny_model("no-such-family", tiny_tokenizer)


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_default_lora_targets_name_real_modules(model_type, tiny_tokenizer):
    """Each default target is one module per decoder layer of the real architecture."""
    model = build_tiny_model(model_type, tiny_tokenizer, num_layers=2)
    assert model.config.model_type == model_type
    assert model.get_input_embeddings().weight.shape[0] == len(tiny_tokenizer)
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (
        tiny_tokenizer.bos_token_id,
        tiny_tokenizer.eos_token_id,
        tiny_tokenizer.pad_token_id,
    )
    assert sum(p.numel() for p in model.parameters()) < 500_000
    names = [name for name, _ in model.named_modules()]
    for target in FAMILIES[model_type].lora_default:
        matches = [n for n in names if n.split(".")[-1] == target]
        assert len(matches) == 2, (target, matches)
        assert all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in matches)


# -- one LoRA run per family ----------------------------------------------------------------------
@pytest.fixture(scope="module", params=FAMILY_TYPES)
def family_run(request, tmp_path_factory, tiny_tokenizer, train_file):
    model_type = request.param
    tmp = tmp_path_factory.mktemp(model_type)
    base = tmp / "base"
    build_tiny_model(model_type, tiny_tokenizer, seed=0).save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)  # reloads as Qwen2Tokenizer (+1 token) for qwen2
    cfg = TrainConfig(
        model=str(base),
        data=[str(train_file)],
        output_dir=str(tmp / "run"),
        method="lora",
        lora_target=["default"],
        template="auto",
        max_steps=20,
        batch_size=8,
        lr=1e-2,
        cutoff_len=64,
        logging_steps=1,
        seed=0,
    )
    return model_type, base, train(cfg, progress=False)


def test_lora_loss_falls(family_run):
    _, _, run = family_run
    curve = losses(run)
    assert len(curve) == 20
    first, last = sum(curve[:3]) / 3, sum(curve[-3:]) / 3
    assert last < first - 0.1, curve


def test_adapter_targets_the_family_defaults(family_run):
    model_type, _, run = family_run
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == sorted(FAMILIES[model_type].lora_default)


def test_run_records_the_family_template(family_run):
    model_type, _, run = family_run
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["template"] == FAMILIES[model_type].template


def test_saved_chat_template_renders_like_training(family_run):
    model_type, _, run = family_run
    template = get_template(FAMILIES[model_type].template)
    tok = AutoTokenizer.from_pretrained(run)
    assert tok.apply_chat_template(CONV, tokenize=False) == render_text(template, CONV, tok)
    prompt = tok.apply_chat_template(CONV[:-1], tokenize=False, add_generation_prompt=True)
    assert prompt == render_text(template, CONV[:-1], tok, add_generation_prompt=True)


def test_run_directory_loads_like_base_plus_peft_adapter(family_run):
    from peft import PeftModel

    from zhtune.models.loading import load_for_inference

    model_type, base, run = family_run
    model, tok, template_name = load_for_inference(run)
    assert template_name == FAMILIES[model_type].template
    reference = AutoModelForCausalLM.from_pretrained(base)
    if len(tok) > reference.get_input_embeddings().weight.shape[0]:
        reference.resize_token_embeddings(len(tok))  # the adapter then carries the embeddings
    reference = PeftModel.from_pretrained(reference, run / "adapter").eval()
    prompt = render_text(get_template(template_name), CONV[:2], tok, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
        with reference.disable_adapter():
            untuned = reference(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert not torch.allclose(want, untuned, atol=1e-3)  # the adapter changes the outputs

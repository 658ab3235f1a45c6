"""The engines on the real model: a LoRA run of SmolLM2-135M-Instruct exported to GGUF (f16 and
q4_k_m, with a Modelfile) by llama.cpp's own converter and quantizer, the f16 file reloaded by
transformers, and llama.cpp behind ``serve`` and ``predict``, exactly as a user runs them.

Markers: ``real`` (skipped where the model cannot be fetched) and ``llamacpp`` (the ``llama_cpp`` fixture
skips where llama-cpp-python is not installed). The converter comes from llama-cpp-python's
sdist, fetched once with pip.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import write_jsonl
from tests.serving import zhtune_server
from zhtune.cli import main

pytestmark = [pytest.mark.real, pytest.mark.llamacpp]

QUESTIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2+3?"}],
    [{"role": "user", "content": "用一句话介绍长城。"}],
    [{"role": "user", "content": "Write a haiku about autumn."}],
]


@pytest.fixture(scope="module")
def exported(real_lora_run, llama_cpp, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "smol"
    assert (
        main(["export", str(real_lora_run), "-o", str(out), "--gguf", "f16,q4_k_m", "--device", "cpu"]) == 0
    )
    return out


@pytest.fixture(scope="module")
def merged(real_lora_run, smollm2):
    """The LoRA run merged in plain transformers + peft, and its tokenizer (the reference)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, real_lora_run / "adapter").merge_and_unload().eval()
    return model, AutoTokenizer.from_pretrained(real_lora_run)


def greedy_ids(model, tok, messages, n: int) -> list[int]:
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, eos_token_id=tok.eos_token_id)
    ids = out[0, enc["input_ids"].shape[1] :].tolist()
    return ids[: ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids


def test_export_writes_gguf_files_a_modelfile_and_the_manifest(exported):
    manifest = json.loads((exported / "zhtune_export.json").read_text())
    files = {f["type"]: f for f in manifest["gguf"]["files"]}
    assert set(files) == {"f16", "q4_k_m"} and manifest["merged"] is True
    for f in files.values():
        assert (exported / f["file"]).stat().st_size == f["bytes"]
        assert (exported / f["file"]).read_bytes()[:4] == b"GGUF"
    assert files["q4_k_m"]["bytes"] < 0.5 * files["f16"]["bytes"]
    modelfile = (exported / "Modelfile").read_text()
    assert f"FROM ./{files['q4_k_m']['file']}\n" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert 'SYSTEM "You are a helpful AI assistant named SmolLM, trained by Hugging Face"' in modelfile
    assert "<|im_start|>assistant\n" in modelfile
    assert manifest["vllm"]["lora_ready"] is True and manifest["vllm"]["run"] is False


def test_f16_file_reloads_in_transformers_with_the_merged_models_greedy_reply(exported, merged):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = next(exported.glob("*-f16.gguf")).name
    reloaded = AutoModelForCausalLM.from_pretrained(exported, gguf_file=name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(exported)
    model, ref_tok = merged
    for conv in QUESTIONS[:2]:
        assert greedy_ids(reloaded, tok, conv, 12) == greedy_ids(model, ref_tok, conv, 12)


def test_llama_cpp_runs_f16_like_the_merged_model_and_q4_k_m_too(exported, merged):
    from zhtune.infer.generate import Prompter, Sampling, decode_replies
    from zhtune.infer.llamacpp import LlamaCppModel

    model, tok = merged
    prompter = Prompter(tok, "tokenizer")
    prompts = [prompter.prompt_ids(c) for c in QUESTIONS]
    f16 = LlamaCppModel(next(exported.glob("*-f16.gguf")), max_sequences=4, context=512)
    batched = decode_replies(f16.decoder(prompts, [Sampling(16)] * 4, prompter.stop_ids, 0), tok, 4)
    for conv, reply in zip(QUESTIONS, batched):
        assert reply.token_ids == greedy_ids(model, tok, conv, 16)
    alone = decode_replies(f16.decoder(prompts[2:3], [Sampling(16)], prompter.stop_ids, 0), tok, 1)
    assert alone[0].token_ids == batched[2].token_ids  # a row does not depend on its batch
    assert len(f16.free_sequences) == 4  # every KV stream given back
    f16.close()

    q4 = LlamaCppModel(next(exported.glob("*-q4_k_m.gguf")), max_sequences=2, context=512)
    replies = decode_replies(q4.decoder(prompts[:2], [Sampling(16)] * 2, prompter.stop_ids, 0), tok, 2)
    assert all(r.text.strip() for r in replies)
    assert "Paris" in replies[0].text
    q4.close()


def test_serve_engine_llamacpp_answers_the_openai_client(exported, real_lora_run, merged, tmp_path):
    import openai

    f16 = next(exported.glob("*-f16.gguf"))
    args = ["serve", str(real_lora_run), "--engine", "llamacpp", "--gguf", str(f16), "--max-batch-size", "4"]
    with zhtune_server(args, tmp_path / "serve.log", "/health") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(
            model="default", messages=QUESTIONS[1], max_tokens=12, temperature=0
        )
        stream = client.chat.completions.create(
            model="default", messages=QUESTIONS[0], max_tokens=12, temperature=0, stream=True
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        health = json.loads(__import__("urllib.request").request.urlopen(f"{url}/health").read())
    model, tok = merged
    assert reply.choices[0].message.content == tok.decode(greedy_ids(model, tok, QUESTIONS[1], 12))
    assert streamed == tok.decode(greedy_ids(model, tok, QUESTIONS[0], 12))
    assert health["status"] == "ok"
    assert "llama.cpp" in (tmp_path / "serve.log").read_text()


def test_predict_engine_llamacpp_equals_native_and_caches_its_gguf(real_lora_run, llama_cpp, tmp_path):
    rows = [{"id": f"q{i}", "messages": c} for i, c in enumerate(QUESTIONS)]
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    outs = {}
    for engine in ("native", "llamacpp"):
        outs[engine] = tmp_path / f"{engine}.jsonl"
        args = ["predict", str(real_lora_run), str(data), "-o", str(outs[engine]), "--max-new-tokens", "10",
                "--no-progress", "--engine", engine, "--batch-size", "4"]  # fmt: skip
        assert main(args) == 0
    native, llama = (
        [json.loads(x) for x in outs[e].read_text().splitlines()] for e in ("native", "llamacpp")
    )
    assert [r["prediction"] for r in llama] == [r["prediction"] for r in native]
    cached = real_lora_run / "gguf" / f"{real_lora_run.name}-f16.gguf"
    assert cached.is_file()  # exported on the fly, kept for the next start
    before = cached.stat().st_mtime_ns
    from zhtune.infer.backends import resolve_gguf

    assert resolve_gguf(str(real_lora_run)) == cached and cached.stat().st_mtime_ns == before

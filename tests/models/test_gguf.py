"""GGUF files as models: dequantized once through transformers, cached as a plain directory."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from zhtune.errors import ZhtuneError
from zhtune.models.gguf import MANIFEST, cache_dir_for, gguf_model_dir, is_gguf
from zhtune.models.loading import resolve_source


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZHTUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cache_key_follows_the_file(tmp_path, cache):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    first = cache_dir_for(f)
    assert first.parent == cache / "gguf" and first.name.startswith("m-")
    assert cache_dir_for(f) == first
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))  # a changed file is converted again
    assert cache_dir_for(f) != first
    assert is_gguf("x/Model.Q4_K_M.GGUF") and not is_gguf("x/model.safetensors")


def test_missing_file_and_unreadable_architecture_are_clear_errors(tmp_path, cache):
    gguf = pytest.importorskip("gguf")
    with pytest.raises(ZhtuneError, match="model path not found"):
        resolve_source(tmp_path / "none.gguf")
    odd = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(odd), "rwkv7")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ZhtuneError, match=r"odd\.gguf: transformers cannot read.*architecture rwkv7"):
        gguf_model_dir(odd)
    assert not any((cache / "gguf").glob("*"))  # nothing half-written is left in the cache


@pytest.mark.real
def test_smollm2_gguf_converts_once_to_the_same_model(smollm2_gguf, smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = json.loads((smollm2 / MANIFEST).read_text())
    assert manifest["model_type"] == "llama" and manifest["dtype"] == "float32"
    assert manifest["parameters"] == 134_515_008 and manifest["chat_template"] is True
    started = time.perf_counter()
    assert gguf_model_dir(smollm2_gguf) == smollm2  # cached: no second conversion
    assert time.perf_counter() - started < 2
    src = resolve_source(smollm2_gguf)
    assert src.weights == src.tokenizer == str(smollm2)

    direct = AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    cached = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "你好"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, cached(ids).logits)

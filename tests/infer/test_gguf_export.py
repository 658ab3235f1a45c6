"""GGUF export without llama.cpp: type parsing, where the converter comes from (a checkout, the
sdist's files), what its refusals become, export's own refusals, the engine options, and the
vLLM verdict on adapters. The real converter and quantizer run in tests/infer/test_engines_real.py."""

from __future__ import annotations

import io
import json
import tarfile
import textwrap

import pytest

from zhtune.cli import main
from zhtune.errors import ZhtuneError
from zhtune.infer.backends import EngineOptions
from zhtune.infer.gguf_export import (
    CONVERTER,
    convert,
    extract_converter,
    find_converter,
    intermediate,
    parse_types,
    write_gguf,
)
from zhtune.infer.vllm_check import check_adapter, vllm_commands


def test_types_parse_in_order_once_and_unknown_names_are_refused():
    assert [t.name for t in parse_types("q4_k_m, F16,q4_k_m")] == ["q4_k_m", "f16"]
    assert intermediate(parse_types("q4_k_m")).name == "f16"
    assert intermediate(parse_types("q6_k,bf16")).name == "bf16"
    with pytest.raises(ZhtuneError, match="unknown type q9; known: f32, f16"):
        parse_types("f16,q9")


def fake_llama_cpp(tmp_path, body: str):
    root = tmp_path / "llama.cpp"
    (root / "gguf-py").mkdir(parents=True)
    (root / CONVERTER).write_text(textwrap.dedent(body))
    return root


CONVERTER_OK = """
    import os, sys
    args = sys.argv[1:]
    out = args[args.index("--outfile") + 1]
    open(out, "wb").write(b"GGUF" + args[args.index("--outtype") + 1].encode() + os.environ["PYTHONPATH"].encode())
"""


def test_a_checkout_is_used_with_its_gguf_py(tmp_path):
    root = fake_llama_cpp(tmp_path, CONVERTER_OK)
    converter = find_converter(str(root))
    assert converter.script == root / CONVERTER and converter.gguf_py == root / "gguf-py"
    files = write_gguf(tmp_path, tmp_path, "run", parse_types("f16,q8_0"), converter)
    assert [f.name for f in files] == ["run-f16.gguf", "run-q8_0.gguf"]
    assert files[1].read_bytes().startswith(b"GGUFq8_0" + str(root / "gguf-py").encode())
    with pytest.raises(ZhtuneError, match="has no convert_hf_to_gguf.py"):
        find_converter(str(tmp_path / "nowhere"))


def test_the_converters_refusals_name_the_architecture_or_the_tokenizer(tmp_path):
    unsupported = fake_llama_cpp(
        tmp_path, 'import sys; print("ERROR:hf-to-gguf:Model FooForCausalLM is not supported"); sys.exit(1)'
    )
    with pytest.raises(ZhtuneError, match="cannot convert the FooForCausalLM architecture to GGUF"):
        convert(find_converter(str(unsupported)), tmp_path, tmp_path / "x.gguf", "f16")
    (unsupported / CONVERTER).write_text(
        "raise NotImplementedError('BPE pre-tokenizer was not recognized - update')"
    )
    with pytest.raises(ZhtuneError, match="does not know this tokenizer's pre-tokenizer"):
        convert(find_converter(str(unsupported)), tmp_path, tmp_path / "x.gguf", "f16")


def test_the_sdist_keeps_only_the_converter_its_classes_and_gguf_py(tmp_path):
    archive = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in [
            CONVERTER,
            "conversion/llama.py",
            "gguf-py/gguf/__init__.py",
            "src/llama.cpp",
            "ggml/big.c",
        ]:
            data = b"x"
            info = tarfile.TarInfo(f"llama_cpp_python-0.3.36/vendor/llama.cpp/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    extract_converter(archive, tmp_path / "out")
    kept = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert kept == ["conversion/llama.py", CONVERTER, "gguf-py/gguf/__init__.py"]


def test_export_refuses_gguf_with_bitsandbytes_and_for_unmergeable_adapters(tmp_path, tiny_model_dir, capsys):
    args = ["export", str(tiny_model_dir), "-o", str(tmp_path / "o"), "--gguf", "f16", "--quantize", "4"]
    assert main(args) == 1
    assert "--gguf makes its own quantized files (q8_0, q4_k_m, ...): drop --quantize" in capsys.readouterr().err
    adapter_run = tmp_path / "prefix-run"
    (adapter_run / "adapter").mkdir(parents=True)
    (adapter_run / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    (adapter_run / "config.yaml").write_text(f"model: {tiny_model_dir}\nmethod: prefix\ntemplate: default\n")
    assert main(["export", str(adapter_run), "-o", str(tmp_path / "o"), "--gguf", "f16"]) == 1
    assert "--gguf needs the full weights, but a prefix adapter cannot be folded" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_engine_options_are_checked_before_anything_loads():
    with pytest.raises(ZhtuneError, match="--engine must be one of native, llamacpp"):
        EngineOptions(engine="vllm").check()
    with pytest.raises(ZhtuneError, match="are for --engine llamacpp"):
        EngineOptions(gguf="q4_k_m").check()


def test_vllm_verdicts_follow_its_lora_loader():
    lora = {"peft_type": "LORA", "r": 8, "target_modules": ["q_proj", "v_proj"], "bias": "none"}
    assert check_adapter(lora).ready and check_adapter(lora).flags == []
    assert check_adapter({**lora, "r": 64}).flags == ["--max-lora-rank 64"]
    assert check_adapter({**lora, "r": 48}).flags == ["--max-lora-rank 64"]
    refused = check_adapter({**lora, "use_dora": True, "modules_to_save": ["lm_head"], "r": 1024})
    assert not refused.ready and len(refused.problems) == 3
    assert "DoRA" in refused.problems[0] and "modules_to_save (lm_head)" in refused.problems[1]
    assert check_adapter({**lora, "target_modules": ["embed_tokens", "q_proj"]}).problems == [
        "vLLM applies LoRA to linear layers, not to embed_tokens"
    ]
    assert not check_adapter({"peft_type": "IA3"}).ready
    assert vllm_commands("OUT", "BASE", "RUN/adapter", "run", check_adapter({**lora, "r": 32})) == [
        "vllm serve OUT",
        "vllm serve BASE --enable-lora --lora-modules run=RUN/adapter --max-lora-rank 32",
    ]


def test_a_missing_llama_cpp_python_names_the_extra(monkeypatch):
    import builtins

    from zhtune.infer.llamacpp import require_llama_cpp

    real_import = builtins.__import__

    def no_llama(name, *args, **kwargs):
        if name == "llama_cpp":
            raise ImportError("No module named 'llama_cpp'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_llama)
    with pytest.raises(ZhtuneError, match=r"--engine llamacpp needs llama.cpp: pip install .*'\.\[llamacpp\]'"):
        require_llama_cpp("--engine llamacpp")

"""The command line as a user runs it: help, bad input, train -> chat."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zhtune.cli import main

EXAMS = Path(__file__).resolve().parent / "fixtures" / "exam"


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "zhtune", *args], input=stdin, capture_output=True, text=True, timeout=300
    )


def test_help_lists_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for command in ("quickstart", "data", "train", "chat"):
        assert command in out


def test_train_help_lists_every_config_key(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "cutoff_len (int; default: 1024)" in out and "train_on_prompt" in out and "lora_rank" in out


def test_unknown_config_key_is_a_clear_error(tmp_path, capsys):
    code = main(["train", "model=m", "data=a.jsonl", f"output_dir={tmp_path / 'o'}", "lerning_rate=3"])
    assert code == 1
    assert "unknown config key 'lerning_rate'" in capsys.readouterr().err


def test_wrong_model_path_is_a_clear_error(tmp_path, capsys, train_file):
    code = main(["train", f"model={tmp_path / 'nope'}", f"data={train_file}", f"output_dir={tmp_path / 'o'}"])
    assert code == 1
    assert f"model path not found: {tmp_path / 'nope'}" in capsys.readouterr().err


def test_wrong_data_path_is_a_clear_error(tmp_path, capsys, tiny_model_dir):
    code = main(
        [
            "train",
            f"model={tiny_model_dir}",
            f"data={tmp_path / 'missing.jsonl'}",
            f"output_dir={tmp_path / 'o'}",
        ]
    )
    assert code == 1
    assert "missing.jsonl" in capsys.readouterr().err


def test_training_rejects_bad_records_with_reasons(tmp_path, tiny_model_dir, train_file):
    """A malformed line and a record with no assistant turn go to rejects.jsonl; training goes on."""
    data = tmp_path / "mixed.jsonl"
    good = train_file.read_text(encoding="utf-8").splitlines()[:40]
    bad = [
        '{"messages": [{"role": "user", "content": "hi"}',
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
    ]
    data.write_text("\n".join([*good[:20], *bad, *good[20:]]) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    code = main(
        [
            "train",
            f"model={tiny_model_dir}",
            f"data={data}",
            f"output_dir={out}",
            "template=chatml",
            "max_steps=2",
            "batch_size=4",
            "--no-progress",
        ]
    )
    assert code == 0
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["line"] for r in rejects] == [21, 22]
    assert "JSON" in rejects[0]["reason"] or "json" in rejects[0]["reason"]
    assert "no assistant turn" in rejects[1]["reason"]
    assert json.loads((out / "train_results.json").read_text())["rejected"] == 2


def test_train_then_chat_from_the_run_directory(tmp_path, tiny_model_dir, train_file):
    out = tmp_path / "run"
    result = run_cli(
        "train",
        f"model={tiny_model_dir}",
        f"data={train_file}",
        f"output_dir={out}",
        "template=chatml",
        "method=full",
        "max_steps=3",
        "batch_size=8",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    chat = run_cli(
        "chat",
        str(out),
        "--temperature",
        "0",
        "--max-new-tokens",
        "8",
        stdin="把 12 写成中文数字。\n/clear\n你好\n/exit\n",
    )
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.count("助手 Assistant>") == 2
    assert "(history cleared)" in chat.stdout


# -- --device and --dtype on every inference command ---------------------------------------------
INFERENCE_COMMANDS = [["chat"], ["predict"], ["serve"], ["webui"], ["eval", "exam"], ["eval", "gen"],
                      ["eval", "judge"], ["export"]]  # fmt: skip


@pytest.mark.parametrize("command", INFERENCE_COMMANDS, ids=" ".join)
def test_every_inference_command_has_device_and_dtype(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split()).lower()  # help lines rewrapped as one
    if command == ["export"]:  # export's auto: the base model's own dtype; its device does more
        assert "--device device where merging, quantizing and the perplexity run: auto (cuda" in out
        assert "auto (the base model's)" in out
    else:
        assert "--device device where the model runs: auto (cuda if available, then mps, else cpu)" in out
        assert "--dtype {auto,fp32,bf16,fp16} weights dtype: auto (bf16 on a gpu" in out
        assert "else fp32), fp32, bf16, fp16 (default: auto)" in out


@pytest.mark.parametrize("command", INFERENCE_COMMANDS, ids=" ".join)
def test_device_cuda_on_a_cpu_only_machine_is_a_clear_error(command, tiny_model_dir, tmp_path, capsys):
    """Refused before any weight is loaded (or data read, or a judge asked), naming the device."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    data = tmp_path / "in.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "一加一？"}]}\n', encoding="utf-8")
    rest = {
        "predict": [str(data), "-o", str(tmp_path / "out.jsonl")],
        "export": ["-o", str(tmp_path / "export")],
        "exam": ["--data", str(EXAMS / "cmmlu")],
        "gen": ["--data", str(data)],
        "judge": ["--data", str(data), "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "judge"],
    }.get(command[-1], [])
    code = main([*command, str(tiny_model_dir), *rest, "--device", "cuda"])
    assert code == 1
    err = capsys.readouterr().err
    assert "error: --device cuda: this machine has no CUDA device" in err
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "export").exists()


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_chat_runs_on_the_device_asked_for(device, tiny_model_dir, monkeypatch):
    """``zhtune chat --device D``: the model is loaded there (auto is the CPU on a CPU-only machine),
    in fp32 by default on a CPU, and the chat answers."""
    import io

    import zhtune.infer.chat as chat

    real, seen = chat.chat_loop, {}

    def scripted(model, tokenizer, template, options, system=""):
        seen.update(param=next(model.parameters()))
        out = io.StringIO()
        real(model, tokenizer, template, options, system, stdin=io.StringIO("你好\n/exit\n"), stdout=out)
        seen["stdout"] = out.getvalue()
        return []

    monkeypatch.setattr(chat, "chat_loop", scripted)
    greedy = ["--template", "chatml", "--temperature", "0", "--max-new-tokens", "4"]
    assert main(["chat", str(tiny_model_dir), *greedy, "--device", device]) == 0
    if device == "auto" and torch.cuda.is_available():
        assert seen["param"].device.type == "cuda"
        return
    assert seen["param"].device.type == "cpu" and seen["param"].dtype == torch.float32
    assert "zhtune chat (template chatml; cpu, fp32)" in seen["stdout"]
    assert seen["stdout"].count("助手 Assistant>") == 1


@pytest.mark.parametrize(
    ("argv", "reruns"),
    [
        (["train", "--help"], True),
        (["quickstart", "--help"], True),
        (["experiment", "--help"], True),
        (["predict", "--help"], False),
        (["eval", "exam", "--help"], False),
        (["--version"], False),
    ],
)
def test_commands_that_train_start_over_on_huge_pages(argv, reruns, monkeypatch):
    """Started from the command line, the commands that train in their own process run again on
    huge pages (zhtune.allocator.use_huge_pages); the others, and main([...]) called from Python,
    go straight on."""
    import zhtune.cli as cli

    calls = []
    monkeypatch.setattr(cli, "use_huge_pages", lambda: calls.append(argv[0]))
    monkeypatch.setattr(sys, "argv", ["zhtune", *argv])
    with pytest.raises(SystemExit):  # (--help and --version exit)
        cli.main()
    assert calls == ([argv[0]] if reruns else [])
    with pytest.raises(SystemExit):
        cli.main(argv)  # (a caller's own list: never)
    assert calls == ([argv[0]] if reruns else [])

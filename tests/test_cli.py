"""The command line as a user runs it: help, bad input, train -> chat."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from zhtune.cli import main


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

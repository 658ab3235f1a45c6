"""LLaMA-Factory's dataset_info.json read as a dataset registry (tests/fixtures/llamafactory)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zhtune.data.registry import list_command, load_data, read_registry
from zhtune.errors import ZhtuneError

INFO = Path(__file__).resolve().parent.parent / "fixtures" / "llamafactory" / "dataset_info.json"


def test_sharegpt_tags_and_column_maps_become_conversations(tmp_path):
    records, rejected = load_data(
        ["support_chat"], registry=str(INFO), rejects_path=tmp_path / "rejects.jsonl"
    )
    assert len(records) == 4
    assert [m["role"] for m in records[0]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert records[0]["messages"][0]["content"] == "你是一个乐于助人的助手。"
    assert records[1]["messages"][1:3] == [
        {"role": "user", "content": "中国的首都是哪里？"},
        {"role": "assistant", "content": "北京。"},
    ]
    # the tool-call record is rejected with the field and the reason, not dropped silently
    assert rejected == 1
    reject = json.loads((tmp_path / "rejects.jsonl").read_text(encoding="utf-8"))
    assert reject["field"] == "conversations[1].speaker" and "tool-call" in reject["reason"]


def test_alpaca_entry_and_max_samples_per_entry():
    records, _ = load_data(["alpaca_zh_demo", "support_chat"], registry=str(INFO), max_samples=2)
    assert len(records) == 4
    assert records[0]["messages"][-1]["role"] == "assistant"
    assert records[0]["meta"]["source"] == "alpaca_zh_demo.json"


@pytest.mark.parametrize(
    "name, field",
    [("dpo_zh_demo", "ranking"), ("mllm_demo", "columns.images"), ("lima", "hf_hub_url")],
)
def test_an_entry_zhtune_cannot_read_names_the_entry_and_field(name, field):
    with pytest.raises(ZhtuneError) as err:
        load_data([name], registry=str(INFO))
    assert f"dataset '{name}'" in str(err.value) and f"field '{field}'" in str(err.value)


def test_data_list_reads_dataset_info(capsys):
    assert list_command(str(INFO), as_json=True) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["support_chat"]["format"] == "sharegpt" and rows["support_chat"]["exists"]
    assert rows["support_chat"]["map"] == {"dialog": "conversations", "sys_prompt": "system"}
    assert "ranking" in rows["dpo_zh_demo"]["unusable"]
    assert rows["alpaca_zh_demo"]["unusable"] == ""


def test_unknown_entry_field_is_an_error(tmp_path):
    info = tmp_path / "dataset_info.json"
    info.write_text(json.dumps({"x": {"file_name": "a.json", "colums": {}}}), encoding="utf-8")
    with pytest.raises(ZhtuneError, match="dataset 'x': unknown field 'colums'"):
        read_registry(info)


def test_prompt_only_columns_are_pretraining_text(tmp_path):
    (tmp_path / "c4.jsonl").write_text('{"text": "一段文字。"}\n', encoding="utf-8")
    info = tmp_path / "dataset_info.json"
    info.write_text(
        json.dumps({"c4": {"file_name": "c4.jsonl", "columns": {"prompt": "text"}}}), encoding="utf-8"
    )
    assert read_registry(info)["c4"].format == "text"
    records, _ = load_data(["c4"], registry=str(info))
    assert records[0]["meta"]["kind"] == "text"

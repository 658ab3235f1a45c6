"""The dataset registry: entries resolve against their YAML file, lookup order, clear errors, `zhtune
data list`, and registered names in a train config's data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import write_jsonl
from zhtune.cli import main
from zhtune.config import build_config
from zhtune.data.registry import SHIPPED, load_data, load_registry, read_registry, resolve_sources
from zhtune.errors import ZhtuneError

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


@pytest.fixture
def registry(tmp_path) -> Path:
    """A registry in its own folder, naming a fixture by a relative path, with a column mapping."""
    folder = tmp_path / "reg"
    folder.mkdir()
    data = folder / "zh.json"
    data.write_text((FIXTURES / "data" / "alpaca_chinese.json").read_text(encoding="utf-8"), encoding="utf-8")
    path = folder / "my_datasets.yaml"
    path.write_text(
        "alpaca_zh:\n"
        "  path: zh.json\n"
        "  format: alpaca\n"
        "  map: {zh_instruction: instruction, zh_input: input, zh_output: output}\n"
        "  tags: {lang: CN, task: MT, gen_method: SI}\n"
        "  description: translated Alpaca\n"
        "belle_fixture: ../../missing/belle.json\n",
        encoding="utf-8",
    )
    return path


def test_entries_resolve_relative_to_their_file(registry):
    entries = read_registry(registry)
    zh = entries["alpaca_zh"]
    assert zh.path == str(registry.parent / "zh.json") and zh.exists()
    assert zh.mapping == {"zh_instruction": "instruction", "zh_input": "input", "zh_output": "output"}
    assert zh.tags == {"lang": "CN", "task": "MT", "gen_method": "SI"} and zh.format == "alpaca"
    short = entries["belle_fixture"]  # the `name: path` shorthand
    assert short.format == "auto" and not short.exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ("x:\n  paht: a.json\n", "dataset 'x': unknown key 'paht'. Did you mean: path?"),
        ("x:\n  format: alpaca\n", "dataset 'x': field 'path' is required"),
        ("x:\n  path: a.json\n  format: alpacca\n", "dataset 'x': field 'format': unknown format 'alpacca'"),
        ("x:\n  path: a.json\n  tags: [zh]\n", "dataset 'x': field 'tags': must be a mapping"),
    ],
)
def test_bad_entries_name_file_dataset_and_field(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ZhtuneError) as err:
        read_registry(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_lookup_order_explicit_then_local_then_shipped(tmp_path, monkeypatch, registry):
    monkeypatch.chdir(tmp_path)
    assert load_registry()["quickstart_train"].registry == str(SHIPPED)
    Path("datasets.yaml").write_text(
        "quickstart_train: local.jsonl\nalpaca_zh: local_zh.jsonl\n", encoding="utf-8"
    )
    names = load_registry()
    assert names["quickstart_train"].path == str(tmp_path / "local.jsonl")  # ./datasets.yaml shadows shipped
    assert load_registry(str(registry))["alpaca_zh"].path == str(
        registry.parent / "zh.json"
    )  # explicit first
    with pytest.raises(ZhtuneError, match="dataset registry not found"):
        load_registry("nope.yaml")


def test_shipped_registry_names_existing_files():
    entries = read_registry(SHIPPED)
    assert {"quickstart_train", "quickstart_test"} <= set(entries)
    assert all(e.exists() for e in entries.values())


def test_names_and_paths_resolve_and_load(registry, tmp_path):
    plain = write_jsonl(
        tmp_path / "plain.jsonl",
        [{"id": "p1", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}],
    )
    sources = resolve_sources([str(plain), "alpaca_zh"], registry=str(registry))
    assert [(s.label, s.format) for s in sources] == [(str(plain), "auto"), ("alpaca_zh", "alpaca")]
    rejects = tmp_path / "rejects.jsonl"
    records, n_rejected = load_data([str(plain), "alpaca_zh"], registry=str(registry), rejects_path=rejects)
    assert records[0]["id"] == "p1"
    assert records[1]["messages"][0]["content"] == "给出保持健康的三个建议。"  # zh_* columns, mapped
    # the one bad fixture record lands in the single rejects file
    assert n_rejected == len(rejects.read_text().splitlines()) == 1

    with pytest.raises(ZhtuneError, match="no dataset of that name.*Did you mean: alpaca_zh"):
        resolve_sources(["alpaca_hz"], registry=str(registry))
    with pytest.raises(ZhtuneError, match="registered in .* which does not exist"):
        resolve_sources(["belle_fixture"], registry=str(registry))


def test_data_list(registry, capsys):
    assert main(["data", "list", "--registry", str(registry)]) == 0
    out = capsys.readouterr().out
    assert "| alpaca_zh | yes | alpaca | CN | MT | SI |" in out
    assert "| belle_fixture | NO | auto |" in out and "| quickstart_train | yes |" in out
    assert main(["data", "list", "--registry", str(registry), "--tag", "lang=cn", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["alpaca_zh"] and rows[0]["exists"] is True


def test_train_config_accepts_registered_names(tmp_path, registry, tiny_model_dir):
    from zhtune.train.config import TrainConfig
    from zhtune.train.sft import train

    cfg = build_config(
        TrainConfig,
        {
            "model": str(tiny_model_dir),
            "data": ["alpaca_zh", "quickstart_test"],
            "registry": str(registry),
            "output_dir": str(tmp_path / "run"),
            "template": "chatml",
            "method": "full",
            "max_steps": 1,
            "batch_size": 4,
            "cutoff_len": 64,
        },
    )
    run = train(cfg, progress=False)
    results = json.loads((run / "train_results.json").read_text())
    n_quickstart_test = len(json.loads(Path(read_registry(SHIPPED)["quickstart_test"].path).read_text()))
    # every record of both registered datasets was read: 3 fixture records (zh_* columns mapped) + the test split
    assert results["train_examples"] + results["rejected"] == 3 + n_quickstart_test
    first_reject = json.loads((run / "rejects.jsonl").read_text().splitlines()[0])
    assert (first_reject["field"], first_reject["reason"]) == ("messages[1].content", "empty assistant turn")

"""Config loading: YAML + key=value overrides, validated once with clear messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from zhtune.config import config_help, field_docs, load_config, parse_overrides
from zhtune.errors import ZhtuneError
from zhtune.train.config import TrainConfig

CONFIGS = sorted((Path(__file__).parents[1] / "src" / "zhtune" / "configs").glob("*.yaml"))


def write(tmp_path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_yaml_plus_overrides(tmp_path):
    path = write(tmp_path, "model: m\ndata: [a.jsonl]\noutput_dir: out\nlr: 2.0e-4\n")
    cfg = load_config(
        TrainConfig, path, ["lr=1e-5", "epochs=2", "data=[x.jsonl,y.jsonl]", "train_on_prompt=true"]
    )
    assert (
        cfg.lr == 1e-5
        and cfg.epochs == 2.0
        and cfg.data == ["x.jsonl", "y.jsonl"]
        and cfg.train_on_prompt is True
    )


def test_single_string_becomes_a_list(tmp_path):
    cfg = load_config(TrainConfig, None, ["model=m", "data=a.jsonl", "output_dir=o"])
    assert cfg.data == ["a.jsonl"]


def test_unknown_key_names_the_file_and_close_matches(tmp_path):
    path = write(tmp_path, "model: m\ndata: [a]\noutput_dir: o\nlearning_rte: 1\n")
    with pytest.raises(ZhtuneError, match=r"c\.yaml: unknown config key 'learning_rte'"):
        load_config(TrainConfig, path)
    with pytest.raises(
        ZhtuneError, match="command line: unknown config key 'cutof_len'. Did you mean: cutoff_len"
    ):
        load_config(TrainConfig, None, ["model=m", "data=a", "output_dir=o", "cutof_len=5"])


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(ZhtuneError, match="config key 'batch_size': expected int, got 'eight'"):
        load_config(TrainConfig, None, ["model=m", "data=a", "output_dir=o", "batch_size=eight"])


def test_bad_choice_suggests():
    with pytest.raises(
        ZhtuneError, match="config key 'precision': 'fp23' is not one of 'fp32' | 'bf16' | 'fp16'"
    ):
        load_config(TrainConfig, None, ["model=m", "data=a", "output_dir=o", "precision=fp23"])
    with pytest.raises(ZhtuneError, match="unknown method 'lor'.*Did you mean: lora"):
        load_config(TrainConfig, None, ["model=m", "data=a", "output_dir=o", "method=lor"])


def test_missing_required_keys():
    with pytest.raises(ZhtuneError, match="missing required config key\\(s\\): data, output_dir"):
        load_config(TrainConfig, None, ["model=m"])


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, "model: m\ndata: [a\noutput_dir: o\n")
    with pytest.raises(ZhtuneError, match=r"c\.yaml:\d+: invalid YAML"):
        load_config(TrainConfig, path)


def test_missing_file():
    with pytest.raises(ZhtuneError, match="config file not found: nope.yaml"):
        load_config(TrainConfig, "nope.yaml")


def test_malformed_override():
    with pytest.raises(ZhtuneError, match="not of the form key=value"):
        parse_overrides(["lr"])


def test_every_field_is_documented_and_help_shows_it():
    docs = field_docs(TrainConfig)
    from dataclasses import fields

    assert {f.name for f in fields(TrainConfig)} == set(docs)
    text = config_help(TrainConfig)
    assert "cutoff_len (int; default: 1024)" in text and "Maximum tokens per sample" in text
    assert "model (str; required)" in text


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_parse(path):
    cfg = load_config(TrainConfig, str(path))
    assert cfg.model and cfg.data and cfg.output_dir


def test_configs_are_shipped():
    assert len(CONFIGS) >= 2


@pytest.mark.parametrize("text", ["2e-4", "2.0e-4", "2E-4", "+2e-4", "0.0002"])
def test_numbers_parse_the_same_in_yaml_and_on_the_command_line(tmp_path, text):
    base = ["model=m", "data=a.jsonl", "output_dir=o"]
    from_yaml = load_config(
        TrainConfig, write(tmp_path, f"model: m\ndata: [a.jsonl]\noutput_dir: o\nlr: {text}\n")
    )
    from_cli = load_config(TrainConfig, None, [*base, f"lr={text}"])
    assert from_yaml.lr == from_cli.lr == pytest.approx(2e-4) and isinstance(from_yaml.lr, float)


def test_a_string_key_keeps_text_that_looks_like_a_number():
    cfg = load_config(TrainConfig, None, ["model=1e5", "data=a.jsonl", "output_dir=o"])
    assert cfg.model == "1e5"


def test_a_word_is_still_not_a_float():
    with pytest.raises(ZhtuneError, match="'lr': expected float, got 'fast'"):
        load_config(TrainConfig, None, ["model=m", "data=a.jsonl", "output_dir=o", "lr=fast"])

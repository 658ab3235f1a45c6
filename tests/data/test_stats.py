"""Dataset statistics: hand-computed numbers, tokens with a local tokenizer, table, plot, command."""

from __future__ import annotations

import json

import pytest

from zhtune.data.stats import compute_stats, format_stats, plot_stats, stats_command, stats_to_json
from zhtune.errors import ZhtuneError


@pytest.fixture
def word_tokenizer(tmp_path):
    """A whitespace word-level tokenizer saved to a local directory (no network)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate("a b c d".split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = tmp_path / "tok"
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(out))
    return str(out)


def pick(d: dict, *keys: str) -> tuple:
    return tuple(d[k] for k in keys or ("count", "mean", "min", "max"))


def test_hand_computed_chars(fixture_path):
    stats = compute_stats(fixture_path("stats.jsonl"))
    assert (stats["records"], stats["rejected"]) == (3, 0)
    assert stats["rounds"]["mean"] == pytest.approx(4 / 3) and stats["rounds"]["max"] == 2
    fields = {name: units["chars"] for name, units in stats["fields"].items()}
    assert pick(fields["system"]) == (1, 4.0, 4, 4)
    assert pick(fields["prompt"]) == (4, 2.5, 1, 4)  # 3, 2, 1, 4
    assert pick(fields["prompt"], "p25", "p50", "p75") == (1.75, 2.5, 3.25)
    assert fields["prompt"]["p90"] == pytest.approx(3.7)
    assert pick(fields["response"]) == (4, 4.75, 2, 7)  # 7, 6, 4, 2
    assert fields["response"]["std"] == pytest.approx((14.75 / 4) ** 0.5)
    assert pick(fields["conversation"]) == (3, 11.0, 6, 14)  # 4+3+7, 2+6+1+4, 4+2
    assert stats["langs"] == pytest.approx({"en": 200 / 3, "zh": 100 / 3})
    assert list(stats["lengths"]["chars"]["prompt"]) == [3, 2, 1, 4]


def test_empty_field_and_other_formats(fixture_path):
    stats = compute_stats(
        fixture_path("alpaca_chinese.json"), mapping={"zh_instruction": "instruction", "zh_output": "output"}
    )
    assert (stats["records"], stats["rejected"]) == (2, 1)
    assert stats["reject_reasons"] == {"empty assistant turn": 1}
    assert stats["formats"] == {fixture_path("alpaca_chinese.json"): "alpaca"}
    assert pick(stats["fields"]["system"]["chars"]) == (0, None, None, None)
    lenient = compute_stats(fixture_path("bad.jsonl"))
    assert (lenient["records"], lenient["rejected"]) == (3, 1)  # no assistant turn still counts


def test_tokens_with_local_tokenizer(tmp_path, word_tokenizer):
    path = tmp_path / "t.jsonl"
    path.write_text(
        json.dumps(
            {"messages": [{"role": "user", "content": "a b c"}, {"role": "assistant", "content": "d d"}]}
        )
        + "\n"
    )
    stats = compute_stats(str(path), tokenizer_dir=word_tokenizer)
    assert stats["fields"]["prompt"]["tokens"]["max"] == 3
    assert stats["fields"]["response"]["tokens"]["max"] == 2
    assert stats["fields"]["conversation"]["tokens"]["max"] == 5
    assert stats["fields"]["prompt"]["chars"]["max"] == 5
    with pytest.raises(ZhtuneError, match="tokenizer directory not found"):
        compute_stats(str(path), tokenizer_dir=str(tmp_path / "missing"))


def test_format_stats_table(fixture_path):
    table = format_stats(compute_stats(fixture_path("stats.jsonl")))
    lines = table.splitlines()
    assert "records: 3" in lines[1] and "languages: en 66.7%  zh 33.3%" in lines[2]
    header = next(line for line in lines if line.startswith("field"))
    assert header.split() == "field unit count mean std min p25 p50 p75 p90 max".split()
    prompt = next(line for line in lines if line.startswith("prompt")).split()
    assert prompt[:4] == ["prompt", "chars", "4", "2.5"] and prompt[-1] == "4"
    system = next(line for line in lines if line.startswith("system")).split()
    assert system[2:4] == ["1", "4"]


def test_plot_and_command(fixture_path, tmp_path, capsys):
    png = tmp_path / "plots" / "lengths.png"
    assert stats_command(fixture_path("stats.jsonl"), plot=str(png), as_json=True) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = json.loads(capsys.readouterr().out)
    assert printed["records"] == 3 and "lengths" not in printed
    plot_stats({"prompt": [1, 2, 3], "response": []}, str(tmp_path / "plain.png"))
    assert (tmp_path / "plain.png").stat().st_size > 0
    assert json.dumps(stats_to_json(compute_stats(fixture_path("stats.jsonl"))))

"""zhtune data cot: FLAN-style templates chosen by seed, the CoT* suffix, Alpaca-CoT records, --map,
rejects with file, line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zhtune.cli import main
from zhtune.data.cot import TEMPLATES, CotOptions, check_options, cot_messages, pick_template
from zhtune.data.schema import validate_record
from zhtune.errors import ZhtuneError

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "cot"
FLAN = str(FIXTURES / "flan_cot.jsonl")


def rows(path: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}


def test_flan_records_become_question_then_rationale_and_answer(tmp_path, capsys):
    out = tmp_path / "cot.jsonl"
    assert main(["data", "cot", FLAN, "-o", str(out), "--no-progress"]) == 1  # two records lack fields
    got = rows(out)
    assert sorted(got) == ["en-1", "en-2", "zh-1", "zh-2"]
    for rec in got.values():
        validate_record(rec)
        template = TEMPLATES[rec["meta"]["cot_template"]]
        assert template.lang == rec["meta"]["lang"]  # Chinese questions get Chinese templates
    zh = got["zh-1"]
    t = TEMPLATES[zh["meta"]["cot_template"]]
    assert zh["messages"][0]["content"] == t.prompt.format(
        question="小明有3个苹果，又买了2个，现在一共有几个苹果？"
    )
    assert zh["messages"][1]["content"] == t.response.format(
        rationale="原来有3个，又买了2个，3加2等于5。", answer="5个"
    )
    assert zh["meta"]["category"] == "math" and zh["meta"]["source"] == "flan_cot.jsonl"
    # rejects: file, line, field, reason
    rejects = [json.loads(x) for x in (tmp_path / "cot.rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["field"], r["reason"]) for r in rejects] == [
        (5, "rationale", "missing"),
        (6, "rationale", "empty"),
    ]
    err = capsys.readouterr().err
    assert "flan_cot.jsonl:5: field 'rationale': missing" in err and "--allow-rejects" in err


def test_template_choice_is_stable_per_record_and_changes_with_the_seed():
    picks = {s: [pick_template("auto", "en", s, f"r{i}").name for i in range(40)] for s in (0, 1)}
    assert picks[0] == [pick_template("auto", "en", 0, f"r{i}").name for i in range(40)]
    assert picks[0] != picks[1]
    flan_en = {t.name for t in TEMPLATES.values() if t.lang == "en" and t.name.startswith("en_")}
    assert set(picks[0]) == flan_en  # every FLAN-style English template is used, no plain/suffix one


def test_suffix_is_alpaca_cot_star(tmp_path):
    out = tmp_path / "cot.jsonl"
    assert main(["data", "cot", FLAN, "-o", str(out), "--suffix", "--allow-rejects", "--no-progress"]) == 0
    got = rows(out)
    assert (
        got["zh-1"]["messages"][0]["content"]
        == "小明有3个苹果，又买了2个，现在一共有几个苹果？\n先思考，再决定。"
    )
    assert got["zh-1"]["messages"][1]["content"] == "原来有3个，又买了2个，3加2等于5。\n所以答案是：5个"
    assert got["en-1"]["messages"][0]["content"] == "Is 91 a prime number?\nLet's think step by step."
    assert got["en-1"]["messages"][1]["content"].endswith("\nSo the answer is no.")
    assert got["en-2"]["messages"][1]["content"].endswith("So the answer is no.")  # no doubled full stop
    assert {r["meta"]["cot_template"] for r in got.values()} == {"suffix_zh", "suffix_en"}


def test_alpaca_cot_records_keep_their_output(tmp_path):
    out = tmp_path / "cot.jsonl"
    assert (
        main(["data", "cot", str(FIXTURES / "alpaca_cot.json"), "-o", str(out), "--template", "plain"]) == 0
    )
    got = list(rows(out).values())
    assert got[0]["messages"][0]["content"] == "鸡兔同笼，共有头10个，脚28只，兔有几只？"
    assert got[0]["messages"][1]["content"].endswith("所以答案是4只。")
    assert got[1]["messages"][0]["content"] == "Which is heavier?\n1 kg of iron or 1 kg of feathers"
    main(["data", "cot", str(FIXTURES / "alpaca_cot.json"), "-o", str(out), "--suffix", "--lang", "zh"])
    got = list(rows(out).values())
    assert (
        got[1]["messages"][0]["content"]
        == "Which is heavier?\n1 kg of iron or 1 kg of feathers\n先思考，再决定。"
    )
    assert (
        got[1]["messages"][1]["content"]
        == "Both weigh 1 kg, so neither is heavier. So the answer is neither."
    )


def test_map_renames_columns(tmp_path):
    out = tmp_path / "cot.jsonl"
    args = [
        "--map",
        "query=question",
        "--map",
        "chain_of_thought=rationale,target=answer",
        "--template",
        "en_qa",
    ]
    assert main(["data", "cot", str(FIXTURES / "renamed.jsonl"), "-o", str(out), *args]) == 0
    (rec,) = rows(out).values()
    assert rec["messages"] == [
        {"role": "user", "content": "Question: Is the sky green?\nGive the reasoning, then the answer."},
        {"role": "assistant", "content": "Reasoning: The sky usually looks blue in daylight.\nAnswer: no"},
    ]
    assert rec["id"] == "renamed-1"


def test_unknown_layout_is_rejected_with_a_hint():
    from zhtune.data.schema import RecordError

    with pytest.raises(RecordError, match="--map"):
        cot_messages({"prompt": "x", "completion": "y"}, "auto", "auto", 0, "r")


def test_bad_options_are_refused():
    with pytest.raises(ZhtuneError, match="Did you mean: en_step"):
        check_options(CotOptions(template="en_stepp"))
    with pytest.raises(ZhtuneError, match="contradict"):
        check_options(CotOptions(template="zh_qa", suffix=True))
    assert check_options(CotOptions(suffix=True)) == "suffix"

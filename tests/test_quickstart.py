"""The quickstart is honest: a smaller run still shows real learning on held-out values."""

from __future__ import annotations

import json

from zhtune.data.skills import bundled_dir, make_skill_data, to_chinese, write_skill_data
from zhtune.quickstart import QuickstartOptions, run_quickstart


def test_chinese_numerals():
    cases = {
        0: "零",
        7: "七",
        10: "十",
        15: "十五",
        20: "二十",
        105: "一百零五",
        110: "一百一十",
        999: "九百九十九",
    }
    cases |= {1005: "一千零五", 1050: "一千零五十", 1500: "一千五百", 9999: "九千九百九十九"}
    assert {n: to_chinese(n) for n in cases} == cases


def test_split_is_by_value():
    train, test = make_skill_data()
    for cat in ("num2zh", "zh2num", "reverse"):
        held_out = {r["output"] for r in test if r["category"] == cat}
        seen = {r["output"] for r in train if r["category"] == cat}
        assert held_out and not held_out & seen, cat


def test_shipped_data_matches_the_generator(tmp_path):
    write_skill_data(tmp_path)
    for name in ("train.json", "test.json"):
        assert (tmp_path / name).read_bytes() == (bundled_dir() / name).read_bytes(), name


def test_small_quickstart_learns_held_out_skills(tmp_path, capsys):
    result = run_quickstart(
        QuickstartOptions(
            output_dir=str(tmp_path / "qs"), steps=700, eval_per_skill=30, seed=1, progress=False
        )
    )
    before, after = result["before"], result["after"]
    assert before["overall"] <= 0.05
    assert after["overall"] >= before["overall"] + 0.5
    assert max(after["scores"].values()) >= 0.8
    out = capsys.readouterr().out
    assert "| skill | n | before | after |" in out and "zhtune chat" in out
    report = (tmp_path / "qs" / "report.md").read_text(encoding="utf-8")
    assert "| **all** |" in report
    saved = json.loads((tmp_path / "qs" / "eval.json").read_text(encoding="utf-8"))
    assert saved["after"]["overall"] == after["overall"]
    assert (tmp_path / "qs" / "run" / "loss.png").exists() and (tmp_path / "qs" / "train.yaml").exists()

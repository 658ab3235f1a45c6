"""zhtune data mix: shares by weight, the same seed gives the same file, growing one source leaves the
others' picks alone, too-small sources fail clearly or repeat with --allow-repeat, meta.mix_source."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from zhtune.cli import main
from zhtune.data.inputs import InputOptions
from zhtune.data.mix import largest_total, parse_source, pick_counts, split_total
from zhtune.errors import ZhtuneError

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "mix"
EN = str(FIXTURES / "alpaca_en.json")  # 12 records
ZH = str(FIXTURES / "belle_zh.jsonl")  # 30 records


def run(*args: str) -> int:
    return main(["data", "mix", *args, "--no-progress"])


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_weights_are_shares_of_the_output(tmp_path, capsys):
    out = tmp_path / "mix.jsonl"
    assert run(f"{EN}:0.25", f"{ZH}:0.75", "-o", str(out)) == 0
    got = records(out)
    # the largest total with no repeats: 12 / 0.25 = 48 > 30 / 0.75 = 40 -> 40 = 10 + 30
    assert Counter(r["meta"]["mix_source"] for r in got) == {EN: 10, ZH: 30}
    assert len({r["id"] for r in got}) == 40
    assert all(r["messages"][-1]["role"] == "assistant" for r in got)
    err = capsys.readouterr().err
    assert "wrote 40 records" in err and "25.0%" in err and "75.0%" in err


def test_same_seed_same_file_other_seed_other_picks(tmp_path):
    outs = [tmp_path / f"{i}.jsonl" for i in range(3)]
    for out, seed in zip(outs, (7, 7, 8)):
        assert run(f"{EN}:1", f"{ZH}:1", "--total", "10", "--seed", str(seed), "-o", str(out)) == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()
    assert {r["id"] for r in records(outs[0])} != {r["id"] for r in records(outs[2])}


def test_growing_one_source_keeps_the_others_picks(tmp_path):
    zh = tmp_path / "zh.jsonl"
    shutil.copy(ZH, zh)
    before, after = tmp_path / "before.jsonl", tmp_path / "after.jsonl"
    assert run(f"{EN}:0.5", f"{zh}:0.5", "--total", "16", "-o", str(before)) == 0
    with zh.open("a", encoding="utf-8") as f:
        for i in range(30, 60):
            f.write(
                json.dumps({"id": f"zh-{i}", "input": f"写出数字{i}。", "target": str(i)}, ensure_ascii=False)
                + "\n"
            )
    assert run(f"{EN}:0.5", f"{zh}:0.5", "--total", "16", "-o", str(after)) == 0

    def picked(path: Path, source: str) -> set[str]:
        return {r["id"] for r in records(path) if r["meta"]["mix_source"] == source}

    assert picked(before, EN) == picked(after, EN)  # untouched source: identical picks
    # the grown source keeps the old records still ranked in its best 8; new ones may enter
    old_kept = picked(after, str(zh)) & picked(before, str(zh))
    assert picked(after, str(zh)) - old_kept <= {f"zh-{i}" for i in range(30, 60)}
    assert len(picked(after, str(zh))) == 8


def test_too_small_source_fails_or_repeats(tmp_path):
    out = tmp_path / "mix.jsonl"
    with pytest.raises(
        ZhtuneError, match=r"has 12 records but its share \(50.0%\) of --total 40 is 20.*--allow-repeat"
    ):
        from zhtune.data.mix import MixOptions, mix

        mix([f"{EN}:1", f"{ZH}:1"], str(out), MixOptions(total=40, reading=InputOptions(progress=False)))
    assert (
        main(["data", "mix", f"{EN}:1", f"{ZH}:1", "--total", "40", "-o", str(out)]) == 1
    )  # CLI: message, exit 1
    assert not out.exists()
    assert run(f"{EN}:1", f"{ZH}:1", "--total", "40", "--allow-repeat", "-o", str(out)) == 0
    got = records(out)
    en = [r["id"] for r in got if r["meta"]["mix_source"] == EN]
    assert len(en) == 20 and len(set(en)) == 20  # copies get their own ids
    assert sum(i.endswith("-r2") for i in en) == 8  # every record once, the 8 best-ranked twice
    assert {i.removesuffix("-r2") for i in en} == {f"en-{i}" for i in range(12)}


def test_registered_names_and_rejects(tmp_path, monkeypatch, capsys):
    (tmp_path / "datasets.yaml").write_text(
        f"zh_numbers:\n  path: {ZH}\n  format: belle\n  tags: {{lang: zh}}\n", encoding="utf-8"
    )
    monkeypatch.chdir(tmp_path)
    bad = str(FIXTURES / "with_bad.jsonl")  # 5 good records, 1 without an answer
    assert run("zh_numbers:2", f"{bad}:1", "-o", "mix.jsonl") == 1
    got = records(tmp_path / "mix.jsonl")
    assert Counter(r["meta"]["mix_source"] for r in got) == {"zh_numbers": 10, bad: 5}
    (reject,) = records(tmp_path / "mix.rejects.jsonl")
    assert reject["line"] == 6 and reject["record"]["id"] == "b-broken"
    assert "exit status 1" in capsys.readouterr().err
    assert run("zh_numbers:2", f"{bad}:1", "-o", "mix.jsonl", "--allow-rejects") == 0


def test_quota_arithmetic():
    assert split_total(10, [0.7, 0.3]) == [7, 3]
    assert split_total(10, [1, 1, 1]) == [4, 3, 3]  # largest remainders, ties to the first
    assert sum(split_total(997, [0.2, 0.5, 0.3])) == 997
    assert largest_total([12, 30], [0.25, 0.75]) == 40
    assert largest_total([5, 100], [1, 1]) == 10
    assert pick_counts([5, 1, 9], 2).tolist() == [1, 1, 0]  # the two lowest ranks
    assert pick_counts([5, 1, 9], 7).tolist() == [2, 3, 2]  # twice each, then the best once more


def test_source_specs():
    assert (parse_source("a.jsonl:0.7").name, parse_source("a.jsonl:0.7").weight) == ("a.jsonl", 0.7)
    assert parse_source("a.jsonl").weight == 1.0
    assert parse_source("data:v2.jsonl").name == "data:v2.jsonl"  # not a number: part of the path
    with pytest.raises(ZhtuneError, match="weight must be a number > 0"):
        parse_source("a.jsonl:0")
    with pytest.raises(ZhtuneError, match="given twice"):
        from zhtune.data.mix import MixOptions, mix

        mix([EN, f"{EN}:2"], "x.jsonl", MixOptions())

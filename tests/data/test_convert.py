"""Conversion: records, ids, meta, rejects with line numbers, exit codes, atomic output, streaming."""

from __future__ import annotations

import json
import os
import time
import tracemalloc
from pathlib import Path

import pytest

from zhtune.data import convert
from zhtune.data.convert import convert_files, iter_conversations, load_conversations, parse_mapping
from zhtune.errors import ZhtuneError

ZH_MAP = {"zh_instruction": "instruction", "zh_input": "input", "zh_output": "output"}


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def records(path: str, **kw) -> list[dict]:
    return [o.record for o in iter_conversations(path, **kw)]


def test_alpaca_array_records_ids_and_meta(fixture_path):
    out = list(iter_conversations(fixture_path("alpaca_array.json")))
    assert [(o.line, o.index, o.fmt) for o in out] == [(2, 1, "alpaca"), (8, 2, "alpaca"), (15, 3, "alpaca")]
    first, second, third = (o.record for o in out)
    assert first == {
        "id": "alpaca_array-1",
        "messages": [
            {"role": "user", "content": "Translate to English.\n你好"},
            {"role": "assistant", "content": "Hello"},
        ],
        "meta": {"source": "alpaca_array.json", "lang": "en", "category": "translation"},
    }
    assert [m["role"] for m in second["messages"]] == ["system"] + ["user", "assistant"] * 3
    assert second["meta"]["lang"] == "zh"
    assert out[1].ignored == ("extra",)
    assert third["id"] == "a3"


def test_each_fixture_format(fixture_path):
    belle = records(fixture_path("belle.json"))
    assert belle[1]["messages"][-1] == {"role": "assistant", "content": "好的，从前有座山。"}
    assert len(belle[1]["messages"]) == 4 and belle[1]["meta"]["category"] == "chat"

    sharegpt = list(iter_conversations(fixture_path("sharegpt.json")))
    assert sharegpt[0].record["messages"][0] == {"role": "system", "content": "Be brief."}
    assert sharegpt[1].record["messages"] == [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Q?"},
        {"role": "assistant", "content": "A."},
    ]
    assert (sharegpt[2].line, sharegpt[2].field) == (13, "conversations[0].from")

    (oa,) = records(fixture_path("openai.jsonl"))
    assert oa["messages"][1] == {"role": "user", "content": "part one\npart two"}
    assert oa["meta"] == {"source": "orig.jsonl", "lang": "en", "score": 3}  # a raw meta is kept

    csv_records = records(fixture_path("index.csv"))
    assert [r["id"] for r in csv_records] == ["index-1", "index-2", "index-3"]
    assert csv_records[0]["messages"][0]["content"] == "Add the numbers.\n1, 2"

    seed = records(fixture_path("seed.jsonl"))
    assert [r["id"] for r in seed] == ["seed_task_1-0", "seed_task_1-1"]
    assert seed[1]["messages"] == [
        {"role": "user", "content": "Give the antonym.\nup"},
        {"role": "assistant", "content": "down"},
    ]
    assert seed[0]["meta"]["task"] == "antonyms"


def test_text_format_records(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "一段预训练文本。"}\n')
    assert records(str(path)) == [
        {
            "id": "corpus-1",
            "messages": [{"role": "assistant", "content": "一段预训练文本。"}],
            "meta": {"source": "corpus.jsonl", "lang": "zh", "kind": "text"},
        }
    ]


def test_canonical_output_converts_to_itself(fixture_path, tmp_path):
    """Converting zhtune's own output again changes nothing (text records included)."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "预训练文本"}\n')
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    assert convert_files([fixture_path("alpaca_array.json"), str(corpus)], str(first), progress=False) == 0
    assert convert_files([str(first)], str(second), progress=False) == 0
    assert read_jsonl(second) == read_jsonl(first)


def test_rejects_with_line_numbers(fixture_path):
    out = list(iter_conversations(fixture_path("bad.jsonl")))
    assert [(o.line, o.ok) for o in out] == [(1, True), (2, False), (3, True), (5, False)]
    assert out[1].reason.startswith("invalid JSON") and out[1].raw is None
    assert out[3].field == "messages" and "no assistant turn" in out[3].reason
    assert out[3].raw == {"messages": [{"role": "user", "content": "no answer"}]}
    lenient = list(iter_conversations(fixture_path("bad.jsonl"), chat=False))
    assert lenient[3].ok


def test_convert_files_exit_codes_and_rejects_file(fixture_path, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    code = convert_files([fixture_path("bad.jsonl")], str(out), progress=False)
    assert code == 1
    assert [r["messages"][0]["content"] for r in read_jsonl(out)] == ["Hi", "Again"]
    rejects = read_jsonl(tmp_path / "out.rejects.jsonl")
    assert [(r["line"], r["field"]) for r in rejects] == [(2, None), (5, "messages")]
    assert rejects[1] == {
        "file": fixture_path("bad.jsonl"),
        "line": 5,
        "index": 4,
        "field": "messages",
        "reason": "no assistant turn (nothing to learn from)",
        "record": {"messages": [{"role": "user", "content": "no answer"}]},
    }
    err = capsys.readouterr().err
    assert "bad.jsonl:2: invalid JSON: Expecting value (column 53)" in err
    assert "bad.jsonl:5 (record 4): field 'messages': no assistant turn" in err
    assert "rejected 2 record(s)" in err

    assert convert_files([fixture_path("bad.jsonl")], str(out), allow_rejects=True, progress=False) == 0
    assert len(read_jsonl(out)) == 2


def test_convert_with_mapping_summary(fixture_path, tmp_path, capsys):
    out = tmp_path / "zh.jsonl"
    rejects = tmp_path / "zh-rejects.jsonl"
    code = convert_files(
        [fixture_path("alpaca_chinese.json")], str(out), mapping=ZH_MAP, rejects=str(rejects), progress=False
    )
    assert code == 1
    written = read_jsonl(out)
    assert written[0] == {
        "id": "alpaca_chinese-1",
        "messages": [
            {"role": "user", "content": "给出保持健康的三个建议。"},
            {"role": "assistant", "content": "1.均衡饮食。\n2.定期锻炼。\n3.充足睡眠。"},
        ],
        "meta": {"source": "alpaca_chinese.json", "lang": "zh", "translated": True, "score": 5},
    }
    assert written[1]["id"] == "alpaca_chinese-3"
    (reject,) = read_jsonl(rejects)
    assert (reject["line"], reject["index"], reject["field"]) == (1, 2, "messages[1].content")
    assert reject["record"]["zh_output"] == ""  # the record as read, before mapping
    err = capsys.readouterr().err
    assert "alpaca_chinese.json:1 (record 2): field 'messages[1].content': empty assistant turn" in err
    assert "en_instruction (3), en_input (3), en_output (3)" in err
    assert "alpaca            3         2         1" in err


def test_summary_of_many_files(fixture_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(convert, "SHOWN_FILES", 1)
    inputs = [fixture_path("seed.jsonl"), fixture_path("sharegpt.json"), fixture_path("index.csv")]
    assert convert_files(inputs, str(tmp_path / "o.jsonl"), allow_rejects=True, progress=False) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[2].split() == [fixture_path("seed.jsonl"), "seed", "1", "2", "0"]
    assert err[3].strip() == "... and 2 more files"
    assert err[4].split() == ["total", "(3", "files)", "mixed", "7", "7", "1"]


def test_detection_failure_names_fields_and_options(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text('{"question": "q", "std_answer": "a", "class": "math"}\n')
    with pytest.raises(ZhtuneError) as e:
        list(iter_conversations(str(path)))
    msg = str(e.value)
    assert "eval.jsonl" in msg and "question, std_answer, class" in msg
    assert "alpaca" in msg and "sharegpt" in msg and "--map" in msg and "--format" in msg
    mapped = records(str(path), mapping={"question": "instruction", "std_answer": "output"})
    assert mapped[0]["meta"]["class"] == "math"


def test_named_format(fixture_path):
    with pytest.raises(ZhtuneError, match="did you mean 'alpaca'"):
        list(iter_conversations(fixture_path("alpaca_array.json"), fmt="alpacca"))
    out = list(iter_conversations(fixture_path("belle.json"), fmt="alpaca"))
    assert not out[0].ok and out[0].field == "instruction" and out[0].reason == "missing"


def test_load_conversations(fixture_path, tmp_path):
    rejects = tmp_path / "r.jsonl"
    recs, n_rejected = load_conversations(
        [fixture_path("bad.jsonl"), fixture_path("sharegpt.json")], rejects_path=str(rejects)
    )
    assert (len(recs), n_rejected) == (4, 3)
    assert [r["line"] for r in read_jsonl(rejects)] == [2, 5, 13]
    recs, n_rejected = load_conversations(
        fixture_path("openai.jsonl"), rejects_path=str(tmp_path / "none.jsonl")
    )
    assert (len(recs), n_rejected) == (1, 0) and not (tmp_path / "none.jsonl").exists()


def test_output_is_atomic_and_stale_rejects_removed(fixture_path, tmp_path):
    out = tmp_path / "out.jsonl"
    broken = tmp_path / "broken.json"
    broken.write_text('[{"text": "a"},\n{"text": }]')
    with pytest.raises(ZhtuneError, match="broken.json:2"):
        convert_files([fixture_path("bad.jsonl"), str(broken)], str(out), progress=False)
    assert os.listdir(tmp_path) == ["broken.json"]  # neither output nor rejects, no temporary files

    (tmp_path / "out.rejects.jsonl").write_text("old\n")
    assert convert_files([fixture_path("openai.jsonl")], str(out), progress=False) == 0
    assert not (tmp_path / "out.rejects.jsonl").exists()
    with pytest.raises(ZhtuneError, match="also an input"):
        convert_files([str(out)], str(out), progress=False)


def test_parse_mapping():
    assert parse_mapping(["zh_instruction=instruction", "zh_input = input,zh_output=output"]) == ZH_MAP
    with pytest.raises(ZhtuneError, match="expected SOURCE=TARGET"):
        parse_mapping(["zh_instruction"])
    with pytest.raises(ZhtuneError, match="mapped twice"):
        parse_mapping(["a=b", "a=c"])


def test_large_json_array_streams(tmp_path):
    """A ~20 MB JSON array converts with a peak Python allocation far below the file size."""
    path = tmp_path / "big.json"
    answer = "这是一个很长的回答。" * 200
    with open(path, "w", encoding="utf-8") as f:
        f.write("[\n")
        n = 0
        while f.tell() < 20_000_000:
            f.write(
                ("" if n == 0 else ",\n")
                + json.dumps({"instruction": f"问题 {n}", "output": answer}, ensure_ascii=False)
            )
            n += 1
        f.write("\n]\n")
    size = path.stat().st_size
    start = time.perf_counter()
    tracemalloc.start()
    try:
        code = convert_files([str(path)], str(tmp_path / "out.jsonl"), progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert code == 0
    assert peak < size / 8, f"peak {peak:,} bytes for a {size:,}-byte file"
    with open(tmp_path / "out.jsonl", encoding="utf-8") as f:
        last = None
        for count, line in enumerate(f, 1):  # noqa: B007
            last = line
    assert count == n and json.loads(last)["id"] == f"big-{n}"
    assert time.perf_counter() - start < 60


def test_strict_rejects_unknown_fields_naming_file_line_and_field(tmp_path, capsys):
    from zhtune.cli import main

    data = tmp_path / "a.jsonl"
    rows = [{"instruction": "一", "output": "二"}, {"instruction": "三", "output": "四", "colour": "red"}]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert main(["data", "convert", str(data), "-o", str(out), "--no-progress"]) == 0
    assert "colour (1)" in capsys.readouterr().err  # lenient: ignored, but reported
    assert main(["data", "convert", str(data), "-o", str(out), "--strict", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"{data}:2: field 'colour': unknown field for format 'alpaca'" in err
    assert len(out.read_text(encoding="utf-8").splitlines()) == 1

"""Raw readers: every format streams records with the right line numbers."""

from __future__ import annotations

import json

import pytest

from zhtune.data import readers
from zhtune.data.readers import RawError, expand_inputs, iter_raw
from zhtune.errors import ZhtuneError


def lines_of(path: str) -> list[int]:
    return [line for line, _ in iter_raw(path)]


def test_jsonl_skips_blank_lines_and_reports_malformed(fixture_path):
    items = list(iter_raw(fixture_path("bad.jsonl")))
    assert [line for line, _ in items] == [1, 2, 3, 5]
    assert isinstance(items[1][1], RawError)
    assert items[1][1].reason.startswith("invalid JSON:")
    assert items[2][1]["messages"][0]["content"] == "Again"


def test_json_array_line_numbers(fixture_path):
    items = list(iter_raw(fixture_path("alpaca_array.json")))
    assert [line for line, _ in items] == [2, 8, 15]
    assert items[1][1]["history"] == [["你好", "你好！"], ["今天天气如何？", "晴天。"]]
    assert items[2][1]["id"] == "a3"


def test_json_that_is_json_lines(fixture_path):
    items = list(iter_raw(fixture_path("belle.json")))
    assert [line for line, _ in items] == [1, 2]
    assert items[1][1]["category"] == "chat"


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_json_array_tiny_chunks_give_same_result(tmp_path, monkeypatch, chunk):
    """Values cut at every possible buffer boundary (strings, numbers, escapes) decode the same."""
    data = [{"n": 12345, "f": -0.5e-3, "s": 'a"b中\n\\', "t": True, "z": None, "l": [1, [2]]}, {"n": 7}]
    text = "[\n" + ",\n\n".join(json.dumps(d) for d in data) + "\n]\n"
    path = tmp_path / "a.json"
    path.write_text(text)
    monkeypatch.setattr(readers, "CHUNK_CHARS", chunk)
    assert list(iter_raw(str(path))) == [(2, data[0]), (4, data[1])]


def test_json_array_non_object_element_is_a_raw_error(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[{"a": 1}, 5, {"b": 2}]')
    items = list(iter_raw(str(path)))
    assert items[0] == (1, {"a": 1}) and items[2] == (1, {"b": 2})
    assert items[1][1] == RawError("expected a JSON object, got int")


@pytest.mark.parametrize("chunk", [3, 1 << 18])
def test_json_array_syntax_error_names_file_and_line(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(readers, "CHUNK_CHARS", chunk)
    path = tmp_path / "broken.json"
    path.write_text('[\n{"a": 1},\n{"a": 2,,}\n]')
    with pytest.raises(ZhtuneError, match=r"broken\.json:3: invalid JSON: Expecting property name"):
        list(iter_raw(str(path)))


def test_truncated_json_array_keeps_its_complete_records(tmp_path):
    """A file cut off at its end (no closing bracket, or inside the last element) keeps every
    complete record and rejects the tail, naming the line; a syntax error elsewhere still stops."""
    path = tmp_path / "cut.json"
    path.write_text('[{"a": 1},\n{"a": 2}')
    items = list(iter_raw(str(path)))
    assert [r for _, r in items[:2]] == [{"a": 1}, {"a": 2}]
    assert isinstance(items[2][1], RawError) and "no closing ']'" in items[2][1].reason
    path.write_text('[{"a": 1},\n{"a": 2},\n{"a": "thr')
    items = list(iter_raw(str(path)))
    assert [r for _, r in items[:2]] == [{"a": 1}, {"a": 2}]
    assert items[2][0] == 3 and "ends inside this element" in items[2][1].reason
    path.write_text('[{"a": 1}\n{"a": 2}]')
    with pytest.raises(ZhtuneError, match=r"cut\.json:2: .*expected ',' or '\]'"):
        list(iter_raw(str(path)))


def test_json_single_pretty_object(tmp_path):
    path = tmp_path / "one.json"
    path.write_text('{\n  "text": "hello"\n}\n')
    assert list(iter_raw(str(path))) == [(1, {"text": "hello"})]


def test_csv_drops_index_column_and_reports_row_start_lines(fixture_path):
    items = list(iter_raw(fixture_path("index.csv")))
    assert [line for line, _ in items] == [2, 3, 5]
    assert items[0][1] == {"instruction": "Add the numbers.", "input": "1, 2", "output": "3"}
    assert items[1][1]["instruction"] == "Write a line\nwith a newline"


def test_tsv_and_short_row(tmp_path):
    path = tmp_path / "a.tsv"
    path.write_text("instruction\toutput\nq1\ta1\nonly-one\n")
    items = list(iter_raw(str(path)))
    assert items[0] == (2, {"instruction": "q1", "output": "a1"})
    assert items[1] == (3, RawError("row has 1 fields, the header has 2"))


def test_parquet_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(2500)]
    path = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=1000)
    items = list(iter_raw(str(path)))
    assert len(items) == 2500
    assert items[0] == (1, rows[0]) and items[-1] == (2500, rows[-1])


def test_datasets_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"input": "问题", "target": "回答"}, {"input": "q", "target": "a"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    assert expand_inputs([str(tmp_path)]) == [str(tmp_path / "ds")]
    assert list(iter_raw(str(tmp_path / "ds"))) == [(1, rows[0]), (2, rows[1])]


def test_missing_and_unsupported(tmp_path):
    with pytest.raises(ZhtuneError, match="file not found: .*nope.json"):
        iter_raw(str(tmp_path / "nope.json"))
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(
        ZhtuneError, match=r"unsupported file type '\.txt'.*\.jsonl, \.json, \.csv, \.tsv, \.parquet"
    ):
        iter_raw(str(tmp_path / "a.txt"))
    with pytest.raises(ZhtuneError, match="not a saved datasets directory"):
        iter_raw(str(tmp_path))


def test_expand_inputs(tmp_path):
    for name in ("b.jsonl", "a.json", "notes.txt", "sub/c.csv"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("")
    d = str(tmp_path)
    assert expand_inputs([d]) == [f"{d}/a.json", f"{d}/b.jsonl", f"{d}/sub/c.csv"]
    assert expand_inputs([f"{d}/*.json*", f"{d}/a.json"]) == [f"{d}/a.json", f"{d}/b.jsonl"]
    assert expand_inputs([f"{d}/**/*.csv"]) == [f"{d}/sub/c.csv"]
    with pytest.raises(ZhtuneError, match=r"no files match .*\*\.parquet"):
        expand_inputs([f"{d}/*.parquet"])
    with pytest.raises(ZhtuneError, match="file not found"):
        expand_inputs([f"{d}/missing.jsonl"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ZhtuneError, match="no data files"):
        expand_inputs([f"{d}/empty"])


def test_invalid_utf8_line_is_rejected_alone(tmp_path):
    """A JSON Lines line that is not UTF-8 becomes a RawError naming its byte; the lines around
    it (and a byte-order mark on the first) are read as usual."""
    from zhtune.data.readers import RawError, iter_raw, iter_raw_lazy

    good = [json.dumps({"instruction": f"问题{i}", "output": f"答{i}"}, ensure_ascii=False).encode() for i in range(3)]
    bad = b'{"instruction": "\xff\xfe", "output": "x"}'
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join([good[0], bad, good[1], good[2]]) + b"\n")
    items = list(iter_raw(str(path)))
    assert [line for line, _ in items] == [1, 2, 3, 4]
    assert items[0][1]["instruction"] == "问题0" and items[3][1]["output"] == "答2"
    error = items[1][1]
    assert isinstance(error, RawError)
    assert f"at byte {3 + len(good[0]) + 1 + 17} of the file (column 18 of the line)" in error.reason
    lazy = list(iter_raw_lazy(str(path)))  # what `zhtune data clean` reads
    assert isinstance(lazy[1][1], RawError) and isinstance(lazy[0][1], str)


def test_invalid_utf8_in_other_formats_names_the_file(tmp_path):
    from zhtune.data.readers import iter_raw

    path = tmp_path / "gbk.csv"
    path.write_bytes(b"instruction,output\n" + "问,答\n".encode("gbk"))
    with pytest.raises(ZhtuneError, match=r"gbk\.csv: not valid UTF-8 .*iconv"):
        list(iter_raw(str(path)))

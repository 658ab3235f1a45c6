"""``zhtune eval compare`` and the shared report helpers: a table per metric (rows = runs), PNG
charts, runs without a report listed, duplicate run names told apart, ``report.md`` gathered."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from zhtune.cli import main
from zhtune.errors import ZhtuneError
from zhtune.eval.compare import compare
from zhtune.eval.report import markdown_table, read_run_reports, run_labels, write_run_report

PNG = b"\x89PNG\r\n\x1a\n"


def write_report(run: Path, name: str, report: dict, md: str | None = None) -> None:
    folder = run / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(report, ensure_ascii=False), encoding="utf-8")
    if md is not None:
        (folder / f"{name}.md").write_text(md, encoding="utf-8")


def judge_report(scores: dict[str, float | None], score: float | None, without: float | None) -> dict:
    return {
        "metric": "judge",
        "overall": score,
        "scores": scores,
        "counts": dict.fromkeys(scores, 5),
        "score": score,
        "score_w/o_others": without,
    }


def table(md: str, heading: str) -> list[list[str]]:
    """The rows (header included) of the table under ``## heading``."""
    part = md.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in part.splitlines() if ln.startswith("|") and "---" not in ln]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    a, b, c = tmp_path / "x" / "run", tmp_path / "y" / "run", tmp_path / "bare"
    write_report(a, "judge", judge_report({"math": 0.5, "open qa": 0.75}, 0.625, 0.75))
    write_report(b, "judge", judge_report({"open qa": 0.25, "code": None}, 0.25, 0.25))
    exam = {"metric": "exam", "overall": 0.4, "scores": {"s1": 0.4}, "counts": {"s1": 10}}
    write_report(a, "exam", exam | {"categories": {"STEM": 0.3, "Other": 0.5}})
    write_report(a, "exam_settings", {"shots": 5})  # not a report: ignored
    # zhtune experiment's cache has no "metric" key: the file name names it
    write_report(
        b, "exact_match", {"settings": {}, "overall": 0.5, "scores": {"all": 0.5}, "counts": {"all": 4}}
    )
    c.mkdir()
    return [a, b, c]


def test_tables_charts_and_missing_runs(runs, tmp_path):
    out = tmp_path / "cmp"
    text = compare([str(r) for r in runs], output=str(out))
    assert text == (out / "compare.md").read_text(encoding="utf-8")
    assert [h.split("\n")[0] for h in text.split("## ")[1:]] == ["judge", "exam", "exact_match"]
    assert table(text, "judge") == [
        ["run", "math", "open qa", "code", "score", "score_w/o_others"],
        ["x/run", "0.500", "0.750", "–", "0.625", "0.750"],
        ["y/run", "–", "0.250", "–", "0.250", "0.250"],
    ]
    assert "No judge report: bare." in text
    assert table(text, "exam") == [["run", "STEM", "Other", "overall"], ["x/run", "30.0%", "50.0%", "40.0%"]]
    assert "No exam report: y/run, bare." in text
    assert table(text, "exact_match") == [["run", "all", "overall"], ["y/run", "50.0%", "50.0%"]]
    for name in ("judge", "exam", "exact_match"):
        png = (out / f"compare_{name}.png").read_bytes()
        assert png.startswith(PNG) and len(png) > 5000 and f"![{name}](compare_{name}.png)" in text
    data = json.loads((out / "compare.json").read_text(encoding="utf-8"))
    assert data["judge"]["runs"]["x/run"]["score_w/o_others"] == 0.75 and data["judge"]["missing"] == ["bare"]


def test_one_metric_from_the_cli(runs, tmp_path):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        code = main(["eval", "compare", *map(str, runs), "--metric", "judge", "-o", str(tmp_path / "c")])
    assert code == 0 and "## exam" not in buf.getvalue()
    assert table(buf.getvalue(), "judge")[1] == ["x/run", "0.500", "0.750", "–", "0.625", "0.750"]
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "compare.json",
        "compare.md",
        "compare_judge.png",
    ]


def test_no_reports_anywhere_is_a_clear_error(tmp_path):
    with pytest.raises(ZhtuneError, match=r"no eval reports in any run: .*missing \(.*no such directory\)"):
        compare([str(tmp_path / "missing")], output=str(tmp_path / "c"))


def test_run_labels_tell_duplicates_apart():
    assert run_labels(["runs/a", "runs/b"]) == ["a", "b"]
    assert run_labels(["e1/runs/lora", "e2/runs/lora", "full"]) == ["e1/runs/lora", "e2/runs/lora", "full"]
    assert run_labels(["p/x/run", "q/y/run"]) == ["x/run", "y/run"]


def test_reports_are_read_in_order_and_report_md_gathers_sections(runs):
    assert list(read_run_reports(runs[0])) == ["judge", "exam"]
    assert list(read_run_reports(runs[0] / "eval")) == ["judge", "exam"]  # an eval folder works too
    folder = runs[0] / "eval"
    (folder / "judge.md").write_text("# Judge\n\nscores\n", encoding="utf-8")
    (folder / "exam.md").write_text("# Exam\n", encoding="utf-8")
    (folder / "stray.md").write_text("# no json beside me\n", encoding="utf-8")
    path = write_run_report(folder)
    assert path.read_text(encoding="utf-8") == "# Judge\n\nscores\n\n# Exam\n"


def test_markdown_table_alignment_and_pipes():
    assert markdown_table(["a", "b"], [["x|y", 1]]) == "| a | b |\n| --- | ---: |\n| x\\|y | 1 |"

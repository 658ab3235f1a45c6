"""``zhtune data evolve`` against a scripted stub teacher: every elimination rule, rounds that
chain parents, Chinese/English prompts by script, resuming without asking twice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.options import flat
from tests.stub_openai import Scripted, StubServer
from zhtune.cli import main
from zhtune.data.evolve import METHODS, EvolveOptions, evolve, judged_equal, pick_method
from zhtune.data.synth import read_appended
from zhtune.errors import ZhtuneError

EVOLVE_MARKS = ("#Rewritten Prompt#:", "#Created Prompt#:", "#改写后的提示#：", "#新提示#：")
JUDGE_MARKS = ("Your judgement", "你的判断")


def given(text: str) -> str:
    """The instruction inside an evolve prompt (the line after the #Given Prompt# header)."""
    for head in ("#The Given Prompt#:\n", "#Given Prompt#:\n", "#给定提示#：\n"):
        if head in text:
            return text.split(head, 1)[1].split("\n", 1)[0]
    raise AssertionError(text)


def teacher(req: dict, n: int) -> str | Scripted:
    """Plays the teacher by what the instruction asks for: COPY, EMPTY, EQUAL, SORRY, PUNCT, or
    anything else (a good evolution: the instruction plus " 并说明理由", and an answer)."""
    text = req["messages"][0]["content"]
    if any(m in text for m in EVOLVE_MARKS):
        inst = given(text)
        if "COPY" in inst:
            return "#Rewritten Prompt#: " + inst + " in detail"
        if "EMPTY" in inst:
            return "   "
        return inst + " 并说明理由" if "请" in inst else inst + " and explain why"
    if any(m in text for m in JUDGE_MARKS):
        if "EQUAL" in text:
            return "相同" if "第一条指令" in text else "Equal"
        return "不相同" if "第一条指令" in text else "Not Equal"
    if "SORRY" in text:
        return "Sorry, I cannot help with that."
    if "抱歉" in text:
        return "抱歉，我无法回答。"
    if "PUNCT" in text:
        return "好的。。。！"
    return "A long and helpful answer: " + text


def write_input(path: Path, instructions: list[str]) -> Path:
    rows = [{"id": f"r{i}", "instruction": t, "output": "原答案"} for i, t in enumerate(instructions)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def options(server: StubServer, **kw) -> EvolveOptions:
    base = {"base_url": server.base_url, "model": "stub", "progress": False, "backoff": 0.01}
    return flat(EvolveOptions, **{**base, **kw})


def test_each_elimination_rule(tmp_path, capsys):
    src = write_input(
        tmp_path / "in.jsonl",
        ["Describe the water cycle", "COPY the list", "EMPTY it", "EQUAL these", "SORRY about", "请 PUNCT 一下",
         "请写抱歉信"],
    )  # fmt: skip
    out = tmp_path / "out.jsonl"
    with StubServer(teacher) as server:
        assert evolve([str(src)], str(out), options(server)) == 0
    kept = read_appended(out)
    assert [r["id"] for r in kept] == ["r0-evol1"]
    assert kept[0]["messages"][0]["content"] == "Describe the water cycle and explain why"
    assert kept[0]["messages"][1]["content"].startswith("A long and helpful answer")
    meta = kept[0]["meta"]
    assert meta["gen_method"] == "evol-instruct" and meta["round"] == 1 and meta["parent"] == "r0"
    assert meta["method"] == pick_method(0, "r0", 1) and meta["lang"] == "en"
    rules = {r["origin"]: r["rule"] for r in read_appended(tmp_path / "out.rejects.jsonl")}
    assert rules == {
        "r1": "copied_prompt",
        "r2": "empty",
        "r3": "no_information_gain",
        "r4": "sorry",
        "r5": "no_content",
        "r6": "sorry",
    }
    # copied and empty evolutions were eliminated before paying for a judge or an answer
    asked = [r["messages"][0]["content"] for r in server.requests]
    assert not any("COPY the list" in a and "judgement" in a for a in asked)
    assert len(server.requests) == 2 * 1 + 1 * 2 + 4 * 3  # r1, r2 after 1 request; r3 after 2; others 3
    assert "eliminated 6" in capsys.readouterr().err


def test_rounds_chain_parents_and_pick_chinese_prompts(tmp_path):
    src = write_input(tmp_path / "in.jsonl", ["请介绍一下长城的历史", "Name three rivers"])
    out = tmp_path / "out.jsonl"
    with StubServer(teacher) as server:
        assert evolve([str(src)], str(out), options(server, rounds=3, concurrency=2)) == 0
    rows = {r["id"]: r for r in read_appended(out)}
    assert set(rows) == {f"r{i}-evol{k}" for i in (0, 1) for k in (1, 2, 3)}
    assert (
        rows["r0-evol3"]["messages"][0]["content"] == "请介绍一下长城的历史 并说明理由 并说明理由 并说明理由"
    )
    assert rows["r0-evol2"]["meta"]["parent"] == "r0-evol1" and rows["r0-evol3"]["meta"]["origin"] == "r0"
    assert rows["r0-evol1"]["meta"]["lang"] == "zh" and rows["r1-evol1"]["meta"]["lang"] == "en"
    zh_prompts = [r for r in server.requests if "#给定提示#" in r["messages"][0]["content"]]
    assert len(zh_prompts) == 3
    assert {rows[k]["meta"]["method"] for k in rows} <= set(METHODS)
    methods = {pick_method(0, f"r{i}", k) for i in range(20) for k in range(1, 4)}
    assert methods == set(METHODS)  # all six are drawn


def test_resume_asks_nothing_twice(tmp_path):
    src = write_input(tmp_path / "in.jsonl", [f"Explain topic number {i}" for i in range(6)] + ["EQUAL x"])
    out = tmp_path / "out.jsonl"
    # the first run loses its endpoint (401, not retried) after 8 requests
    with StubServer(lambda req, n: teacher(req, n) if n <= 8 else Scripted(status=401)) as first:
        with pytest.raises(ZhtuneError, match="refused a request"):
            evolve([str(src)], str(out), options(first, rounds=2, concurrency=1))
    answered = [json.dumps(r, sort_keys=True) for r in first.requests[:8]]
    with StubServer(teacher) as second:
        assert evolve([str(src)], str(out), options(second, rounds=2, concurrency=3)) == 0
    again = [json.dumps(r, sort_keys=True) for r in second.requests]
    assert not set(answered) & set(again)
    assert len(read_appended(out)) == 12
    assert [r["origin"] for r in read_appended(tmp_path / "out.rejects.jsonl")] == ["r6", "r6"]
    # a third run has nothing left to do
    with StubServer(teacher) as third:
        assert evolve([str(src)], str(out), options(third, rounds=2)) == 0
    assert third.requests == []


def test_unusable_inputs_are_rejected_once_and_cli(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    rows = [
        {"id": "a", "messages": [{"role": "user", "content": "Give me a proverb"}]},
        {"id": "b", "text": "plain text"},
        {"id": "a", "messages": [{"role": "user", "content": "duplicate id"}]},
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    with StubServer(teacher) as server:
        for _ in range(2):
            rc = main(["data", "evolve", str(src), "-o", str(out), "--base-url", server.base_url, "--model", "m",
                       "--no-progress", "--format", "openai"])  # fmt: skip
            assert rc == 0
    rejects = [r for r in read_appended(tmp_path / "out.rejects.jsonl") if r["rule"] == "input"]
    assert [(r["line"], r["field"]) for r in rejects] == [(2, "messages"), (3, "id")]
    assert len(read_appended(out)) == 1
    assert "2 unusable records" in capsys.readouterr().err


def test_equal_verdicts():
    assert judged_equal("en", "Equal") and not judged_equal("en", "Not Equal.")
    assert (
        judged_equal("zh", "相同") and not judged_equal("zh", "不相同") and not judged_equal("zh", "无法判断")
    )


def test_patience_stops_a_run_that_keeps_nothing(tmp_path, capsys):
    src = write_input(
        tmp_path / "in.jsonl",
        ["Describe the water cycle", "EQUAL a", "COPY b", "EQUAL c", "SORRY d", "Describe the moon"],
    )
    out = tmp_path / "out.jsonl"
    args = ["data", "evolve", str(src), "-o", str(out), "--model", "m", "--no-progress", "--concurrency", "1"]
    with StubServer(teacher) as server:
        assert main([*args, "--base-url", server.base_url, "--patience", "7"]) == 1
    # kept r0 (3 requests), then 2 + 1 + 2 + 3 requests kept nothing: 8 >= 7 stops before r5
    assert len(server.requests) == 3 + 8
    assert [r["id"] for r in read_appended(out)] == ["r0-evol1"]
    err = capsys.readouterr().err
    assert (
        "stopped: no progress: the last 8 requests kept nothing "
        "(rejected: no_information_gain 2, copied_prompt 1, sorry 1). Kept 1 evolutions" in err
    )
    # a re-run (default patience 20) asks only for the round left, r5
    with StubServer(teacher) as again:
        assert main([*args, "--base-url", again.base_url]) == 0
    assert len(again.requests) == 3 and len(read_appended(out)) == 2


def test_max_requests_stops_and_a_rerun_reuses_the_cut_round(tmp_path, capsys):
    src = write_input(tmp_path / "in.jsonl", ["Describe the water cycle", "Name a river", "Name a lake"])
    out = tmp_path / "out.jsonl"
    with StubServer(teacher) as server:
        assert evolve([str(src)], str(out), options(server, concurrency=1, max_requests=4)) == 1
    assert len(server.requests) == 4 and len(read_appended(out)) == 1  # r1 stopped after its evolve request
    assert "stopped: reached --max-requests 4. Kept 1 evolutions" in capsys.readouterr().err
    with StubServer(teacher) as again:
        assert evolve([str(src)], str(out), options(again, concurrency=1)) == 0
    # r1's evolution came from the cache: its judge and answer, then r2's three requests
    assert len(again.requests) == 2 + 3 and len(read_appended(out)) == 3
    evolve_asks = [r["messages"][0]["content"] for r in again.requests]
    evolve_asks = [given(t) for t in evolve_asks if any(m in t for m in EVOLVE_MARKS)]
    assert evolve_asks == ["Name a lake"]

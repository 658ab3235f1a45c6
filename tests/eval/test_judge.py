"""``zhtune eval judge``: score parsing on many reply formats, class names, BELLE's message layout,
the paper's score_w/o_others arithmetic, and the whole command against a scripted OpenAI-compatible
judge (good, "0.8分", malformed, failing and score-less replies), a re-run that sends nothing,
MT-bench grading, and ``zhtune serve`` on a tiny model as the judge."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import threading
from pathlib import Path

import pytest

from tests.options import flat
from tests.serving import zhtune_serve
from tests.stub_openai import Scripted, StubServer
from zhtune.cli import main
from zhtune.errors import ZhtuneError
from zhtune.eval.judge import JudgeOptions, judge, macro_scores, summarize
from zhtune.eval.judge_prompts import (
    BELLE_NOISE,
    BELLE_PATTERNS,
    MTBENCH_PATTERNS,
    PROTOCOLS,
    Question,
    judge_messages,
    load_prompts,
    normalize_class,
    parse_score,
    read_questions,
)

FIXTURES = Path(__file__).parents[1] / "fixtures" / "judge"
DATA = FIXTURES / "eval_set.json"
BELLE = PROTOCOLS["belle"]
NO_GOLD = {"generation", "brainstorming", "rewrite"}


def belle(text: str) -> float | None:
    return parse_score(text, BELLE_PATTERNS, 0.0, 1.0, BELLE_NOISE)[0]


@pytest.mark.parametrize(
    "reply, score",
    [
        ("得分：0.8\n理由：模型回答与标准答案一致。", 0.8),  # full-width colon
        ("得分:1分。模型回答与标准答案完全一致，翻译准确无误。", 1.0),  # BELLE's own demo output
        ("**得分**：0.6\n\n**理由**：部分正确。", 0.6),  # markdown
        ("模型回答基本正确，但缺少步骤，给0.8分。", 0.8),  # "0.8分"
        ("理由：回答切题，但有一处事实错误，因此得分为0.5。", 0.5),  # score inside the reasons
        ("满分为1分，最低分为0分。该回答可以得0.7分。", 0.7),  # the scale echoed first
        ("Score: 0.9. The answer is correct.", 0.9),
        ("回答正确，信息完整。\n0.9", 0.9),  # a lone number at the end
        ("得分：０.９", 0.9),  # full-width digits
        ("得分：0", 0.0),
        ("这个回答很好，没有问题。", None),  # no score
        ("得分：8", None),  # out of range: not a 0-1 score
        ("得分：1.5", None),
        ("得分：10分", None),
        ("2023年1月的数据显示……", None),
    ],
)
def test_belle_score_parsing(reply, score):
    assert belle(reply) == score


@pytest.mark.parametrize(
    "reply, rating",
    [
        ("The answer is helpful and correct.\n\nRating: [[8]]", 8.0),
        ("Rating: [[8.5]]", 8.5),
        ("评分：[[10]]", 10.0),
        ("Rating: [7]", 7.0),
        ("Rating: 6", 6.0),
        ("Rating: [[11]]", None),  # outside 1-10
        ("Rating: [[0]]", None),
        ("A fine answer overall.", None),
    ],
)
def test_mtbench_rating_parsing(reply, rating):
    assert parse_score(reply, MTBENCH_PATTERNS, 1.0, 10.0)[0] == rating


def test_class_names_are_normalised():
    names = ["closed\xa0qa", "Closed QA", "closed_qa", " closed  QA ", "closed-qa"]
    assert {normalize_class(n) for n in names} == {"closed qa"}
    assert normalize_class("open QA") == normalize_class("open qa") == "open qa"


def test_score_without_others_matches_the_belle_paper():
    """Table 5 of the BELLE paper: the 8 non-"others" class scores average to 0.670. Math and
    code ("others") count in ``score`` but not in ``score_w/o_others``."""
    paper = [0.858, 0.655, 0.897, 0.663, 0.456, 0.422, 0.837, 0.577]
    plain = ["open qa", "brainstorming", "rewrite", "generation", "classification", "closed qa"]
    plain += ["summarization", "extract"]
    means = dict(zip(plain, paper)) | {"math": 0.2, "code": 0.3}
    score, without = macro_scores(means)
    assert without == pytest.approx(sum(paper) / 8) and round(without, 2) == 0.67
    assert without == pytest.approx(0.670, abs=1e-3)
    assert score == pytest.approx((sum(paper) + 0.5) / 10)
    # the same numbers through summarize(), from rows (two per class, means as above)
    rows = [
        {"class": c, "score": s, "raw_score": s, "unparsed": False}
        for c, m in means.items()
        for s in (m - 0.1, m + 0.1)
    ]
    rows.append({"class": "math", "score": None, "raw_score": None, "unparsed": True})  # never scored 0
    report = summarize(rows, BELLE)
    assert report["score_w/o_others"] == pytest.approx(sum(paper) / 8)
    assert report["scores"]["math"] == pytest.approx(0.2) and report["unparsed"] == {
        **dict.fromkeys(means, 0),
        "math": 1,
    }
    assert report["counts"]["math"] == 3 and report["overall"] == report["score"]


def test_belle_prompts_cover_the_data_and_include_gold_answers_except_open_ended(tmp_path):
    questions = read_questions(str(DATA), str(tmp_path / "rejects.jsonl"))
    assert len(questions) == 10 and not (tmp_path / "rejects.jsonl").exists()
    prompts = load_prompts(FIXTURES / "eval_prompt.json", BELLE)
    assert prompts.missing([q.cls for q in questions]) == []  # "open QA" / "closed\xa0qa" match
    for q in questions:
        (msg,) = judge_messages(BELLE, prompts, q, "模型的回答")
        text = msg["content"]
        assert msg["role"] == "user" and q.question in text and "模型回答：模型的回答" in text
        assert text.startswith("你") or text.startswith("假设")  # BELLE's class prompt comes first
        assert text.endswith("请针对模型回答给出得分，顺便给出理由：")
        assert ("标准回答：" in text) == (q.cls not in NO_GOLD), q.cls
        if q.cls not in NO_GOLD:
            assert q.std_answer in text


def test_custom_prompt_file_slots_default_and_missing_class(tmp_path):
    q = Question("1", "math", "1+1=?", "2")
    custom = tmp_path / "p.json"
    custom.write_text(
        json.dumps({"math|code": "Q={question} A={answer} G={std_answer} {x}"}), encoding="utf-8"
    )
    prompts = load_prompts(custom, BELLE)
    assert judge_messages(BELLE, prompts, q, "3")[0]["content"] == "Q=1+1=? A=3 G=2 {x}"
    assert prompts.missing(["math", "code", "open qa"]) == ["open qa"]
    custom.write_text(json.dumps({"default": '请打分，按照"得分:"输出。'}), encoding="utf-8")
    text = judge_messages(BELLE, load_prompts(custom, BELLE), q, "3")[0]["content"]
    assert text.startswith("请打分") and "标准回答：2" in text  # an instruction gets BELLE's layout

    out = tmp_path / "out"
    custom.write_text(json.dumps({"math": "{question} {answer}"}), encoding="utf-8")
    opts = flat(
        JudgeOptions, data=str(DATA), prompts=str(custom), base_url="http://127.0.0.1:9/v1", model="j"
    )
    with pytest.raises(ZhtuneError, match=r"p\.json: no prompt for class\(es\) code, open qa"):
        judge(str(tmp_path), flat(JudgeOptions, **{**opts.__dict__, "output": str(out)}))


def test_bad_records_are_rejected_with_line_and_field(tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text(
        '{"question": "a", "class": "math", "std_answer": "1"}\n{"question": "", "class": "math"}\n'
        '{"question": "b"}\nnot json\n{"question": "c", "class": "x", "std_answer": 3}\n',
        encoding="utf-8",
    )
    questions = read_questions(str(data), str(tmp_path / "r.jsonl"))
    assert [q.question for q in questions] == ["a"]
    rejects = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [(r["line"], r["field"]) for r in rejects] == [
        (2, "question"),
        (3, "class"),
        (4, None),
        (5, "std_answer"),
    ]


# --------------------------------------------------------------------------------------------
# The command against a scripted judge
# --------------------------------------------------------------------------------------------
PLAN = {  # class -> replies in order (the last one repeats)
    "code": ["得分：0.8\n理由：代码正确。"],
    "open qa": ["模型回答不太对，给0.4分。"],
    "brainstorming": [Scripted(body="not json"), "得分: 1"],  # malformed body, retried by the client
    "classification": [Scripted(status=500), "**得分**：0.6"],  # a 500 then success
    "math": ["我无法判断这个回答。"],  # no score, twice -> unparsed
    "generation": ["理由：口号切题，但不够简洁，因此得分为0.9。"],  # the score inside the reasons
    "summarization": ["0.7"],
    "rewrite": ["满分为1分，最低分为0分。该回答得0.3分"],
    "closed qa": ["无法给出", "得分：0.5"],  # no score, then one when asked again
    "extract": ["Score: 0.2"],
}
EXPECTED = {
    "code": 0.8,
    "open qa": 0.4,
    "brainstorming": 1.0,
    "classification": 0.6,
    "math": None,
    "generation": 0.9,
    "summarization": 0.7,
    "rewrite": 0.3,
    "closed qa": 0.5,
    "extract": 0.2,
}


class Judge:
    """A scripted judge: finds the question in the prompt and plays that class's plan."""

    def __init__(self, plan: dict[str, list], questions: list[Question]) -> None:
        self.plan, self.questions = plan, questions
        self.seen: dict[str, int] = {}
        self.lock = threading.Lock()

    def __call__(self, request: dict, n: int):
        text = request["messages"][-1]["content"]
        cls = next(q.cls for q in self.questions if q.question in text)
        with self.lock:
            k = self.seen[cls] = self.seen.get(cls, 0) + 1
        replies = self.plan[cls]
        return replies[min(k, len(replies)) - 1]


@pytest.fixture(scope="module")
def questions(tmp_path_factory) -> list[Question]:
    return read_questions(str(DATA), str(tmp_path_factory.mktemp("q") / "r.jsonl"))


def options(server: StubServer, out: Path, **kw) -> JudgeOptions:
    values = dict(
        data=str(DATA), base_url=server.base_url, model="stub-judge", output=str(out),
        max_new_tokens=4, backoff=0.01, max_retries=2, concurrency=3, progress=False,
    )  # fmt: skip
    return flat(JudgeOptions, **{**values, **kw})


def quiet(fn, *args):
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(buf):
        return fn(*args), buf.getvalue()


def test_judge_end_to_end_and_rerun_sends_nothing(tiny_model_dir, questions, tmp_path):
    out = tmp_path / "eval"
    with StubServer(Judge(PLAN, questions)) as server:
        report, log = quiet(judge, str(tiny_model_dir), options(server, out))
        sent = len(server.requests)
        # 10 questions + 2 malformed/500 retries + 2 re-asks of score-less replies (math, closed qa)
        # + the re-asked math reply (no score again)
        assert sent == 10 + 2 + 2
        assert all(r["temperature"] == 0 and r["model"] == "stub-judge" for r in server.requests)

        rows = [json.loads(line) for line in (out / "judge.jsonl").read_text(encoding="utf-8").splitlines()]
        by_class = {r["class"]: r for r in rows}
        assert len(rows) == 10 and {c: r["score"] for c, r in by_class.items()} == EXPECTED
        assert by_class["math"]["unparsed"] and by_class["math"]["attempts"] == 2
        assert by_class["math"]["judge_reply"] == "我无法判断这个回答。"
        assert by_class["closed qa"]["attempts"] == 2 and not by_class["closed qa"]["unparsed"]
        assert by_class["code"]["parsed_by"] == "label" and by_class["open qa"]["parsed_by"] == "fen"
        answers = {
            json.loads(line)["id"]: json.loads(line)["prediction"]
            for line in (out / "judge_answers.jsonl").read_text(encoding="utf-8").splitlines()
        }
        assert {r["id"]: r["answer"] for r in rows} == answers
        for r in rows:  # the gold answer is in the judge message except for the open-ended classes
            assert ("标准回答：" in r["judge_prompt"]) == (r["class"] not in NO_GOLD)

        saved = json.loads((out / "judge.json").read_text(encoding="utf-8"))
        parsed = {c: v for c, v in EXPECTED.items() if v is not None}
        plain = [v for c, v in parsed.items() if c not in ("math", "code")]
        assert saved["metric"] == "judge" and saved["scores"] == pytest.approx(EXPECTED)
        assert saved["overall"] == saved["score"] == pytest.approx(sum(parsed.values()) / 9)
        assert saved["score_w/o_others"] == pytest.approx(sum(plain) / 8)
        assert saved["counts"] == dict.fromkeys(EXPECTED, 1)
        assert saved["unparsed"]["math"] == 1 and saved["unparsed_total"] == 1 and saved["failed"] == 0
        assert saved["prompts"].endswith("eval_prompt.json")  # BELLE's prompts beside the data
        assert saved["usage"]["requests"] == 12 and saved["usage"]["retries"] == 2

        md = (out / "report.md").read_text(encoding="utf-8")
        assert "| math | 1 | – | 1 |" in md and "| code | 1 | 0.800 | 0 |" in md
        assert f"| **score** | 10 | **{saved['score']:.3f}** | 1 |" in md
        assert f"| **score_w/o_others** | 8 | **{saved['score_w/o_others']:.3f}** | 0 |" in md
        assert "1 reply had no score" in md

        # a re-run asks nothing: judged ids are skipped
        again, _ = quiet(judge, str(tiny_model_dir), options(server, out))
        assert len(server.requests) == sent and again["scores"] == saved["scores"]
        # without judge.jsonl, every reply comes from the cache
        (out / "judge.jsonl").unlink()
        again, _ = quiet(judge, str(tiny_model_dir), options(server, out))
        assert len(server.requests) == sent and again["scores"] == saved["scores"]
        assert again["usage"]["cached"] == 12 and again["usage"]["prompt_tokens"] == 0

        # another judge model: everything is judged again, nothing mixed in
        other, _ = quiet(judge, str(tiny_model_dir), options(server, out, model="other"))
        # (the scripted judge has played its failures already: 10 requests + math asked again)
        assert len(server.requests) == sent + 11 and other["judge_model"] == "other"
        assert other["usage"]["cached"] == 0 and other["judged"] == 10
        # a changed answer (the run was tuned further) is judged again; the rest stand
        answers_file = out / "judge_answers.jsonl"
        lines = answers_file.read_text(encoding="utf-8").splitlines()
        first = json.loads(lines[0]) | {"prediction": "换了一个回答"}
        answers_file.write_text(
            "\n".join([json.dumps(first, ensure_ascii=False), *lines[1:]]) + "\n", "utf-8"
        )
        before = len(server.requests)
        again, _ = quiet(judge, str(tiny_model_dir), options(server, out, model="other"))
        assert len(server.requests) - before in (1, 2) and again["judged"] == 10
        rows = [json.loads(line) for line in (out / "judge.jsonl").read_text(encoding="utf-8").splitlines()]
        assert rows[-1]["id"] == first["id"] and rows[-1]["answer"] == "换了一个回答"


def test_failing_questions_are_counted_and_asked_again_on_the_next_run(tiny_model_dir, questions, tmp_path):
    out = tmp_path / "eval"
    down = dict.fromkeys(PLAN, ["得分：0.5"]) | {
        "extract": [Scripted(status=503)],
        "rewrite": [Scripted(status=400)],
    }
    with StubServer(Judge(down, questions)) as server:
        code, log = quiet(
            main, ["eval", "judge", str(tiny_model_dir), *cli_args(server, out), "--max-retries", "1"]
        )
    assert code == 1 and "2 questions failed at the judge" in log
    saved = json.loads((out / "judge.json").read_text(encoding="utf-8"))
    assert saved["failed"] == 2 and saved["judged"] == 8 and "extract" not in saved["scores"]
    assert "| **score** | 8 | **0.500** | 0 |" in log  # the table goes to stdout

    with StubServer(Judge(dict.fromkeys(PLAN, ["得分：0.5"]), questions)) as server:
        code, log = quiet(main, ["eval", "judge", str(tiny_model_dir), *cli_args(server, out)])
        assert code == 0 and len(server.requests) == 2  # only the missing questions
    saved = json.loads((out / "judge.json").read_text(encoding="utf-8"))
    assert saved["failed"] == 0 and saved["judged"] == 10 and saved["scores"]["extract"] == 0.5


def cli_args(server: StubServer, out: Path) -> list[str]:
    return [
        "--data", str(DATA), "--judge-url", server.base_url, "--judge-model", "stub-judge", "-o", str(out),
        "--max-new-tokens", "4", "--backoff", "0.01", "--no-progress",
    ]  # fmt: skip


def test_wrong_key_stops_at_once(tiny_model_dir, tmp_path):
    with StubServer(lambda req, n: "得分：1", api_key="right") as server:
        opts = options(server, tmp_path / "eval", api_key="wrong")
        with pytest.raises(ZhtuneError, match="HTTP 401"):
            quiet(judge, str(tiny_model_dir), opts)
        assert len(server.requests) == 0  # refused before the script: nothing judged


def test_no_judge_url_is_a_clear_error(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ZhtuneError, match="--judge-base-url"):
        judge(str(tiny_model_dir), flat(JudgeOptions, data=str(DATA), model="m", output=str(tmp_path)))


def test_mtbench_protocol(tiny_model_dir, questions, tmp_path):
    ratings = {"code": "[[8]]", "math": "Rating: [[3]]", "open qa": "Good.\nRating: [[9.5]]"}
    plan = {c: [f"Explanation.\n{ratings.get(c, 'Rating: [[5]]')}"] for c in PLAN}
    out = tmp_path / "eval"
    with StubServer(Judge(plan, questions)) as server:
        report, _ = quiet(judge, str(tiny_model_dir), options(server, out, protocol="mtbench"))
        sent = [r["messages"] for r in server.requests]
    assert (
        report["protocol"] == "mtbench"
        and report["scores"]["code"] == 0.8
        and report["scores"]["math"] == 0.3
    )
    assert report["raw_scores"]["open qa"] == 9.5 and report["scores"]["open qa"] == 0.95
    for messages in sent:  # a system message; the gold answer only for math and code
        q = next(q for q in questions if q.question in messages[-1]["content"])
        assert messages[0]["role"] == "system" and "[[rating]]" not in messages[-1]["content"]
        assert ("[Reference answer begins]" in messages[-1]["content"]) == (q.cls in ("math", "code"))
    assert "raw mean (1-10)" in (out / "judge.md").read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------
# zhtune serve as the judge
# --------------------------------------------------------------------------------------------
@pytest.fixture
def served(tiny_model_dir, tmp_path):
    log = tmp_path / "serve.log"
    with zhtune_serve(tiny_model_dir, log, "--device", "cpu") as url:
        assert "(cpu, fp32, template " in log.read_text(encoding="utf-8")  # dtype auto: fp32 on a CPU
        yield f"{url}/v1"


def test_zhtune_serve_as_the_judge(tiny_model_dir, served, tmp_path):
    """A tiny random model judges: its replies hold no score, so every one is asked twice and
    counted as unparsed (or, should one happen to end in 0 or 1, parsed in range); nothing crashes."""
    out = tmp_path / "eval"
    short = tmp_path / "prompts.json"  # the tiny model's context is 512 tokens: BELLE's prompts are too long
    short.write_text(
        json.dumps({"default": "打分：{question}\n{answer}"}, ensure_ascii=False), encoding="utf-8"
    )
    opts = flat(JudgeOptions,
        data=str(DATA), base_url=served, model="default", output=str(out), limit=4, prompts=str(short),
        max_new_tokens=4, max_tokens=8, device="cpu", progress=False,
    )  # fmt: skip
    report, _ = quiet(judge, str(tiny_model_dir), opts)
    rows = [json.loads(line) for line in (out / "judge.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == report["judged"] == 4 and report["failed"] == 0
    for r in rows:
        assert r["unparsed"] == (r["score"] is None)
        assert r["unparsed"] or 0 <= r["score"] <= 1
        assert r["attempts"] == 2 or not r["unparsed"]
    assert report["unparsed_total"] == sum(r["unparsed"] for r in rows)
    assert sum(report["counts"].values()) == 4 and (out / "report.md").exists()
    shutil.rmtree(out)


def test_reruns_get_past_questions_that_fail_for_good(tiny_model_dir, questions, tmp_path):
    """The judge was down (5 failures in a row: it gives up), and the questions it failed keep
    failing (a content filter, say). A re-run asks the never-asked questions first and does not
    count the known failures as the judge being down, so it judges everything it can."""
    out = tmp_path / "eval"
    down = dict.fromkeys(PLAN, [Scripted(status=503)])
    with StubServer(Judge(down, questions)) as server:
        code, log = quiet(
            main, ["eval", "judge", str(tiny_model_dir), *cli_args(server, out), "--max-retries", "0",
                   "--concurrency", "1"],
        )  # fmt: skip
    assert code == 1 and "5 times in a row, giving up" in log
    failed_ids = {json.loads(line)["id"] for line in (out / "judge_failures.jsonl").read_text().splitlines()}
    assert len(failed_ids) == 5
    bad_classes = {q.cls for q in questions if q.id in failed_ids}
    plan = {c: [Scripted(status=400)] if c in bad_classes else ["得分：0.5"] for c in PLAN}
    with StubServer(Judge(plan, questions)) as server:
        code, log = quiet(
            main, ["eval", "judge", str(tiny_model_dir), *cli_args(server, out), "--max-retries", "0",
                   "--concurrency", "1"],
        )  # fmt: skip
    assert code == 1 and "giving up" not in log and "5 questions failed at the judge" in log
    saved = json.loads((out / "judge.json").read_text(encoding="utf-8"))
    assert saved["judged"] == 5 and saved["failed"] == 5

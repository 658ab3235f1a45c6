"""``zhtune eval exam``: reading C-Eval/CMMLU/MMCU files, prompts, letter scoring checked against
a plain forward pass, extraction, reports, resume, errors, and a trained model far above chance."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from tests.options import flat
from zhtune.cli import main
from zhtune.errors import ZhtuneError
from zhtune.eval.exam import (
    CMMLU,
    LETTERS,
    PROMPTS,
    ExamOptions,
    PromptBuilder,
    Question,
    chat_messages,
    extract_letters,
    format_question,
    header,
    load_exam,
    normalize_answer,
    pick_benchmark,
    raw_prompt,
    resolve_prompt,
    run_exam,
    summarize,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "exam"


def _q(question: str, opts: str, answer: str, qid: str = "0", subject: str = "s") -> Question:
    return Question(qid, subject, question, dict(zip(LETTERS, opts.split(","))), answer)


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
def test_cmmlu_and_ceval_layouts_read_the_same_questions():
    cmmlu = load_exam(str(FIXTURES / "cmmlu"))
    ceval = load_exam(str(FIXTURES / "ceval"), split="val")
    assert sorted(cmmlu.test) == ["agronomy", "chinese_history"]
    assert list(ceval.test) == ["agronomy"]  # agronomy_val.csv -> agronomy
    for a, b in zip(cmmlu.test["agronomy"], ceval.test["agronomy"]):
        assert (a.id, a.question, a.options, a.answer) == (b.id, b.question, b.options, b.answer)
    first = cmmlu.test["agronomy"][0]
    assert first.question.startswith("在农业生产中")
    assert first.options == {"A": "农业生产工具", "B": "土地", "C": "劳动力", "D": "资金"}
    assert first.answer == "B" and first.source.endswith("agronomy.csv:2")
    assert [q.answer for q in cmmlu.dev["agronomy"]] == ["C", "D"]
    assert [q.answer for q in ceval.dev["agronomy"]] == ["C", "D"]  # agronomy_dev.csv, explanation ignored


def test_subject_filter_and_unknown_subject(tmp_path):
    assert list(load_exam(str(FIXTURES / "cmmlu"), subjects=["chinese_history"]).test) == ["chinese_history"]
    with pytest.raises(ZhtuneError, match="unknown subject.*nosuch.*agronomy, chinese_history"):
        load_exam(str(FIXTURES / "cmmlu"), subjects=["nosuch"])
    # one file: its subject is the file name; dev comes from ../dev
    one = load_exam(str(FIXTURES / "cmmlu" / "test" / "agronomy.csv"))
    assert list(one.test) == ["agronomy"] and len(one.dev["agronomy"]) == 2


def test_mmcu_json_multi_letter_answers():
    exam = load_exam(str(FIXTURES / "mmcu" / "psychology.json"))
    assert [q.answer for q in exam.test["psychology"]] == ["ABC", "A", "ABD", "B"]


def test_mmcu_xlsx_one_subject_per_sheet(tmp_path):
    openpyxl = pytest.importorskip("openpyxl")
    book = openpyxl.Workbook()
    first = book.active
    first.title = "心理"
    first.append(["题目", "A", "B", "C", "D", "答案"])
    first.append(["下列属于心理过程的有", "认知", "情绪", "意志", "体重", "ABC"])
    first.append(["数字", 1, 2, 3.0, 4.5, " b "])
    second = book.create_sheet("法律")
    second.append(["question", "A", "B", "C", "D", "answer"])
    second.append(["宪法是", "根本法", "普通法", "行政法规", "地方法规", "A"])
    book.save(tmp_path / "医疗.xlsx")
    exam = load_exam(str(tmp_path / "医疗.xlsx"))
    assert list(exam.test) == ["心理", "法律"]
    assert [q.answer for q in exam.test["心理"]] == ["ABC", "B"]
    assert exam.test["心理"][1].options == {"A": "1", "B": "2", "C": "3", "D": "4.5"}
    assert exam.test["心理"][1].source.endswith("医疗.xlsx:3")
    assert exam.test["法律"][0].question == "宪法是"


def test_xlsx_without_openpyxl_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "x.xlsx").write_bytes(b"")
    monkeypatch.setitem(__import__("sys").modules, "openpyxl", None)
    with pytest.raises(ZhtuneError, match=r"x\.xlsx: reading xlsx needs openpyxl.*\[exam\]"):
        load_exam(str(tmp_path / "x.xlsx"))


def test_missing_answer_column_names_file_line_and_field(tmp_path):
    bad = tmp_path / "test" / "x.csv"
    bad.parent.mkdir()
    bad.write_text("Question,A,B,C,D\n问,甲,乙,丙,丁\n", encoding="utf-8")
    with pytest.raises(ZhtuneError, match=r"x\.csv:2: field 'answer': missing"):
        load_exam(str(tmp_path))


def test_answer_outside_a_to_d_names_file_line_and_field(tmp_path):
    bad = tmp_path / "x.csv"
    bad.write_text(",Question,A,B,C,D,Answer\n0,问,甲,乙,丙,丁,A\n1,问,甲,乙,丙,丁,E\n", encoding="utf-8")
    with pytest.raises(ZhtuneError, match=r"x\.csv:3: field 'answer': 'E' is not an option letter"):
        load_exam(str(bad))


def test_normalize_answer():
    assert normalize_answer(" c") == "C"
    assert normalize_answer("Ｂ、Ａ") == "AB"
    assert normalize_answer("D,B") == "BD"
    assert normalize_answer("E") == normalize_answer("") == ""


# --------------------------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------------------------
SHOT = _q("一加一？", "1,2,3,4", "B")
ASK = _q("二加二？", "3,4,5,6", "B")


def test_few_shot_prompt_text_exactly():
    head = header("agronomy", CMMLU, multi=False)
    assert raw_prompt(head, [SHOT], ASK) == (
        "以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n"
        "题目：一加一？\nA. 1\nB. 2\nC. 3\nD. 4\n答案是：B\n\n"
        "题目：二加二？\nA. 3\nB. 4\nC. 5\nD. 6\n答案是："
    )
    assert header("心理", {}, multi=True).startswith("以下是关于心理的选择题，可能有多个正确答案")
    assert chat_messages(head, [SHOT], ASK) == [
        {"role": "user", "content": head + "题目：一加一？\nA. 1\nB. 2\nC. 3\nD. 4\n答案是："},
        {"role": "assistant", "content": "B"},
        {"role": "user", "content": "题目：二加二？\nA. 3\nB. 4\nC. 5\nD. 6\n答案是："},
    ]


# The 1-shot prompts of the fixtures' first agronomy question, written out by hand from each
# evaluator's own code: CMMLU src/mp_utils.py (format_example, gen_prompt), C-Eval
# evaluators/llama.py (format_example, generate_few_shot_prompt), MMCU TestBloomz.py
# (format_example, gen_prompt), lm-evaluation-harness tasks/cmmlu and ceval-valid (description,
# doc_to_text, target_delimiter " ", fewshot_delimiter "\n\n").
SHOT_Q = "肉牛屠宰后，胴体的哪个部位肉质较好"
TEST_Q = "在农业生产中被当作极其重要的劳动对象发挥作用，最主要的不可替代的基本生产资料是"
GOLDEN = {
    ("cmmlu", "cmmlu"): f"以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n题目：{SHOT_Q}\nA. 胸\nB. 腹\nC. 大腿\nD. 小腿"
    f"\n答案是：C\n\n题目：{TEST_Q}\nA. 农业生产工具\nB. 土地\nC. 劳动力\nD. 资金\n答案是：",
    ("ceval", "ceval"): f"以下是中国关于农学考试的单项选择题，请选出其中的正确答案。\n\n{SHOT_Q}\nA. 胸\nB. 腹\nC. 大腿\nD. 小腿"
    f"\n答案：C\n\n{TEST_Q}\nA. 农业生产工具\nB. 土地\nC. 劳动力\nD. 资金\n答案：",
    ("cmmlu", "lm-eval"): f"以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n{SHOT_Q}\nA. 胸\nB. 腹\nC. 大腿\nD. 小腿"
    f"\n答案： C\n\n{TEST_Q}\nA. 农业生产工具\nB. 土地\nC. 劳动力\nD. 资金\n答案：",
    ("ceval", "lm-eval"): f"以下是中国关于农学的单项选择题，请选出其中的正确答案。\n\n{SHOT_Q}\nA. 胸\nB. 腹\nC. 大腿\nD. 小腿"
    f"\n答案： C\n\n{TEST_Q}\nA. 农业生产工具\nB. 土地\nC. 劳动力\nD. 资金\n答案：",
    ("cmmlu", "mmcu"): f"请阅读以下选择题并给出正确选项，不要解释原因。请只给出答案的序号。\n{SHOT_Q}\nA. 胸\nB. 腹\nC. 大腿\nD. 小腿"
    f"\n正确答案的序号是： C\n\n{TEST_Q}\nA. 农业生产工具\nB. 土地\nC. 劳动力\nD. 资金\n正确答案的序号是：",
}


@pytest.mark.parametrize("benchmark, layout", list(GOLDEN))
def test_each_exam_prompt_is_its_official_layout(benchmark, layout):
    split = "test" if benchmark == "cmmlu" else "val"
    exam = load_exam(str(FIXTURES / benchmark), split=split)
    subject = next(iter(exam.test))
    assert resolve_prompt("auto", pick_benchmark([subject], exam.test_files), xlsx=False) == benchmark
    table = CMMLU  # the C-Eval fixture's agronomy is not a C-Eval subject: CMMLU's name, 农学
    chosen = PROMPTS[layout]
    head = header(subject, table, False, chosen, benchmark)
    assert raw_prompt(head, exam.dev[subject][:1], exam.test[subject][0], chosen) == GOLDEN[benchmark, layout]


def test_cells_keep_their_spaces_and_mmcu_cleans_its_option_labels():
    """The official evaluators write cells as the file has them (CMMLU's pandas keeps a cell's
    spaces); lm-eval strips the question; MMCU's code removes option labels (and any Latin A-D)."""
    q = _q(" 题目 ", "A、甲 ,B. 乙,Ｃ、丙, DNA丁 ", "A")
    assert format_question(q, False, PROMPTS["cmmlu"]) == "题目： 题目 \nA. A、甲 \nB. B. 乙\nC. Ｃ、丙\nD.  DNA丁 \n答案是："
    assert format_question(q, True, PROMPTS["lm-eval"]).startswith("题目\nA. A、甲 \n")
    assert format_question(q, True, PROMPTS["mmcu"]) == " 题目 \nA. 甲\nB. 乙\nC. 丙\nD. N丁\n正确答案的序号是： A\n\n"
    assert resolve_prompt("auto", "other", xlsx=True) == "mmcu" and resolve_prompt("auto", "other", False) == "cmmlu"
    with pytest.raises(ZhtuneError, match="--prompt must be auto or one of cmmlu, ceval, mmcu, lm-eval"):
        resolve_prompt("helm", "cmmlu", False)


@pytest.mark.parametrize("template", [None, "chatml", "belle"])
def test_letter_ids_are_the_token_after_the_prompt(tiny_tokenizer, template):
    builder = PromptBuilder(tiny_tokenizer, template, max_length=512)
    ids = builder.letter_ids()
    assert len(set(ids)) == 4
    for letter, token in zip(LETTERS, ids):
        prompt = builder.encode("", [], ASK)
        solved = _q(ASK.question, "3,4,5,6", letter)
        if template is None:
            full = tiny_tokenizer(raw_prompt("", [], ASK) + letter)["input_ids"]
        else:
            from zhtune.data.templates import get_template, render

            msgs = chat_messages("", [], solved) + [{"role": "assistant", "content": letter}]
            full = render(get_template(template), msgs, tiny_tokenizer)[0]
        assert full[: len(prompt) + 1] == prompt + [token]


def test_shots_dropped_from_the_front_when_too_long(tiny_tokenizer):
    builder = PromptBuilder(tiny_tokenizer, None, max_length=10_000)
    shots = [_q(f"第{i}题" * 5, "1,2,3,4", "A") for i in range(3)]
    full, k = builder.build("头\n\n", shots, ASK)
    assert k == 3
    two = len(builder.encode("头\n\n", shots[1:], ASK))
    builder.max_length = two
    ids, k = builder.build("头\n\n", shots, ASK)
    assert k == 2 and ids == builder.encode("头\n\n", shots[1:], ASK)  # the first shot went
    builder.max_length = 5
    ids, k = builder.build("头\n\n", shots, ASK)
    assert k == 0 and ids == builder.encode("", [], ASK)[-5:]  # question's start cut


# --------------------------------------------------------------------------------------------
# extraction and summary
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "reply, letters",
    [
        ("ABC", "ABC"),
        ("B、D", "BD"),
        ("答案是：C,A", "AC"),
        ("Ａ；Ｃ", "AC"),
        ("DCBA", "ABCD"),
        ("AAB", ""),  # the one run repeats a letter: nothing
        ("答案是B，然后C也对", "B"),
        ("我不知道", ""),
    ],
)
def test_extract_letters_mmcu_rules(reply, letters):
    assert extract_letters(reply) == letters


def test_summary_means_of_subjects_and_categories():
    rows = {
        "ancient_chinese": [{"correct": True}, {"correct": False}],  # Social Science + China specific
        "anatomy": [{"correct": True}] * 3,  # STEM
        "my_own": [{"correct": False}],  # unknown -> Other
    }
    scores, counts, cats = summarize(rows, CMMLU)
    assert scores == {"anatomy": 1.0, "ancient_chinese": 0.5, "my_own": 0.0}
    assert counts == {"anatomy": 3, "ancient_chinese": 2, "my_own": 1}
    assert cats == {"STEM": 1.0, "Social Science": 0.5, "Other": 0.0, "China specific": 0.5}


# --------------------------------------------------------------------------------------------
# scoring against a hand-computed expectation
# --------------------------------------------------------------------------------------------
def _hand_prompt(subject_zh: str, shots: list[tuple[str, list[str], str]], q: tuple[str, list[str]]) -> str:
    text = f"以下是关于{subject_zh}的单项选择题，请直接给出正确答案的选项。\n\n"
    for question, opts, answer in shots:
        text += (
            f"题目：{question}\nA. {opts[0]}\nB. {opts[1]}\nC. {opts[2]}\nD. {opts[3]}\n答案是：{answer}\n\n"
        )
    question, opts = q
    return text + f"题目：{question}\nA. {opts[0]}\nB. {opts[1]}\nC. {opts[2]}\nD. {opts[3]}\n答案是："


def test_batched_exam_equals_one_question_at_a_time(tiny_model_dir, tmp_path):
    import csv

    from transformers import AutoModelForCausalLM, AutoTokenizer

    report = run_exam(
        str(tiny_model_dir),
        flat(ExamOptions,
            data=str(FIXTURES / "cmmlu"), output=str(tmp_path), shots=2, batch_size=3, progress=False,
            max_length=2048,  # the tiny model's 512 positions would drop shots of chinese_history
        ),
    )  # fmt: skip
    assert report["shots_dropped"] == 0
    rows = [json.loads(line) for line in (tmp_path / "exam_predictions.jsonl").read_text().splitlines()]

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    letter_ids = [tok.convert_tokens_to_ids(c) for c in "ABCD"]
    expected: dict[str, list[bool]] = {}
    for subject, zh in (("agronomy", "农学"), ("chinese_history", "中国历史")):
        dev = list(csv.reader(open(FIXTURES / "cmmlu" / "dev" / f"{subject}.csv", encoding="utf-8")))[1:]
        test = list(csv.reader(open(FIXTURES / "cmmlu" / "test" / f"{subject}.csv", encoding="utf-8")))[1:]
        shots = [(r[1], r[2:6], r[6]) for r in dev]
        for r in test:
            ids = tok(_hand_prompt(zh, shots, (r[1], r[2:6])))["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, -1, letter_ids]
            probs = torch.softmax(logits, -1).tolist()
            row = next(x for x in rows if x["subject"] == subject and x["id"] == r[0])
            assert row["predicted"] == "ABCD"[max(range(4), key=probs.__getitem__)]
            assert [row["probs"][c] for c in "ABCD"] == pytest.approx(probs, abs=1e-5)
            assert row["shots"] == 2
            expected.setdefault(subject, []).append(row["predicted"] == r[6])
    assert report["scores"] == {s: sum(v) / len(v) for s, v in expected.items()}
    assert report["overall"] == pytest.approx(sum(report["scores"].values()) / 2)
    assert report["counts"] == {"agronomy": 4, "chinese_history": 3}
    assert report["metric"] == "exam" and report["prompt"] == "cmmlu, raw" and report["benchmark"] == "cmmlu"
    assert report["letter_tokens"] == dict(zip("ABCD", letter_ids))
    # categories: agronomy -> Other; chinese_history -> Humanities and China specific
    assert report["categories"] == {
        "Humanities": report["scores"]["chinese_history"],
        "Other": report["scores"]["agronomy"],
        "China specific": report["scores"]["chinese_history"],
    }
    saved = json.loads((tmp_path / "exam.json").read_text())
    assert {k: saved[k] for k in ("metric", "overall", "scores", "counts")} == {
        k: report[k] for k in ("metric", "overall", "scores", "counts")
    }
    md = (tmp_path / "exam.md").read_text()
    assert "| agronomy | Other | 4 |" in md and "overall (mean of subjects)" in md


def test_resume_skips_finished_subjects_and_redoes_a_cut_one(tiny_model_dir, tmp_path, capsys):
    opts = flat(ExamOptions, data=str(FIXTURES / "cmmlu"), output=str(tmp_path), shots=1, progress=False)
    first = run_exam(str(tiny_model_dir), opts)
    pred = tmp_path / "exam_predictions.jsonl"
    lines = pred.read_text().splitlines(keepends=True)
    assert len(lines) == 7
    # a run killed while writing chinese_history (the second subject): two rows and half a row
    pred.write_text("".join(lines[:6]) + lines[6][:20])
    capsys.readouterr()
    again = run_exam(str(tiny_model_dir), opts)
    assert "1 subjects already in" in capsys.readouterr().err
    assert pred.read_text().splitlines(keepends=True) == lines
    assert again["scores"] == first["scores"]
    # nothing left to do: the model is not even loaded
    third = run_exam("/nonexistent/model", opts)
    assert third["scores"] == first["scores"] and third["prompt"] == "cmmlu, raw"
    # other settings are refused rather than mixed in
    with pytest.raises(ZhtuneError, match="other settings.*shots: 1 -> 0.*--overwrite"):
        run_exam(
            str(tiny_model_dir),
            flat(ExamOptions, data=opts.data, output=str(tmp_path), shots=0, progress=False),
        )


def test_multi_letter_subject_is_scored_by_generation(tiny_model_dir, tmp_path):
    report = run_exam(
        str(tiny_model_dir),
        flat(ExamOptions,
            data=str(FIXTURES / "mmcu" / "psychology.json"), output=str(tmp_path), shots=0,
            max_new_tokens=4, progress=False,
        ),
    )  # fmt: skip
    assert report["scoring"] == {"psychology": "generate"} and report["categories"] == {
        "Other": report["overall"]
    }
    rows = [json.loads(line) for line in (tmp_path / "exam_predictions.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in rows] == ["ABC", "A", "ABD", "B"]
    for r in rows:
        assert r["predicted"] == extract_letters(r["reply"].split("\n\n")[0])
        assert r["correct"] == (r["predicted"] == r["answer"])


def test_chat_template_prompt(tiny_model_dir, tmp_path):
    report = run_exam(
        str(tiny_model_dir),
        flat(
            ExamOptions,
            data=str(FIXTURES / "cmmlu"),
            output=str(tmp_path),
            shots=1,
            template="chatml",
            progress=False,
        ),
    )
    assert report["prompt"] == "cmmlu, chat:chatml" and report["questions"] == 7


def test_cli_eval_exam(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        ["eval", "exam", str(tiny_model_dir), "--data", str(FIXTURES / "ceval"), "--split", "val",
         "--shots", "2", "-o", str(out), "--no-progress", "--no-template"]
    )  # fmt: skip
    assert code == 0
    report = json.loads((out / "exam.json").read_text())
    assert report["benchmark"] == "ceval" and report["counts"] == {"agronomy": 4}  # named {subject}_val.csv
    assert report["prompt"] == "ceval, raw"  # C-Eval's own layout
    assert "overall (mean of 1 subjects)" in capsys.readouterr().out
    # C-Eval's test split without answers: a clear error, exit 1
    (tmp_path / "ceval" / "test").mkdir(parents=True)
    (tmp_path / "ceval" / "test" / "agronomy_test.csv").write_text(
        "id,question,A,B,C,D,answer\n0,问,甲,乙,丙,丁,\n", encoding="utf-8"
    )
    code = main(["eval", "exam", str(tiny_model_dir), "--data", str(tmp_path / "ceval"), "-o", str(out)])
    assert code == 1
    assert "field 'answer': empty" in capsys.readouterr().err  # and it says: use --split val
    assert main(["eval", "exam", str(tiny_model_dir), "--data", str(FIXTURES / "cmmlu"), "--shots", "6"]) == 1


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_cli_eval_exam_on_a_device(device, tiny_model_dir, tmp_path, capsys):
    """``--device cpu`` / ``auto`` (the CPU here) score in fp32 by default, as before ``--device``
    existed: predictions made then (settings dtype fp32) resume, another dtype is refused."""
    if device == "auto" and torch.cuda.is_available():
        pytest.skip("auto is a GPU here: bf16, not the CPU's fp32")
    out = tmp_path / "out"
    args = ["eval", "exam", str(tiny_model_dir), "--data", str(FIXTURES / "cmmlu"), "--shots", "1",
            "-o", str(out), "--no-progress", "--device", device]  # fmt: skip
    assert main(args) == 0
    assert "scoring 7 at 1-shot on cpu (fp32)" in capsys.readouterr().err
    report = json.loads((out / "exam.json").read_text())
    assert report["device"] == "cpu" and report["dtype"] == "fp32"
    assert json.loads((out / "exam_settings.json").read_text())["dtype"] == "fp32"
    reference = tmp_path / "reference"
    run_exam(str(tiny_model_dir), flat(ExamOptions, data=str(FIXTURES / "cmmlu"), output=str(reference), shots=1,
                                              dtype="fp32", device="cpu", progress=False))  # fmt: skip
    assert (out / "exam_predictions.jsonl").read_text() == (reference / "exam_predictions.jsonl").read_text()
    # a cut run resumes whatever spelling of fp32 it was started with
    lines = (out / "exam_predictions.jsonl").read_text().splitlines(keepends=True)
    (out / "exam_predictions.jsonl").write_text("".join(lines[:4]))
    assert main([*args, "--dtype", "fp32"]) == 0
    assert (out / "exam_predictions.jsonl").read_text() == (reference / "exam_predictions.jsonl").read_text()
    assert main([*args, "--dtype", "bf16"]) == 1
    assert "dtype: 'fp32' -> 'bf16'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# a model trained on a synthetic multiple-choice task scores far above chance
# --------------------------------------------------------------------------------------------
def _largest_number_question(rng: random.Random, i: int) -> Question:
    """Which option is the largest number: three one-digit numbers and one two-digit number."""
    answer = rng.randrange(4)
    values = [str(rng.randrange(1, 10)) for _ in range(4)]
    values[answer] = str(rng.randrange(10, 100))
    return Question(str(i), "numbers", "哪个数最大？", dict(zip(LETTERS, values)), LETTERS[answer])


def test_trained_model_scores_far_above_chance(tmp_path):
    import csv

    from zhtune.models.tiny import build_tiny_llama, train_tokenizer

    tok = train_tokenizer(
        ["以下是关于的单项选择题，请直接给出正确答案的选项。题目：哪个数最大？答案：A. B. C. D. 0123456789"],
        300,
    )
    model = build_tiny_llama(tok, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, seed=0)
    base = tmp_path / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)

    test_dir = tmp_path / "numbers" / "test"
    test_dir.mkdir(parents=True)
    rng = random.Random(1)
    with open(test_dir / "numbers.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["", "Question", "A", "B", "C", "D", "Answer"])
        for i in range(48):
            q = _largest_number_question(rng, i)
            w.writerow([i, q.question, *q.options.values(), q.answer])

    def exam(model_dir: Path, out: str) -> float:
        opts = flat(
            ExamOptions, data=str(tmp_path / "numbers"), output=str(tmp_path / out), shots=0, progress=False
        )
        return run_exam(str(model_dir), opts)["overall"]

    before = exam(base, "before")
    torch.manual_seed(0)
    head = header("numbers", {}, multi=False)
    rng = random.Random(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(200):  # the exam prompt + the answer letter, loss on the letter only
        batch = [_largest_number_question(rng, 0) for _ in range(32)]
        ids = torch.tensor([tok(raw_prompt(head, [], q) + q.answer)["input_ids"] for q in batch])
        logits = model(input_ids=ids[:, :-1]).logits[:, -1]
        loss = torch.nn.functional.cross_entropy(logits, ids[:, -1])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    tuned = tmp_path / "tuned"
    model.save_pretrained(tuned)
    tok.save_pretrained(tuned)
    after = exam(tuned, "after")
    assert before < 0.5
    assert after >= 0.9, (before, after)


def test_letter_probs_from_a_shared_prefix_cache_equal_whole_prompts(tiny_model_dir):
    """Running the shared head once and each question against its cache (left padding between
    the two) gives the probabilities of running each whole prompt alone."""
    from transformers import AutoModelForCausalLM

    from zhtune.eval.exam import letter_probs
    from zhtune.infer.prefix import prefix_cache, shared_prefix_length

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    g = torch.Generator().manual_seed(0)
    head = torch.randint(5, 200, (40,), generator=g).tolist()
    prompts = [head + torch.randint(5, 200, (k,), generator=g).tolist() for k in (3, 11, 1, 7)]
    letters = [10, 11, 12, 13]
    n = shared_prefix_length(prompts)
    assert n >= 40  # random tails may share a first token
    cache = prefix_cache(model, prompts[0][:n])
    assert cache is not None
    cached = letter_probs(model, prompts, letters, pad_id=0, prefix=(n, cache))
    again = letter_probs(model, prompts[1:3], letters, pad_id=0, prefix=(n, cache))  # the cache is reused
    alone = [letter_probs(model, [p], letters, pad_id=0)[0] for p in prompts]
    for got, want in zip(cached, alone):
        assert got == pytest.approx(want, abs=1e-5)
    for got, want in zip(again, cached[1:3]):
        assert got == pytest.approx(want, abs=1e-6)

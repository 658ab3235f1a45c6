"""zhtune eval gen: BLEU-4 / ROUGE on hand-computed examples, parity with NLTK and rouge-chinese (the
libraries LLaMA-Factory uses), and the command end to end on a tiny model (report, resume, settings)."""

from __future__ import annotations

import json
import math
import random

import pytest

from tests.conftest import write_jsonl
from zhtune.cli import main
from zhtune.data.novelty import lcs_length
from zhtune.eval.gen import aggregate, bleu4, rouge, rouge_words, score_pair, words


def test_identical_strings_score_100_and_disjoint_0():
    assert score_pair("今天天气很好。", "今天天气很好。") == {
        "bleu-4": 100.0, "rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0, "exact_match": 100.0,
    }  # fmt: skip
    assert score_pair("abc", "xyz") == dict.fromkeys(
        ["bleu-4", "rouge-1", "rouge-2", "rouge-l", "exact_match"], 0.0
    )
    assert score_pair("", "参考答案") == dict.fromkeys(
        ["bleu-4", "rouge-1", "rouge-2", "rouge-l", "exact_match"], 0.0
    )
    assert score_pair(" 42\n", "42")["exact_match"] == 100.0  # compared stripped


def test_bleu4_worked_example():
    # hypothesis ABCDE vs reference ABCDF (characters): 1-grams 4/5, 2-grams 3/4, 3-grams 2/3, 4-grams 1/2;
    # equal lengths, no brevity penalty: BLEU = (4/5 * 3/4 * 2/3 * 1/2) ** (1/4) = 0.2 ** 0.25
    assert bleu4(list("ABCDE"), list("ABCDF")) == pytest.approx(0.2**0.25, abs=1e-12)
    # ABC vs ABD: p1 = 2/3, p2 = 1/2, p3 = 0/1 -> 1/(2*1), p4 = no 4-gram: 0/1 -> 1/(4*1)  (NIST smoothing)
    assert bleu4(list("ABC"), list("ABD")) == pytest.approx(
        (2 / 3 * 1 / 2 * 1 / 2 * 1 / 4) ** 0.25, abs=1e-12
    )
    # a short hypothesis pays the brevity penalty exp(1 - r/c): AB vs ABCD
    expected = math.exp(1 - 4 / 2) * (1 * 1 * (1 / 2) * (1 / 4)) ** 0.25
    assert bleu4(list("AB"), list("ABCD")) == pytest.approx(expected, abs=1e-12)


def test_rouge_worked_example():
    hyp, ref = ["我", "喜欢", "猫", "和", "狗"], ["我", "喜欢", "狗"]
    # ROUGE-1: sets {我,喜欢,猫,和,狗} vs {我,喜欢,狗}: P 3/5, R 3/3 -> F = 2*0.6*1/1.6 = 0.75
    # ROUGE-2: {我喜欢, 喜欢猫, 猫和, 和狗} vs {我喜欢, 喜欢狗}: P 1/4, R 1/2 -> F = 1/3
    # ROUGE-L: LCS 我 喜欢 狗 = 3: P 3/5, R 3/3 -> 0.75
    got = rouge(hyp, ref)
    assert got["rouge-1"] == pytest.approx(0.75, abs=1e-7)
    assert got["rouge-2"] == pytest.approx(1 / 3, abs=1e-7)
    assert got["rouge-l"] == pytest.approx(0.75, abs=1e-7)
    # ROUGE-N counts distinct n-grams (rouge-chinese), ROUGE-L every word: 猫 猫 猫 vs 猫
    assert rouge(["猫", "猫", "猫"], ["猫"])["rouge-1"] == pytest.approx(1.0, abs=1e-7)
    assert rouge(["猫", "猫", "猫"], ["猫"])["rouge-l"] == pytest.approx(0.5, abs=1e-7)
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
    # a sentence ends after 。 and at each newline; the two blank "sentences" leave empty words (library quirk)
    assert rouge_words(["第一段", "。", "\n", "\n", "第二段"]) == ["第一段", "。", "", "", "第二段"]


def test_same_numbers_as_nltk_and_rouge_chinese():
    """LLaMA-Factory's exact recipe, run with the real libraries (when installed)."""
    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
    rouge_chinese = pytest.importorskip("rouge_chinese")
    rng = random.Random(0)
    pieces = list("我们今天天气很好的是不在有人中大为上") + [
        "ab",
        " ",
        "。",
        "！",
        "Python",
        "1",
        "？",
        "\n",
        "......",
    ]
    pairs = [
        ("今天天气很好，我们去公园散步吧。", "今天天气不错，我们去公园走走吧！"),
        ("第一行\n\n第二行。", "第一行。\n第三行"),
    ]
    for _ in range(300):
        pairs.append(tuple("".join(rng.choice(pieces) for _ in range(rng.randint(1, 30))) for _ in range(2)))
    for pred, label in pairs:
        hyp, ref = words(pred), words(label)
        expected = nltk_bleu.sentence_bleu(
            [list(label)], list(pred), smoothing_function=nltk_bleu.SmoothingFunction().method3
        )
        assert bleu4(list(pred), list(label)) == pytest.approx(expected, abs=1e-12)
        if " ".join(hyp).split() and " ".join(ref).split():
            lib = rouge_chinese.Rouge().get_scores(" ".join(hyp), " ".join(ref))[0]
            got = rouge(hyp, ref)
            for key in ("rouge-1", "rouge-2", "rouge-l"):
                assert got[key] == pytest.approx(lib[key]["f"], abs=1e-12), (pred, label, key)


def test_aggregate_means_per_category():
    rows = [
        {"category": "a", "scores": score_pair("今天天气很好。", "今天天气很好。")},
        {"category": "a", "scores": score_pair("abc", "xyz")},
        {"category": "b", "scores": score_pair("x", "x")},
    ]
    result = aggregate(rows)
    assert result["metric"] == "gen" and result["counts"] == {"a": 2, "b": 1}
    assert result["scores"] == {"a": 0.5, "b": 1.0}  # ROUGE-L as a fraction, like every eval report
    assert result["metrics"]["exact_match"] == pytest.approx(200 / 3, abs=1e-4)
    assert result["overall"] == pytest.approx(result["metrics"]["rouge-l"] / 100)


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory, tiny_model_dir, train_file):
    """The tiny model briefly fully tuned on the skills, so its answers are non-trivial."""
    from zhtune.config import build_config
    from zhtune.train.config import TrainConfig
    from zhtune.train.sft import train

    values = dict(
        model=str(tiny_model_dir), data=[str(train_file)], output_dir=str(tmp_path_factory.mktemp("gen") / "run"),
        template="chatml", cutoff_len=64, method="full", max_steps=60, batch_size=8, lr=5e-3,
    )  # fmt: skip
    return train(build_config(TrainConfig, values), progress=False)


def test_eval_gen_end_to_end(tuned_run, skill_records, tmp_path, capsys):
    test = skill_records[1][:10]
    data = write_jsonl(tmp_path / "test.jsonl", test)
    args = ["eval", "gen", str(tuned_run), "--data", str(data), "--max-new-tokens", "8", "--no-progress"]
    assert main(args) == 0
    out = tuned_run / "eval"
    report = json.loads((out / "gen.json").read_text())
    assert {"metric", "overall", "scores", "counts"} <= set(report) and report["metric"] == "gen"
    predictions = [json.loads(x) for x in (out / "gen_predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 10 and report["n_scored"] == 10
    # the report is the mean of the per-record scores, each recomputable from the prediction
    per_record = {r["id"]: r for r in map(json.loads, (out / "gen_scores.jsonl").read_text().splitlines())}
    for p in predictions:
        assert {k: per_record[p["id"]][k] for k in report["metrics"]} == score_pair(
            p["prediction"], p["reference"]
        )
    expected_counts = {}
    for r in test:
        expected_counts[r["meta"]["category"]] = expected_counts.get(r["meta"]["category"], 0) + 1
    assert report["counts"] == dict(sorted(expected_counts.items()))
    for m in report["metrics"]:
        assert report["metrics"][m] == pytest.approx(sum(r[m] for r in per_record.values()) / 10, abs=1e-3)
    assert (
        "| **all** | 10 |" in (out / "gen.md").read_text() and "| **all** | 10 |" in capsys.readouterr().out
    )

    # references equal to the model's own answers score 100 on everything (non-empty answers)
    echoed = [
        {"id": p["id"], "messages": [*p["messages"], {"role": "assistant", "content": p["prediction"]}]}
        for p in predictions
        if p["prediction"].strip()
    ]
    assert echoed, "the tuned tiny model answered nothing"
    echo = write_jsonl(tmp_path / "echo.jsonl", echoed)
    other = tmp_path / "echo-eval"
    assert main(["eval", "gen", str(tuned_run), "--data", str(echo), "--output-dir", str(other),
                 "--max-new-tokens", "8", "--no-progress"]) == 0  # fmt: skip
    assert json.loads((other / "gen.json").read_text())["metrics"]["exact_match"] == 100.0


def test_eval_gen_resumes_and_refuses_other_settings(tuned_run, skill_records, tmp_path, capsys):
    data = write_jsonl(tmp_path / "test.jsonl", skill_records[1][:4])
    out = tmp_path / "eval"
    args = ["eval", "gen", str(tuned_run), "--data", str(data), "--output-dir", str(out), "--no-progress"]
    assert main([*args, "--max-new-tokens", "4"]) == 0
    first = (out / "gen_predictions.jsonl").read_text()
    capsys.readouterr()
    assert main([*args, "--max-new-tokens", "4"]) == 0  # nothing left to generate
    assert "4 already in" in capsys.readouterr().err
    assert (out / "gen_predictions.jsonl").read_text() == first
    assert main([*args, "--max-new-tokens", "5"]) == 1
    assert "max_new_tokens: 4 -> 5" in capsys.readouterr().err

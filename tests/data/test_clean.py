"""zhtune data clean: each step on small hand-written records, and the command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zhtune.cli import main
from zhtune.data import filters
from zhtune.data.clean import STEPS, CleanOptions, clean_files, resolve_steps
from zhtune.data.lang import detect_lang
from zhtune.errors import ZhtuneError

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "clean"


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _msgs(*pairs: str) -> list[dict[str, str]]:
    roles = ["user", "assistant"]
    return [{"role": roles[i % 2], "content": c} for i, c in enumerate(pairs)]


def only(*names: str) -> dict[str, bool]:
    """Step switches that turn on exactly ``names``."""
    return {s.name: s.name in names for s in STEPS}


# --------------------------------------------------------------------------- html


def test_html_page_to_markdown_removes_debris_and_fixes_fences():
    page = json.loads((FIXTURES / "sharegpt_html.json").read_text())[0]["conversations"][1]["value"]
    md = filters.html_to_markdown(page)
    assert md == (
        "Here is the **function**:\n\n```python\ndef double(x_1):\n    return x_1 * 2\n```\n\n"
        "1. Call it with a number.\n2. Print the result."
    )
    for debris in ("Copy code", "2 / 2", "<div", "<span", "svg"):
        assert debris not in md


def test_html_detection_leaves_code_and_html_answers_alone():
    assert not filters.looks_like_html("Use `<div>` for blocks")
    assert not filters.looks_like_html("```html\n<div><p>x</p></div>\n```")
    assert not filters.looks_like_html("if a < b and c > d")
    rendered = "<p>长城很长。</p><ul><li>一</li></ul>"
    assert filters.is_rendered_html(rendered, "介绍长城")
    # html that was asked for, or html that is a document, is the answer: never converted
    assert not filters.is_rendered_html(rendered, "写一段HTML代码")
    assert not filters.is_rendered_html("<html><body><p>x</p></body></html>", "介绍长城")
    assert not filters.is_rendered_html("const A = () => (<div><p>x</p></div>)", "介绍长城")
    # in a raw ShareGPT page dump any html outside code is the page's rendering
    assert filters.is_rendered_html("Sure:<br/>done", "", page_dump=True)


# --------------------------------------------------------------------------- filters


def test_fastchat_filters():
    assert filters.error_reply(_msgs("故事", "Too many requests in 1 hour. Try again later."))
    assert filters.error_reply(_msgs("故事", "从前有一条龙。")) is None
    assert filters.trim_trailing_user(_msgs("a", "b", "c")) == _msgs("a", "b")
    assert filters.too_short([{"role": "user", "content": "hi"}]) == "no answered user turn"
    assert filters.too_short(_msgs("表情", "😆")) is None  # an emoji is an answer
    assert "fewer than 5" in filters.too_short(_msgs("q", "a b"), min_reply_chars=5)


def test_belle_filters():
    assert "ChatGPT" in filters.self_reference(_msgs("你是谁", "我是ChatGPT。"))
    assert "GPT" in filters.self_reference(_msgs("你是谁", "我是GPT模型"))
    assert filters.self_reference(_msgs("Python 是什么", "一种编程语言。")) is None
    assert filters.incomplete_input(_msgs("总结以下文章：", "好的。"))
    assert filters.incomplete_input(_msgs("总结文章", "请提供需要总结的文章内容。"))
    assert (
        filters.incomplete_input(_msgs("鸟：啁啾：：诗人：", "吟诵")) is None
    )  # an analogy, not missing input
    en = "Spring is the season when the flowers bloom and the birds sing."
    assert filters.zh_instruction_en_reply(_msgs("描述一下春天。", en))
    assert filters.zh_instruction_en_reply(_msgs("把这句话翻译成英文：春天来了。", en)) is None
    assert filters.zh_instruction_en_reply(_msgs("写一个打印函数。", "def f():\n    print('hi')")) is None
    assert filters.zh_instruction_en_reply(_msgs("生成一个密码。", "b1jK90mh")) is None


@pytest.mark.parametrize(
    "reply",
    ["TOO MANY REQUESTS", "Something went wrong, please retry", "An error occurred.", "network error",
     "There was an error generating a response", "Load failed", "The message you submitted was too long",
     "Hmm...something seems to have gone wrong.", "Rate limit reached for requests", "Conversation not found"],
)  # fmt: skip
def test_error_reply_catches_every_listed_message(reply):
    assert filters.error_reply(_msgs("讲个故事", reply))  # (each has a word the cheap pre-test looks for)


@pytest.mark.parametrize(
    "reply",
    ["我是ChatGPT。", "As an AI language model, I cannot.", "as a language model I", "我是由OpenAI训练的",
     "I am an AI model developed by OpenAI", "作为一个人工智能语言模型，我不能", "我是开放人工智能开发的", "I use GPT-4"],
)  # fmt: skip
def test_self_reference_catches_every_listed_form(reply):
    assert filters.self_reference(_msgs("你是谁", reply))


def test_detect_lang():
    assert detect_lang("今天天气很好，我们去公园散步吧。") == "zh"
    assert detect_lang("這是繁體中文的句子。") == "zh"
    assert detect_lang("The weather is nice today, let us take a walk.") == "en"
    assert detect_lang("Bonjour, pouvez-vous me dire quelle est la capitale de la France ?") == "fr"
    assert detect_lang("こんにちは、お元気ですか？") == "ja"
    assert detect_lang("12 + 30 = 42") == "unknown"
    assert detect_lang("dum tsk, tsk tsk, dum tsk") == "en"  # never a non-Latin language for Latin text


# --------------------------------------------------------------------------- steps end to end


def test_sharegpt_html_file_through_default_steps(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    counts = clean_files(
        [str(FIXTURES / "sharegpt_html.json")], str(out), CleanOptions(workers=1), progress=False
    )
    kept = {r["id"]: r for r in _read(out)}
    assert sorted(kept) == ["page", "plain"]
    page = kept["page"]["messages"]
    assert [m["role"] for m in page] == ["user", "assistant"]  # trailing user turn trimmed
    assert page[1]["content"].startswith("Here is the **function**:\n\n```python\ndef double(x_1):")
    assert kept["plain"]["meta"]["lang"] == "zh"
    rejects = {r["record"].get("id"): r for r in _read(tmp_path / "out.rejects.jsonl")}
    assert rejects["ratelimit"]["step"] == "errors" and "Too many requests" in rejects["ratelimit"]["reason"]
    assert rejects["gpt-self"]["step"] == "self-ref"
    assert rejects["french"]["step"] == "lang" and "'fr'" in rejects["french"]["reason"]
    assert rejects["bad-roles"]["step"] == "read" and rejects["bad-roles"]["field"] == "messages[0].role"
    assert rejects["french"]["file"].endswith("sharegpt_html.json") and rejects["french"]["index"] == 5
    assert counts["html"].notes == {"converted": 1}
    assert counts["trailing-user"].notes == {"trimmed": 1}
    err = capsys.readouterr().err
    assert "| errors | 5 | 1 | 20.0% |" in err
    assert "| read | 6 | 1 | 16.7% |" in err


def test_alpaca_filters_t2s_and_dedup(tmp_path):
    out = tmp_path / "out.jsonl"
    counts = clean_files(
        [str(FIXTURES / "alpaca_mixed.json")],
        str(out),
        CleanOptions(workers=1),
        steps={"t2s": True},
        progress=False,
    )
    kept = {r["id"]: r for r in _read(out)}
    rejects = {r["id"]: r for r in _read(tmp_path / "out.rejects.jsonl")}
    # Traditional -> Simplified
    assert kept["alpaca_mixed-2"]["messages"][1]["content"] == "台湾的夜市以小吃闻名，例如蚵仔煎和珍珠奶茶。"
    assert kept["alpaca_mixed-1"]["messages"][0]["content"] == "翻译以下句子成英文。\n这是一个测试。"
    assert counts["t2s"].notes == {"converted": 2}
    # BELLE's filters, translation requests exempt
    assert rejects["alpaca_mixed-3"]["step"] == "incomplete"
    assert rejects["alpaca_mixed-4"]["step"] == "zh-en"
    assert "alpaca_mixed-5" in kept
    # a Chinese prompt asking for a Japanese translation is a Chinese record
    assert kept["alpaca_mixed-9"]["meta"]["lang"] == "zh"
    assert "alpaca_mixed-10" in kept
    # exact (punctuation differs) and near duplicates keep the first and name it
    assert rejects["alpaca_mixed-7"]["step"] == "exact-dup"
    assert rejects["alpaca_mixed-7"]["duplicate_of"] == "alpaca_mixed-6"
    assert rejects["alpaca_mixed-8"]["step"] == "exact-dup"  # only "！" vs "。" differs: normalised away
    assert counts["exact-dup"].removed == 2
    assert counts["exact-dup"].seen == 8


def test_near_duplicates_cluster(tmp_path):
    base = (
        "秋风起，落叶黄，大雁南飞排成行。稻谷飘香田野里，农家欢笑庆丰收。山间小路弯又长，枫叶红似火一样。"
        "夜来明月挂高空，桂花香气满院中。孩童围坐听故事，老人笑谈话年景。远山如黛近水清，一片金黄到天边。"
    )
    records = [
        {"id": "a", "instruction": "写一首关于秋天的诗。", "output": base},
        {"id": "b", "instruction": "写一首关于秋天的诗。", "output": base.replace("天边", "天际")},
        {"id": "c", "instruction": "写一首关于秋天的诗。", "output": base + "真美"},
        {
            "id": "d",
            "instruction": "介绍一下长江。",
            "output": "长江是中国最长的河流，流经十一个省级行政区。",
        },
        {"id": "e", "instruction": "写一首关于秋天的诗。", "output": base.replace("天边", "天际")},
    ]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    counts = clean_files([str(inp)], str(out), CleanOptions(workers=1), progress=False)
    assert [r["id"] for r in _read(out)] == ["a", "d"]
    rejects = {r["id"]: r for r in _read(tmp_path / "out.rejects.jsonl")}
    assert rejects["b"]["step"] == rejects["c"]["step"] == "near-dup"
    assert rejects["b"]["duplicate_of"] == rejects["c"]["duplicate_of"] == "a"
    assert 0.85 <= rejects["b"]["similarity"] < 1.0
    # an exact copy of a near duplicate gets the same near-duplicate verdict
    assert rejects["e"]["step"] == "near-dup" and rejects["e"]["duplicate_of"] == "a"
    assert counts["near-dup"].removed == 3
    from zhtune.data.clean import format_clean_summary

    assert "1 clusters, largest 4" in format_clean_summary(
        list(counts.values()), 2, "o", "r", 1.0, {"near-dup": (1, 4)}
    )


def test_resolve_steps_defaults_and_flags():
    assert resolve_steps({}, CleanOptions()) == [s.name for s in STEPS if s.default]
    assert "split" in resolve_steps({}, CleanOptions(tokenizer="tok"))
    assert "split" not in resolve_steps({"split": False}, CleanOptions(tokenizer="tok"))
    assert resolve_steps(only("lang"), CleanOptions()) == ["lang"]
    with pytest.raises(ZhtuneError, match="unknown clean step"):
        resolve_steps({"bogus": True}, CleanOptions())


# --------------------------------------------------------------------------- the command


def test_cli_end_to_end_and_errors(tmp_path, capsys):
    out = tmp_path / "clean.jsonl"
    code = main(
        [
            "data",
            "clean",
            str(FIXTURES / "sharegpt_html.json"),
            "-o",
            str(out),
            "--no-progress",
            "--workers",
            "1",
        ]
    )
    assert code == 1  # one record cannot be read: a reject, as in convert (the rest is cleaned)
    assert "exit status 1 because records were rejected" in capsys.readouterr().err
    assert main(["data", "clean", str(FIXTURES / "sharegpt_html.json"), "-o", str(out), "--no-progress",
                 "--workers", "1", "--allow-rejects", "--restart"]) == 0  # fmt: skip
    assert {r["id"] for r in _read(out)} == {"page", "plain"}
    steps = {r["step"] for r in _read(tmp_path / "clean.rejects.jsonl")}
    assert steps == {"read", "errors", "self-ref", "lang"}
    err = capsys.readouterr().err
    assert "cleaned 6 records -> 2 written" in err and "| step | in | removed | share | notes |" in err

    assert main(["data", "clean", str(tmp_path / "missing.json"), "-o", str(out), "--no-progress"]) == 1
    assert "missing.json" in capsys.readouterr().err
    bad = tmp_path / "not-a-tokenizer"
    bad.mkdir()
    code = main(
        ["data", "clean", str(FIXTURES / "sharegpt_html.json"), "-o", str(out), "--tokenizer", str(bad)]
    )
    assert code == 1
    assert f"cannot load a tokenizer from {bad}" in capsys.readouterr().err
    assert main(["data", "clean", str(FIXTURES / "sharegpt_html.json"), "-o", str(out), "--split"]) == 1
    assert "--tokenizer DIR" in capsys.readouterr().err


def test_output_is_deterministic_across_workers(tmp_path):
    """The same bytes for 1 worker (in process) and 2 forked workers, with tiny chunks so the
    window and the reordering are exercised."""
    import zhtune.data.clean as clean

    records = json.loads((FIXTURES / "alpaca_mixed.json").read_text()) * 7
    inp = tmp_path / "in.json"
    inp.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}.jsonl"
        old = clean.CHUNK
        clean.CHUNK = 3
        try:
            clean_files([str(inp)], str(out), CleanOptions(workers=workers), progress=False)
        finally:
            clean.CHUNK = old
        outputs.append((out.read_bytes(), (tmp_path / f"out{workers}.rejects.jsonl").read_bytes()))
    assert outputs[0] == outputs[1]
    assert len(outputs[0][0].splitlines()) == 6  # the first copy less 2 filtered and 2 duplicates


def _resume_data(tmp_path: Path) -> Path:
    """JSON Lines with every kind of outcome on both sides of an interruption: kept records,
    filtered ones, a bad line, exact and near duplicates of records kept before it."""
    poem = (
        "床前明月光，疑是地上霜。举头望明月，低头思故乡。这首诗写的是游子在静夜里思念故乡的心情，语言朴素自然。"
        "诗人先写月光洒在床前，好像地上结了一层白霜；再写抬头看见明月，低头便想起了远方的家乡和亲人。"
        "全诗只有二十个字，却把羁旅之思写得真切动人，所以千百年来一直被人们传诵。"
    )
    near = poem.replace("朴素", "质朴")
    rows = [{"id": f"q{i}", "instruction": f"第{i}个问题：{'为什么天空是蓝色的' * (i % 3 + 1)}？",
             "output": f"回答{i}：因为瑞利散射，短波长的光散射得更多。" * (i % 4 + 1)} for i in range(40)]  # fmt: skip
    rows[3] = {"id": "poem", "instruction": "解释这首诗", "output": poem}
    rows[5] = {"id": "near", "instruction": "解释这首诗", "output": near}  # near duplicate of poem
    rows[7] = {"id": "gpt", "instruction": "你是谁", "output": "我是ChatGPT，由OpenAI开发。"}
    later = [{**rows[3], "id": "poem-again"}, {**rows[5], "id": "near-again"}, {**rows[5], "id": "near-3"},
             {**rows[10], "id": "q10-again"}, {**rows[7], "id": "gpt-again"}]  # fmt: skip
    lines = [json.dumps(r, ensure_ascii=False) for r in rows[:20]]
    lines += ["{not json", *[json.dumps(r, ensure_ascii=False) for r in rows[20:] + later]]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _clean_interrupted(monkeypatch, inp, out, chunks: int) -> None:
    """Clean ``inp`` into ``out`` (one worker) and interrupt it (KeyboardInterrupt) once
    ``chunks`` chunks came back, as Ctrl-C would."""
    import zhtune.data.clean as clean

    real = clean.ordered_map

    def processed(*args, **kwargs):
        for n, result in enumerate(real(*args, **kwargs)):
            if n == chunks:
                raise KeyboardInterrupt
            yield result

    with monkeypatch.context() as m:
        m.setattr(clean, "ordered_map", processed)
        with pytest.raises(KeyboardInterrupt):
            clean_files([str(inp)], str(out), CleanOptions(workers=1), progress=False)


def test_interrupted_clean_resumes_to_the_same_files(tmp_path, monkeypatch, capsys):
    import zhtune.data.clean as clean

    monkeypatch.setattr(clean, "CHUNK", 4)
    monkeypatch.setattr(clean, "CHECKPOINT_SECONDS", 0.0)  # a checkpoint after every chunk
    inp = _resume_data(tmp_path)
    ref_counts = clean_files([str(inp)], str(tmp_path / "ref.jsonl"), CleanOptions(workers=1), progress=False)
    ref_table = capsys.readouterr().err.split("\n", 1)[1]  # (the first line has the timing)

    out = tmp_path / "out.jsonl"
    # interrupted 20 records in: before the bad line and every later duplicate
    _clean_interrupted(monkeypatch, inp, out, 5)
    assert not out.exists() and (tmp_path / "out.jsonl.partial").exists()
    state = json.loads((tmp_path / "out.jsonl.partial.json").read_text())
    assert state["read"] == 20 and state["written"] == 18  # less the GPT reply and the near duplicate
    seen: list[int] = []
    real_run = clean.Worker.run
    monkeypatch.setattr(
        clean.Worker, "run", lambda self, chunk: (seen.append(len(chunk)), real_run(self, chunk))[1]
    )
    counts = clean_files([str(inp)], str(out), CleanOptions(workers=1), progress=False)
    err = capsys.readouterr().err
    assert "resuming after 20 records (18 written)" in err
    assert sum(seen) == 46 - 20  # only the records after the checkpoint were cleaned again
    assert out.read_bytes() == (tmp_path / "ref.jsonl").read_bytes()
    assert (tmp_path / "out.rejects.jsonl").read_bytes() == (tmp_path / "ref.rejects.jsonl").read_bytes()
    assert err.split("\n", 2)[2].replace("out.", "ref.") == ref_table
    assert {k: vars(v) for k, v in counts.items()} == {k: vars(v) for k, v in ref_counts.items()}
    assert not list(tmp_path.glob("out.*partial*"))
    rejects = {r["id"]: r for r in _read(tmp_path / "out.rejects.jsonl") if r["id"]}
    assert rejects["poem-again"]["duplicate_of"] == "poem" and rejects["poem-again"]["step"] == "exact-dup"
    assert rejects["near-again"]["duplicate_of"] == "poem" and rejects["near-3"]["step"] == "near-dup"


def test_resume_starts_over_when_inputs_or_settings_change(tmp_path, monkeypatch, capsys):
    import zhtune.data.clean as clean

    monkeypatch.setattr(clean, "CHUNK", 4)
    monkeypatch.setattr(clean, "CHECKPOINT_SECONDS", 0.0)
    inp = _resume_data(tmp_path)
    out = tmp_path / "out.jsonl"
    _clean_interrupted(monkeypatch, inp, out, 3)
    capsys.readouterr()
    assert main(["data", "clean", str(inp), "-o", str(out), "--no-near-dup", "--no-progress"]) == 1  # its bad line
    assert "settings changed" in capsys.readouterr().err
    clean_files(
        [str(inp)], str(tmp_path / "ref.jsonl"), CleanOptions(workers=1), {"near-dup": False}, progress=False
    )
    assert out.read_bytes() == (tmp_path / "ref.jsonl").read_bytes()
    _clean_interrupted(monkeypatch, inp, out, 3)  # --restart ignores a valid checkpoint
    assert main(["data", "clean", str(inp), "-o", str(out), "--restart", "--no-progress", "--allow-rejects"]) == 0
    assert "resuming" not in capsys.readouterr().err


def test_resume_with_another_worker_count(tmp_path, monkeypatch, capsys):
    """The number of workers is not a setting that changes the output, so a run interrupted with
    one worker resumes with two (forked) and writes the files an uninterrupted run writes."""
    import zhtune.data.clean as clean

    monkeypatch.setattr(clean, "CHUNK", 4)
    monkeypatch.setattr(clean, "CHECKPOINT_SECONDS", 0.0)
    inp = _resume_data(tmp_path)
    clean_files([str(inp)], str(tmp_path / "ref.jsonl"), CleanOptions(workers=1), progress=False)
    out = tmp_path / "out.jsonl"
    _clean_interrupted(monkeypatch, inp, out, 4)
    capsys.readouterr()
    clean_files([str(inp)], str(out), CleanOptions(workers=2), progress=False)
    assert "resuming after 16 records" in capsys.readouterr().err
    assert out.read_bytes() == (tmp_path / "ref.jsonl").read_bytes()
    assert (tmp_path / "out.rejects.jsonl").read_bytes() == (tmp_path / "ref.rejects.jsonl").read_bytes()


def test_exit_status_follows_convert_for_unreadable_records(tmp_path):
    """Records a step removes are the point (exit 0); records that cannot be read are rejects, as
    in convert: exit 1 unless --allow-rejects, the readable ones cleaned either way."""
    from zhtune.cli import main

    good = [json.dumps({"instruction": f"把{i}写成中文数字。", "output": f"答案是第{i}个"}, ensure_ascii=False) for i in range(4)]
    path = tmp_path / "in.jsonl"
    path.write_bytes(("\n".join(good[:2]) + "\n").encode() + b'{"instruction": "\xff"}\n' + ("\n".join(good[2:]) + "\n").encode())
    out = tmp_path / "out.jsonl"
    assert main(["data", "clean", str(path), "-o", str(out), "--no-progress"]) == 1
    assert len(out.read_text(encoding="utf-8").splitlines()) == 4
    rejects = [json.loads(line) for line in (tmp_path / "out.rejects.jsonl").read_text().splitlines()]
    assert [(r["step"], r["line"]) for r in rejects] == [("read", 3)] and "invalid UTF-8" in rejects[0]["reason"]
    assert main(["data", "clean", str(path), "-o", str(out), "--no-progress", "--allow-rejects", "--restart"]) == 0

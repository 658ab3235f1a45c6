"""``zhtune data generate`` against a scripted OpenAI-compatible stub (real HTTP): parsing,
filters, novelty, retries, resuming without asking twice, the no-progress stop, the CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.options import flat
from tests.serving import zhtune_serve
from tests.stub_openai import Scripted, StubServer
from zhtune.cli import main
from zhtune.data.generate import (
    FILTERS,
    GenerateOptions,
    ParsedTask,
    SelfInstructPrompt,
    encode_prompt,
    generate,
    load_seeds,
    parse_tasks,
    sample_seeds,
)
from zhtune.data.synth import read_appended
from zhtune.errors import ZhtuneError

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "generate"
ZH_SEEDS = str(FIXTURES / "zh_seed_tasks.json")
EN_SEEDS = str(FIXTURES / "seed_tasks.jsonl")
ZH = SelfInstructPrompt.load("zh")


def novel(rng: random.Random, n: int = 14) -> str:
    """A made-up Chinese instruction that shares almost no character with any other."""
    return "请" + "".join(chr(0x4E00 + rng.randrange(20000)) for _ in range(n))


def tasks_reply(request: dict, seen: int, count: int = 7) -> str:
    """A good teacher reply: tasks 4..(3+count) with novel instructions (seeded by the request's
    own `seed`, so the same request gets the same reply)."""
    rng = random.Random(request.get("seed", seen))
    return "\n###\n".join(
        f"{k}. 指令：{novel(rng)}\n{k}. 输入：\n<无输入>\n{k}. 输出：\n回答{k}" for k in range(4, 4 + count)
    )


def options(server: StubServer, **kw) -> GenerateOptions:
    base = {
        "base_url": server.base_url,
        "model": "stub",
        "progress": False,
        "backoff": 0.01,
        "concurrency": 2,
    }
    return flat(GenerateOptions, **{**base, **kw})


def request_number(request: dict) -> int:
    return request["seed"]  # with --seed 0, the seed sent with request n is n


# --------------------------------------------------------------------------------------------- parsing


def test_parse_belle_format_half_and_full_width_colons():
    reply = """好的，下面是新的任务：
###
4. 指令：把下面的句子翻译成英文
4. 输入：
我爱北京天安门
4. 输出：
I love Tiananmen in Beijing.
###
5. 指令: 世界上最高的山峰是什么？
5. 输入: <无输入>
5. 输出: 珠穆朗玛峰
###
**6. 指令**：写一句关于秋天的诗
6、输入：无输入
6. 输出：秋风萧瑟天气凉
###
7. 指令：没有输出的任务
7. 输入：
<无输入>"""
    tasks = parse_tasks(reply, ZH.no_input_words)
    assert [t.number for t in tasks] == [4, 5, 6, 7]
    assert tasks[0].fields == {
        "instruction": "把下面的句子翻译成英文",
        "input": "我爱北京天安门",
        "output": "I love Tiananmen in Beijing.",
    }
    assert tasks[1].fields == {"instruction": "世界上最高的山峰是什么？", "input": "", "output": "珠穆朗玛峰"}
    assert tasks[2].get("instruction") == "写一句关于秋天的诗" and tasks[2].get("input") == ""
    assert "output" not in tasks[3].fields and tasks[3].raw.startswith("7. 指令")
    assert parse_tasks("抱歉，我无法完成这个请求。", ZH.no_input_words) == []
    en = parse_tasks("4. Instruction: Name a color.\n4. Input:\n<noinput>\n4. Output:\nBlue", ["<noinput>"])
    assert en[0].fields == {"instruction": "Name a color.", "input": "", "output": "Blue"}


def test_filters_each_reject_with_a_reason():
    en = SelfInstructPrompt.load("en")

    def first_failure(prompt, **fields):
        task = ParsedTask(4, {"input": "", **fields})
        return next(((f.name, r) for f in FILTERS if (r := f.check(task, prompt))), None)

    assert first_failure(ZH, instruction="写一首关于春天的诗", output="春眠不觉晓") is None
    assert first_failure(ZH, instruction="写一首关于春天的诗")[0] == "incomplete"
    assert first_failure(ZH, instruction="写诗", output="x") == (
        "length",
        "instruction has 2 chars (allowed 4-300)",
    )
    assert first_failure(ZH, instruction="描述这张图片里的内容", output="x")[0] == "blacklist"
    assert (
        first_failure(ZH, instruction="介绍一下你自己吧", output="作为一个 AI 语言模型，我……")[0]
        == "gpt_phrase"
    )
    assert first_failure(ZH, instruction="，写一首关于春天的诗", output="x")[0] == "start"
    # English: blacklisted words match whole words only (Alpaca): "map" but not "mapping"
    assert first_failure(en, instruction="Draw a map of the town center", output="x")[0] == "blacklist"
    assert first_failure(en, instruction="Explain what a mapping between two sets is", output="x") is None
    assert first_failure(en, instruction="Write a program that sorts a list", output="x")[0] == "start"
    assert first_failure(en, instruction="Hi", output="x")[0] == "length"


def test_seeds_and_prompt():
    seeds = load_seeds(ZH_SEEDS)
    assert len(seeds) == 7 and seeds[0].id == "seed_task_8" and seeds[0].task.input == "夏天"
    assert len(load_seeds(EN_SEEDS)) == 6
    chosen = sample_seeds(seeds, 3, seed=0, request=5)
    assert chosen == sample_seeds(seeds, 3, seed=0, request=5) != sample_seeds(seeds, 3, seed=0, request=6)
    text = encode_prompt(ZH, [s.task for s in chosen])
    assert "请你构思 10 个" in text and "3. 指令：" in text and "4. 指令：" not in text
    assert text.endswith("请接着写出第 4 到第 10 个任务，格式和上面完全相同。")
    no_input = next(s for s in seeds if not s.task.input)
    assert "1. 输入：\n<无输入>" in encode_prompt(ZH, [no_input.task])


def test_bad_seed_names_file_line_and_field(tmp_path):
    bad = tmp_path / "seeds.jsonl"
    bad.write_text(
        '{"instruction": "a", "instances": [{"input": "", "output": "b"}]}\n{"instruction": "c"}\n'
    )
    with pytest.raises(ZhtuneError, match=r"seeds.jsonl:2: field 'output'"):
        load_seeds(str(bad))


# --------------------------------------------------------------------------------------------- runs


def test_reaches_num_through_429_500_and_malformed_replies(tmp_path, capsys):
    plan = {
        1: Scripted(status=429, headers={"Retry-After": "0"}),
        2: Scripted(status=500),
        3: Scripted(body="{"),
    }

    def script(req, n):
        return plan.get(n) or tasks_reply(req, n)

    out = tmp_path / "out.jsonl"
    with StubServer(script) as server:
        rc = generate(ZH_SEEDS, str(out), options(server, num=10, price_in=1.0, price_out=2.0))
    assert rc == 0
    rows = read_appended(out)
    assert len(rows) == 10 and len({r["id"] for r in rows}) == 10
    meta = rows[0]["meta"]
    assert meta["gen_method"] == "self-instruct" and meta["source"] == "stub" and len(meta["seeds"]) == 3
    assert rows[0]["messages"][0]["content"] == meta["instruction"]  # <无输入>: no input line
    err = capsys.readouterr().err
    assert "3 retries" in err and "kept 10 new records" in err and "cost" in err


def test_near_copies_and_cut_tasks_are_rejected_with_reasons(tmp_path):
    seed_instruction = load_seeds(ZH_SEEDS)[1].task.instruction  # 给出下面词语的同义词

    def script(req, n):
        rng = random.Random(n)
        first = novel(rng)
        reply = (
            f"4. 指令：{first}\n4. 输入：<无输入>\n4. 输出：好\n###\n"
            f"5. 指令：{first}吗\n5. 输入：<无输入>\n5. 输出：好\n###\n"  # near copy of task 4
            f"6. 指令：{seed_instruction.replace('下面', '以下')}\n6. 输入：快乐\n6. 输出：高兴\n###\n"  # of a seed
            f"7. 指令：{novel(rng)}\n7. 输入：<无输入>\n7. 输出：被截"  # cut at max_tokens
        )
        return Scripted(text=reply, finish_reason="length")

    out = tmp_path / "out.jsonl"
    with StubServer(script) as server:
        rc = generate(ZH_SEEDS, str(out), options(server, num=2, concurrency=1))
    assert rc == 0 and len(read_appended(out)) == 2
    assert len(server.requests) == 2  # the run stops at --num: request 2's later tasks are not looked at
    rejects = read_appended(tmp_path / "out.rejects.jsonl")
    assert [r["filter"] for r in rejects] == ["duplicate", "duplicate", "truncated"]
    assert "rouge 0.9" in rejects[0]["reason"] and seed_instruction in rejects[1]["reason"]
    assert rejects[0]["raw"].startswith("5. 指令") and rejects[2]["request"] == 0


def test_no_progress_stops_after_patience_keeping_what_it_has(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    with StubServer(lambda req, n: tasks_reply({"seed": 42}, n)) as server:  # always the same 7 tasks
        rc = generate(ZH_SEEDS, str(out), options(server, num=50, patience=3, concurrency=1))
    assert rc == 1
    assert len(read_appended(out)) == 7 and len(server.requests) == 4
    err = capsys.readouterr().err
    assert "no progress: the last 3 requests kept nothing (rejected: duplicate 21)" in err
    assert "Kept 7 of --num 50" in err


def test_garbage_stops_at_max_requests(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    with StubServer(lambda req, n: "我不知道你在说什么。") as server:
        rc = generate(ZH_SEEDS, str(out), options(server, num=5, patience=100, max_requests=4))
    assert rc == 1 and len(server.requests) == 4 and not out.exists()
    rejects = read_appended(tmp_path / "out.rejects.jsonl")
    assert [r["filter"] for r in rejects] == ["parse"] * 4 and rejects[0]["raw"] == "我不知道你在说什么。"
    assert "reached --max-requests 4" in capsys.readouterr().err


def test_resume_asks_nothing_twice(tmp_path):
    out = tmp_path / "out.jsonl"
    # run 1 is "killed": the endpoint starts refusing (401, not retried) at its 4th request
    with StubServer(lambda req, n: tasks_reply(req, n) if n <= 3 else Scripted(status=401)) as first:
        with pytest.raises(ZhtuneError, match="refused a request"):
            generate(ZH_SEEDS, str(out), options(first, num=40, concurrency=1, temperature=0.7))
    answered = {request_number(r) for r in first.requests[:3]}
    assert len(read_appended(out)) == 21
    # a half-written last line, as a kill mid-write leaves it
    with out.open("a") as f:
        f.write('{"id": "self-instru')
    # run 2 ends at 25 with a request in flight (concurrency 2), run 3 goes on to 40
    with StubServer(tasks_reply) as second:
        assert generate(ZH_SEEDS, str(out), options(second, num=25, temperature=0.7)) == 0
    with StubServer(tasks_reply) as third:
        assert generate(ZH_SEEDS, str(out), options(third, num=40, temperature=0.7)) == 0
    asked_again = [request_number(r) for r in second.requests + third.requests]
    assert not answered & set(asked_again) and len(asked_again) == len(set(asked_again))
    rows = read_appended(out)
    assert len(rows) == 40 and len({r["id"] for r in rows}) == 40
    # the request left in flight by run 2 was answered then: run 3 read it from the cache
    assert len(third.requests) < 40 // 7 + 1


def test_cli_with_environment_endpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "en.jsonl"

    def script(req, n):
        text = req["messages"][0]["content"]
        assert "Instruction:" in text and "<noinput>" in text or "Input:\n" in text
        words = [w for w in "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()]
        rng = random.Random(n)
        return "\n###\n".join(
            f"{k}. Instruction: Explain {' '.join(rng.sample(words, 6))} number {n}{k}.\n{k}. Input:\n<noinput>\n"
            f"{k}. Output:\nAn answer."
            for k in range(4, 11)
        )

    with StubServer(script) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_MODEL", "stub-en")
        args = ["data", "generate", "--seeds", EN_SEEDS, "-o", str(out), "--num", "3", "--lang", "en"]
        rc = main([*args, "--novelty", "bm25", "--no-progress", "--backoff", "0.01"])
    assert rc == 0
    rows = read_appended(out)
    assert len(rows) == 3 and rows[0]["meta"]["source"] == "stub-en" and rows[0]["meta"]["lang"] == "en"
    assert "novelty bm25 > 0.7" in capsys.readouterr().err
    assert json.loads(out.read_text().splitlines()[0])["messages"][1]["content"] == "An answer."
    monkeypatch.delenv("OPENAI_BASE_URL")
    assert main(["data", "generate", "--seeds", EN_SEEDS, "-o", str(out), "--no-progress"]) == 1
    assert "no endpoint: pass --base-url" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- e2e


@pytest.fixture
def zhtune_server(tiny_model_dir, tmp_path):
    """``zhtune serve`` on the tiny random model (weights scaled up so replies vary), as a user
    starts it; yields its /v1 URL."""

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "tiny-teacher"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    model.config.max_position_embeddings = 4096  # RoPE: room for the ~1,800-token prompt
    model.save_pretrained(run)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(run)
    with zhtune_serve(run, tmp_path / "serve.log") as url:
        yield f"{url}/v1"


def test_end_to_end_against_zhtune_serve(zhtune_server, tmp_path, capsys):
    """The whole path against a real model server: the tiny model's garbage is rejected with
    reasons, and the no-progress stop ends the run cleanly."""
    out = tmp_path / "out.jsonl"
    args = ["data", "generate", "--seeds", ZH_SEEDS, "-o", str(out), "--base-url", zhtune_server]
    args += [
        "--model",
        "tiny-teacher",
        "--num",
        "5",
        "--patience",
        "2",
        "--max-tokens",
        "16",
        "--no-progress",
    ]
    assert main([*args, "--concurrency", "2"]) == 1
    err = capsys.readouterr().err
    assert "no progress: the last 2 requests kept nothing" in err and "Kept 0 of --num 5" in err
    rejects = read_appended(tmp_path / "out.rejects.jsonl")
    assert len(rejects) >= 2 and {r["filter"] for r in rejects} <= {
        "parse",
        "incomplete",
        "truncated",
        "length",
    }
    assert all(r["raw"] is not None for r in rejects)
    # the re-run reads every answered reply from the cache before asking anything new
    assert main([*args, "--concurrency", "2", "--patience", "1"]) == 1
    assert "from cache" in capsys.readouterr().err


def test_machine_examples_mix_kept_tasks_into_prompts_and_resume_from_cache(tmp_path, monkeypatch):
    import zhtune.data.generate as gen_module

    monkeypatch.setattr(gen_module, "MACHINE_LAG", 2)

    def script(req, n):  # 0 first, then 1 and 2 (reaching --num), then 3: sent when 0 was taken
        delay = {0: 0.0, 1: 0.3, 2: 0.3, 3: 0.6}.get(request_number(req), 0.0)
        return Scripted(text=tasks_reply(req, n), delay=delay)

    out = tmp_path / "out.jsonl"
    with StubServer(script) as first:
        assert generate(ZH_SEEDS, str(out), options(first, num=14, concurrency=4, machine_examples=2)) == 0
    # request n waits until every request below n - 2 is done: 3 went out after 0 was taken
    assert sorted(request_number(r) for r in first.requests) == [0, 1, 2, 3]
    asked3 = next(r for r in first.requests if request_number(r) == 3)["messages"][0]["content"]
    with StubServer(script) as second:
        assert generate(ZH_SEEDS, str(out), options(second, num=60, concurrency=4, machine_examples=2)) == 0
    # requests 2 and 3 (answered, not taken, in run 1) get the same prompts: read from the cache
    again = sorted(request_number(r) for r in second.requests)
    assert again[0] == 4 and len(again) == len(set(again))
    rows = read_appended(out)
    by_id = {r["id"]: r for r in rows}
    assert len(rows) == 60
    for row in rows:
        meta, n = row["meta"], row["meta"]["request"]
        machine = meta.get("machine_examples", [])
        assert len(meta["seeds"]) + len(machine) == 3
        assert len(machine) == (0 if n < 3 else 2)  # request 3 already draws from request 0's 7 tasks
        assert all(by_id[m]["meta"]["request"] < n - 2 for m in machine)
    row3 = next(r for r in rows if r["meta"]["request"] == 3)
    for m in row3["meta"]["machine_examples"]:
        assert by_id[m]["meta"]["instruction"] in asked3
    prompts = {request_number(r): r["messages"][0]["content"] for r in second.requests}
    checked = [r for r in rows if r["meta"]["request"] in prompts]
    assert len({r["meta"]["request"] for r in checked}) >= 4
    for row in checked:  # each prompt holds the kept tasks its records name
        for m in row["meta"]["machine_examples"]:
            assert by_id[m]["meta"]["instruction"] in prompts[row["meta"]["request"]]
    with pytest.raises(ZhtuneError, match="--machine-examples must be 0-3"):
        generate(ZH_SEEDS, str(out), options(second, machine_examples=4))

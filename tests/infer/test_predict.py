"""zhtune predict: one row per input, batching (left padding) changes nothing, a re-run generates only
what is missing, bad input is rejected with file and line, prompt-only inputs work."""

from __future__ import annotations

import json

import pytest

from tests.conftest import write_jsonl
from zhtune.cli import main
from zhtune.config import build_config
from zhtune.train.config import TrainConfig
from zhtune.train.sft import train

N = 12
GEN = ["--max-new-tokens", "6", "--no-progress"]


def run_cfg(model, data, out, **kw) -> TrainConfig:
    values = dict(model=str(model), data=[str(data)], output_dir=str(out), template="chatml", cutoff_len=64)
    return build_config(TrainConfig, {**values, **kw})


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, train_file):
    """A LoRA run on a briefly fully-tuned base (a random tiny model replies with newlines only,
    which would make comparing predictions vacuous)."""
    tmp = tmp_path_factory.mktemp("predict")
    base = train(
        run_cfg(
            tiny_model_dir, train_file, tmp / "base", method="full", max_steps=100, batch_size=16, lr=3e-3
        ),
        progress=False,
    )
    return train(run_cfg(base, train_file, tmp / "run", method="lora", max_steps=2, lr=1e-2), progress=False)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, skill_records):
    """Held-out questions of different lengths, with their answers (the references)."""
    return write_jsonl(tmp_path_factory.mktemp("in") / "test.jsonl", skill_records[1][:N])


def rows(path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}


def test_one_row_per_input_with_prompt_and_reference(lora_run, inputs, skill_records, tmp_path):
    out = tmp_path / "pred.jsonl"
    assert main(["predict", str(lora_run), str(inputs), "-o", str(out), *GEN]) == 0
    got = rows(out)
    assert len(out.read_text().splitlines()) == N and len(got) == N
    for rec in skill_records[1][:N]:
        row = got[rec["id"]]
        assert list(row) == ["id", "messages", "prediction", "reference", "meta"]
        assert row["messages"] == rec["messages"][:1]  # the prompt: everything before the last answer
        assert row["reference"] == rec["messages"][1]["content"]
        assert isinstance(row["prediction"], str)
        assert row["meta"]["category"] == rec["meta"]["category"]
    assert not (tmp_path / "pred.rejects.jsonl").exists()


def test_batch_of_4_gives_the_greedy_predictions_of_batch_1(lora_run, inputs, tmp_path):
    one, four = tmp_path / "b1.jsonl", tmp_path / "b4.jsonl"
    assert main(["predict", str(lora_run), str(inputs), "-o", str(one), "--batch-size", "1", *GEN]) == 0
    assert main(["predict", str(lora_run), str(inputs), "-o", str(four), "--batch-size", "4", *GEN]) == 0
    predictions = {k: r["prediction"] for k, r in rows(one).items()}
    assert predictions == {k: r["prediction"] for k, r in rows(four).items()}
    assert len(set(predictions.values())) > 1  # not one reply for every prompt


def test_rerun_generates_only_the_missing_rows(lora_run, inputs, tmp_path, monkeypatch, capsys):
    import zhtune.infer.predict as predict_module

    out = tmp_path / "pred.jsonl"
    assert main(["predict", str(lora_run), str(inputs), "-o", str(out), "--batch-size", "4", *GEN]) == 0
    lines = out.read_text(encoding="utf-8").splitlines()
    kept = lines[::2]
    # half the rows deleted, and the last row cut short as by a kill in the middle of a write
    out.write_text("\n".join(kept) + "\n" + lines[1][:25], encoding="utf-8")

    generated: list[int] = []
    real = predict_module.generate_replies

    def counting(model, tokenizer, prompts, *args):
        generated.append(len(prompts))
        return real(model, tokenizer, prompts, *args)

    monkeypatch.setattr(predict_module, "generate_replies", counting)
    capsys.readouterr()
    assert main(["predict", str(lora_run), str(inputs), "-o", str(out), "--batch-size", "4", *GEN]) == 0
    assert sum(generated) == N - len(kept)
    assert "removed an incomplete last line" in capsys.readouterr().err
    after = out.read_text(encoding="utf-8").splitlines()
    assert after[: len(kept)] == kept  # appended, nothing rewritten
    assert rows(out).keys() == {json.loads(line)["id"] for line in lines} and len(after) == N

    generated.clear()
    assert main(["predict", str(lora_run), str(inputs), "-o", str(out), *GEN]) == 0  # nothing left to do
    assert generated == []


def test_bad_input_lines_are_rejected_with_file_and_line(lora_run, skill_records, tmp_path, capsys):
    good = [json.dumps(r, ensure_ascii=False) for r in skill_records[1][:3]]
    empty_turn = json.dumps({"id": "e", "messages": [{"role": "user", "content": " "}]})
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join([good[0], "{not json", good[1], empty_turn, good[2]]) + "\n", encoding="utf-8")
    out = tmp_path / "pred.jsonl"

    assert main(["predict", str(lora_run), str(src), "-o", str(out), *GEN]) == 1
    err = capsys.readouterr().err
    assert f"{src}:2: invalid JSON" in err and f"{src}:4: field 'messages[0].content': empty user turn" in err
    rejects = [json.loads(line) for line in (tmp_path / "pred.rejects.jsonl").read_text().splitlines()]
    assert [(r["file"], r["line"]) for r in rejects] == [(str(src), 2), (str(src), 4)]
    assert all(r["reason"] for r in rejects)
    assert len(rows(out)) == 3  # the good records are predicted all the same
    assert main(["predict", str(lora_run), str(src), "-o", str(out), "--allow-rejects", *GEN]) == 0


def test_prompt_only_inputs_in_other_formats(lora_run, tmp_path):
    alpaca = write_jsonl(
        tmp_path / "alpaca.jsonl",
        [
            {"instruction": "Write 12 in Chinese numerals."},  # no answer at all
            {"instruction": "Write 13 in Chinese numerals.", "output": ""},  # an empty answer slot
            {"instruction": "Write 14 in Chinese numerals.", "output": "十四"},
        ],
    )
    sharegpt = write_jsonl(
        tmp_path / "sharegpt.jsonl",
        [{"id": "sg", "conversations": [{"from": "human", "value": "1"}, {"from": "gpt", "value": "一"},
                                        {"from": "human", "value": "2"}]}],
    )  # fmt: skip
    out = tmp_path / "pred.jsonl"
    assert main(["predict", str(lora_run), str(alpaca), str(sharegpt), "-o", str(out), *GEN]) == 0
    got = rows(out)
    assert set(got) == {"alpaca-1", "alpaca-2", "alpaca-3", "sg"}
    assert "reference" not in got["alpaca-1"] and "reference" not in got["alpaca-2"]
    assert got["alpaca-3"]["reference"] == "十四"
    assert [m["content"] for m in got["sg"]["messages"]] == ["1", "一", "2"]


def test_duplicate_ids_and_a_broken_output_file_are_errors(lora_run, inputs, tmp_path, capsys):
    out = tmp_path / "pred.jsonl"
    out.write_text('{"id": "x", "prediction": ""}\nnot a row\n{"id": "y"}\n', encoding="utf-8")
    assert main(["predict", str(lora_run), str(inputs), "-o", str(out), *GEN]) == 1
    assert f"{out}:2: not a prediction row" in capsys.readouterr().err

    dup = write_jsonl(
        tmp_path / "dup.jsonl", [{"id": "a", "messages": [{"role": "user", "content": "1"}]}] * 2
    )
    assert main(["predict", str(lora_run), str(dup), "-o", str(tmp_path / "d.jsonl"), *GEN]) == 1
    assert "duplicate id 'a' (first at" in capsys.readouterr().err


def test_device_cpu_and_auto_give_the_default_rows(lora_run, inputs, tmp_path, capsys):
    """``--device cpu`` and ``--device auto`` (the CPU here; dtype auto: fp32 on a CPU) write what
    the defaults write, and say where they ran."""
    import torch

    default = tmp_path / "default.jsonl"
    assert main(["predict", str(lora_run), str(inputs), "-o", str(default), "--batch-size", "4", *GEN]) == 0
    for device in ("cpu", "auto"):
        out = tmp_path / f"{device}.jsonl"
        capsys.readouterr()
        assert main(["predict", str(lora_run), str(inputs), "-o", str(out), "--device", device, *GEN[:2],
                     "--batch-size", "4", "--dtype", "auto", "--no-progress"]) == 0  # fmt: skip
        if device == "auto" and torch.cuda.is_available():
            continue  # bf16 on a GPU: not the fp32 rows
        assert f"generating {N} on cpu (fp32)" in capsys.readouterr().err
        assert rows(out) == rows(default)

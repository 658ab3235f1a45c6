"""Packing (no attention across samples), length-grouped batching, truncation reports and the
pre-training stage."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import write_jsonl
from zhtune.config import build_config
from zhtune.data.batching import epoch_batches
from zhtune.data.dataset import IGNORE_INDEX, model_inputs, pack_examples, pad_batch, tokenize_records
from zhtune.data.templates import get_template
from zhtune.models.tiny import build_tiny_model
from zhtune.models.token_loss import summed_token_loss
from zhtune.train.config import TrainConfig
from zhtune.train.sft import train


@pytest.fixture(scope="module")
def examples(skill_records, tiny_tokenizer):
    records = skill_records[0][:40]
    return tokenize_records(records, tiny_tokenizer, get_template("chatml"), 64).examples


def test_pack_examples_keeps_every_token_and_restarts_positions(examples):
    packs = pack_examples(examples, 96)
    assert len(packs) < len(examples)
    assert all(len(p["input_ids"]) <= 96 for p in packs)
    assert sorted(t for p in packs for t in p["input_ids"]) == sorted(
        t for e in examples for t in e["input_ids"]
    )
    for p in packs:
        starts = [i for i, pos in enumerate(p["position_ids"]) if pos == 0]
        assert starts[0] == 0
        assert all(p["labels"][i] == IGNORE_INDEX for i in starts)  # nothing predicts the next sample's start


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "gemma", "gpt_neox", "glm4"])
def test_packed_sample_logits_equal_the_sample_alone(family, examples, tiny_tokenizer):
    model = build_tiny_model(family, tiny_tokenizer).eval()
    lengths = {len(e["input_ids"]): e for e in examples}
    chosen = list(lengths.values())[:3]  # three samples of different lengths
    packed = pad_batch(pack_examples(chosen, 256), tiny_tokenizer.pad_token_id, multiple_of=1)
    with torch.no_grad():
        inputs = {k: v for k, v in model_inputs(packed).items() if k != "labels"}
        assert "attention_mask" not in inputs
        logits = model(**inputs, use_cache=False).logits[0]
        row = packed["position_ids"][0].tolist()
        starts = [i for i, pos in enumerate(row) if pos == 0]
        assert len(starts) == 3
        for start, end in zip(starts, [*starts[1:], len(row)]):
            alone = model(torch.tensor([lengths[end - start]["input_ids"]])).logits[0]
            torch.testing.assert_close(logits[start:end], alone, rtol=1e-4, atol=1e-5)
        # and the summed loss of the pack is the sum of the samples' own losses
        separate = sum(
            float(summed_token_loss(model, pad_batch([e], tiny_tokenizer.pad_token_id))) for e in chosen
        )
        assert float(summed_token_loss(model, packed)) == pytest.approx(separate, rel=1e-5)


def test_group_by_length_batches_similar_lengths_and_covers_every_sample():
    lengths = [(i * 37) % 200 + 1 for i in range(1000)]
    grouped = epoch_batches(1000, 8, seed=3, epoch=0, lengths=lengths)
    plain = epoch_batches(1000, 8, seed=3, epoch=0)
    assert sorted(i for b in grouped for i in b) == list(range(1000))
    assert grouped == epoch_batches(1000, 8, seed=3, epoch=0, lengths=lengths)  # deterministic: resumable
    assert grouped != epoch_batches(1000, 8, seed=3, epoch=1, lengths=lengths)

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(grouped) < 0.2 * padding(plain)


def cfg(tiny_model_dir, data, out, **kw) -> TrainConfig:
    values = dict(
        model=str(tiny_model_dir), data=[str(data)], output_dir=str(out), template="chatml", method="full",
        max_steps=30, batch_size=8, lr=3e-3, logging_steps=5, cutoff_len=64,
    )  # fmt: skip
    return build_config(TrainConfig, {**values, **kw})


def losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "trainer_log.jsonl").read_text().splitlines()]


def test_training_with_packing(tmp_path, tiny_model_dir, train_file, capsys):
    run = train(
        cfg(tiny_model_dir, train_file, tmp_path / "run", packing=True, cutoff_len=256, batch_size=2),
        progress=False,
    )
    results = json.loads((run / "train_results.json").read_text())
    assert results["train_examples"] == 256
    assert results["train_sequences"] < 256 / 3  # short samples share sequences
    curve = losses(run)
    assert curve[-1] < 0.7 * curve[0]  # as padded batches of as many tokens (see README)
    assert "256 train / 0 validation examples packed into" in capsys.readouterr().out


def test_truncations_are_counted_and_listed(tmp_path, tiny_model_dir, skill_records):
    long_reply = "一二三四五六七八九十" * 20
    records = [
        *skill_records[0][:30],
        {
            "id": "long-1",
            "messages": [{"role": "user", "content": "数数"}, {"role": "assistant", "content": long_reply}],
        },
    ]
    data = write_jsonl(tmp_path / "d.jsonl", records)
    run = train(cfg(tiny_model_dir, data, tmp_path / "run", max_steps=2), progress=False)
    assert json.loads((run / "train_results.json").read_text())["truncated"] == 1
    (row,) = [json.loads(line) for line in (run / "truncated.jsonl").read_text().splitlines()]
    assert row["id"] == "long-1" and row["kept"] == 64 and row["tokens"] > 200
    assert row["lost_response_tokens"] == row["tokens"] - 64  # the reply's end (and its <|im_end|>) was cut


def test_pretraining_stage_trains_on_text_blocks(tmp_path, tiny_model_dir, skill_records, capsys):
    texts = [
        {"text": r["messages"][0]["content"] + r["messages"][1]["content"]} for r in skill_records[0][:300]
    ]
    data = write_jsonl(tmp_path / "corpus.jsonl", texts)
    run = train(
        cfg(tiny_model_dir, data, tmp_path / "pt", stage="pt", format="text", cutoff_len=32), progress=False
    )
    banner = capsys.readouterr().out
    assert "zhtune train: pt full" in banner and "300 documents ->" in banner
    results = json.loads((run / "train_results.json").read_text())
    assert results["train_examples"] > 300 / 4  # ~15-token documents, 32-token blocks
    curve = losses(run)
    assert curve[-1] < 0.7 * curve[0]


def test_packing_is_refused_where_samples_cannot_be_kept_apart(tmp_path, tiny_tokenizer, train_file):
    from zhtune.errors import ZhtuneError

    base = tmp_path / "bloom"
    build_tiny_model("bloom", tiny_tokenizer).save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    with pytest.raises(ZhtuneError, match="packing.*not supported for model type 'bloom'.*group_by_length"):
        train(cfg(base, train_file, tmp_path / "run", packing=True), progress=False)


def test_packed_training_is_the_same_with_eager_attention(tmp_path, tiny_model_dir, train_file):
    runs = [
        train(
            cfg(tiny_model_dir, train_file, tmp_path / impl, packing=True, cutoff_len=256, batch_size=2,
                max_steps=4, logging_steps=1, attn_implementation=impl),
            progress=False,
        )
        for impl in ("sdpa", "eager")
    ]  # fmt: skip
    assert losses(runs[0]) == pytest.approx(losses(runs[1]), rel=1e-4)


def test_padding_free_batches_hold_the_same_tokens_in_no_more_rows(examples):
    """``padding_free``: each batch's samples packed into rows of the batch's padded length: the
    same tokens and trained labels, never more rows nor a longer row than padding them."""
    from zhtune.data.batching import micro_batches

    cuts = (64, 12, 20, 9, 33)  # samples of mixed lengths
    mixed = [{k: v[: cuts[i % 5]] for k, v in ex.items()} for i, ex in enumerate(examples)]
    padded = micro_batches(mixed, 4, 0, 0, 0, 0)
    packed = micro_batches(mixed, 4, 0, 0, 0, 0, pack_rows=True)
    fewer = 0
    for _ in range(len(mixed) // 4):
        (_, _, a), (_, _, b) = next(padded), next(packed)
        assert b["input_ids"].shape[1] == a["input_ids"].shape[1] and b["input_ids"].shape[0] <= 4
        fewer += b["input_ids"].shape[0] < a["input_ids"].shape[0]
        assert int(b["attention_mask"].sum()) == int(a["attention_mask"].sum())
        real = a["input_ids"][a["attention_mask"].bool()]
        assert sorted(b["input_ids"][b["attention_mask"].bool()].tolist()) == sorted(real.tolist())
        trained = (a["labels"][:, 1:] != IGNORE_INDEX).sum()
        assert int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) == int(trained)
    assert fewer > 0


def mixed_length_data(tmp_path, skill_records):
    """40 skill records, every third reply long (cut at cutoff_len), the others short: batches
    where short samples can share a row beside a long one."""
    records = [dict(r) for r in skill_records[0][:40]]
    for r in records[::3]:
        r["messages"] = [r["messages"][0], {"role": "assistant", "content": r["messages"][1]["content"] * 8}]
    return write_jsonl(tmp_path / "mixed.jsonl", records)


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_padding_free_training_follows_the_padded_curve(family, tmp_path, tiny_tokenizer, skill_records, monkeypatch):
    """The same samples in each step and the same loss as padded batches (fp32: to 1e-4), where
    the family packs (short samples share rows beside long ones); BLOOM, which cannot keep packed
    samples apart, is padded either way."""
    import zhtune.data.batching as batching

    train_file = mixed_length_data(tmp_path, skill_records)
    rows: list[list] = []  # each packed batch's rows
    pack = batching.pack_examples
    monkeypatch.setattr(batching, "pack_examples", lambda ex, n: rows.append(pack(ex, n)) or rows[-1])
    base = tmp_path / family
    build_tiny_model(family, tiny_tokenizer).save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    runs = [
        train(
            cfg(base, train_file, tmp_path / str(flag), batch_size=4, max_steps=5, logging_steps=1,
                padding_free=flag),
            progress=False,
        )
        for flag in (False, True)
    ]  # fmt: skip
    assert losses(runs[1]) == pytest.approx(losses(runs[0]), rel=1e-4)
    assert len(losses(runs[0])) == 5
    if family == "llama":
        assert len(rows) == 5 and sum(len(r) for r in rows) < 5 * 4  # some batches took fewer rows
    else:
        assert rows == []

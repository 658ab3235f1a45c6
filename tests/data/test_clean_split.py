"""Splitting long conversations on turn boundaries (FastChat's two bugs avoided), and the split
step through ``zhtune data clean --tokenizer``."""

from __future__ import annotations

import json

from zhtune.cli import main
from zhtune.data.split import split_conversation


class CharTokenizer:
    """One token per character, with offsets: token counts are string lengths."""

    def __call__(self, texts, add_special_tokens=False, return_offsets_mapping=False):
        single = isinstance(texts, str)
        batch = [texts] if single else texts
        enc = {"input_ids": [list(range(len(t))) for t in batch]}
        if return_offsets_mapping:
            enc["offset_mapping"] = [[(i, i + 1) for i in range(len(t))] for t in batch]
        return {k: v[0] for k, v in enc.items()} if single else enc


TOK = CharTokenizer()


def count(texts: list[str]) -> list[int]:
    return [len(t) for t in texts]


def record(*turns: str, system: str | None = None) -> dict:
    roles = ["user", "assistant"]
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": roles[i % 2], "content": c} for i, c in enumerate(turns)]
    return {"id": "r", "messages": messages, "meta": {"source": "x"}}


def contents(rec: dict) -> list[str]:
    return [m["content"] for m in rec["messages"]]


def test_fits_unchanged():
    rec = record("q1", "a1", "q2", "a2")
    result = split_conversation(rec, 100, count, TOK)
    assert result.records == [rec] and result.truncated == 0
    counted = []
    split_conversation(rec, 16, lambda t: counted.append(t) or count(t), TOK)
    assert counted == []  # 8 bytes cannot make more than 16 tokens: not tokenized
    assert split_conversation(rec, 15, lambda t: counted.append(t) or count(t), TOK).records == [rec]
    assert counted == [contents(rec)]


def test_splits_on_pairs_and_keeps_the_last_pair():
    # pairs of 10, 10, 10, 4 tokens; limit 20 -> [p1 p2] [p3] ... and the last pair is not lost
    rec = record("q" * 5, "a" * 5, "Q" * 5, "A" * 5, "x" * 5, "y" * 5, "z" * 2, "w" * 2, system="sys")
    result = split_conversation(rec, 23, count, TOK)  # 3 system tokens in every chunk
    chunks = result.records
    assert [c["id"] for c in chunks] == ["r-part1", "r-part2"]
    assert contents(chunks[0]) == ["sys", "q" * 5, "a" * 5, "Q" * 5, "A" * 5]
    assert contents(chunks[1]) == ["sys", "x" * 5, "y" * 5, "z" * 2, "w" * 2]
    assert [c["meta"]["part"] for c in chunks] == [[1, 2], [2, 2]]
    assert all(c["messages"][-1]["role"] == "assistant" for c in chunks)
    assert all(sum(count(contents(c))) <= 23 for c in chunks)
    assert chunks[0]["meta"]["source"] == "x" and "part" not in rec["meta"]  # the input is not mutated


def test_over_long_pair_is_truncated_not_dropped():
    rec = record("short q", "a" * 50, "q2", "a2", "q3", "b" * 3)
    result = split_conversation(rec, 20, count, TOK)
    chunks = result.records
    assert result.truncated == 1
    assert [contents(c) for c in chunks] == [
        ["short q", "a" * 13],  # the user turn whole, the reply cut to the rest of the budget
        ["q2", "a2", "q3", "b" * 3],
    ]
    assert chunks[0]["meta"]["truncated"] == {"tokens": 57, "max_tokens": 20}
    assert "truncated" not in chunks[1]["meta"]
    # both sides over half the budget: the user turn gets half, the reply the rest
    both = split_conversation(record("u" * 40, "v" * 40), 20, count, TOK).records
    assert contents(both[0]) == ["u" * 10, "v" * 10]


def test_trailing_user_turn_is_dropped():
    result = split_conversation(record("q" * 8, "a" * 8, "q" * 8), 20, count, TOK)
    assert [contents(c) for c in result.records] == [["q" * 8, "a" * 8]]
    assert result.dropped_turns == [2]


def test_split_step_through_the_cli(tmp_path, tiny_tokenizer, capsys):
    tok_dir = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(tok_dir)
    long_turns = []
    for i in range(6):
        long_turns += [f"问题{i}：" + "一二三四五" * 6, f"回答{i}：" + "六七八九十" * 6]
    rows = [
        {
            "id": "long",
            "messages": [
                {"role": ["user", "assistant"][k % 2], "content": c} for k, c in enumerate(long_turns)
            ],
        },
        {
            "id": "short",
            "messages": [{"role": "user", "content": "一加一？"}, {"role": "assistant", "content": "二"}],
        },
    ]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    args = ["data", "clean", str(inp), "-o", str(out), "--tokenizer", str(tok_dir), "--max-tokens", "150"]
    assert main([*args, "--no-progress", "--workers", "1"]) == 0
    kept = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    parts = [r for r in kept if r["id"].startswith("long-part")]
    assert len(parts) >= 2 and kept[-1]["id"] == "short"
    # every turn is in exactly one chunk, in order, and each chunk ends with a reply
    assert [m["content"] for r in parts for m in r["messages"]] == long_turns
    assert all(r["messages"][-1]["role"] == "assistant" for r in parts)
    for r in parts:
        ids = tiny_tokenizer([m["content"] for m in r["messages"]], add_special_tokens=False)["input_ids"]
        assert sum(map(len, ids)) <= 150
    assert f"| split | 2 | 0 | 0.0% | split 1, parts {len(parts)} |" in capsys.readouterr().err


def test_bytes_bound_holds_for_byte_level_bpe(tiny_tokenizer):
    """A byte-level BPE tokenizer with no normaliser never makes more tokens than bytes, so
    split skips tokenizing any record of at most max_tokens bytes; other tokenizers get the
    factor 2."""
    from tokenizers import normalizers

    from zhtune.data.split import BYTES_BOUND, tokens_per_byte_bound
    from zhtune.data.templates import encode_many

    assert tokens_per_byte_bound(tiny_tokenizer) == 1
    texts = [
        "床前明月光，疑是地上霜。",
        "e\u0301te\u0301 ﬁ ㎏ 🙂🙂 \t\n x" * 3,
        "1234567890",
        "<|im_end|>abc",
        "ß" * 50,
    ]
    for text, ids in zip(texts, encode_many(tiny_tokenizer, texts)):
        assert len(ids) <= len(text.encode())
    normalised = tiny_tokenizer.backend_tokenizer
    normalised.normalizer = normalizers.NFKC()
    try:
        assert tokens_per_byte_bound(tiny_tokenizer) == BYTES_BOUND
    finally:
        normalised.normalizer = None
    assert tokens_per_byte_bound(TOK) == BYTES_BOUND  # not a fast tokenizer: the safe factor

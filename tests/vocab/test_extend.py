"""``zhtune vocab extend`` on byte-level and SentencePiece bases: existing ids kept, English
unchanged, Chinese shorter, round trips exact, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import sentencepiece
from transformers import AutoTokenizer

from tests.conftest import write_jsonl
from tests.vocab.helpers import ZH, build_byte_level, english_lines, extend, heldout_lines, zh_lines
from zhtune.cli import main
from zhtune.errors import ZhtuneError
from zhtune.vocab import merge

NON_CJK = [
    "naïve café, “curly quotes” — and an em dash…",
    "Emoji 😀👍 and symbols ©®™ €100 ½",
    "Ελληνικά, русский текст, العربية, עברית, हिन्दी",
    "def f(x):\n    return {'a': [1, 2, 3]}  # 2024-05-01\t tabs  and   spaces",
]
"""Text without CJK characters: must tokenize exactly as before."""
FACTOR = 0.75
"""Chinese tokens per character after / before must be at most this on held-out lines."""


def tokens_per_char(tokenizer, lines: list[str]) -> float:
    return sum(len(tokenizer.encode(t, add_special_tokens=False)) for t in lines) / sum(map(len, lines))


def check_extension(base_dir, out_dir, max_factor: float = FACTOR) -> float:
    """The properties every extended tokenizer must have; returns the measured factor."""
    base, new = AutoTokenizer.from_pretrained(base_dir), AutoTokenizer.from_pretrained(out_dir)
    old_vocab, new_vocab = base.get_vocab(), new.get_vocab()
    assert len(new_vocab) > len(old_vocab)
    assert {t: new_vocab[t] for t in old_vocab} == old_vocab  # every old token keeps its id
    assert base.all_special_tokens == new.all_special_tokens
    assert base.all_special_ids == new.all_special_ids
    assert min(i for t, i in new_vocab.items() if t not in old_vocab) == max(old_vocab.values()) + 1
    for text in [*english_lines(), *NON_CJK, "\n".join(english_lines())]:
        assert base.encode(text) == new.encode(text), text
    held = heldout_lines()
    before, after = tokens_per_char(base, held), tokens_per_char(new, held)
    factor = after / before
    print(f"{out_dir}: Chinese tokens/char {before:.3f} -> {after:.3f} (x{factor:.2f})")
    assert factor <= max_factor

    def round_trip(tokenizer, text: str) -> bool:
        return tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text

    assert all(round_trip(new, t) for t in [*held, "混合 mixed 文本：GPT-4 和 LLaMA 模型。"])
    # exact wherever the base is (LLaMA's decoder drops one of several leading spaces)
    assert all(round_trip(new, t) for t in [*english_lines(), *NON_CJK] if round_trip(base, t))
    # the words the corpus repeats became single tokens
    assert len(new.tokenize("人工智能")) < len(base.tokenize("人工智能"))
    return factor


def test_byte_level_base_with_isolated_han(byte_base, byte_extended):
    out, report = byte_extended
    assert report["kind"] == "byte_level" and report["pre_tokenizer_relaxed"]
    factor = check_extension(byte_base, out)
    assert report["heldout"]["zh (held out)"]["after"]["per_char"] == pytest.approx(
        factor * report["heldout"]["zh (held out)"]["before"]["per_char"], rel=1e-6
    )
    # every added word's merges make it one token; intermediates are CJK prefixes only
    tok = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    new = AutoTokenizer.from_pretrained(out)
    base_size = len(AutoTokenizer.from_pretrained(byte_base).get_vocab())
    added = [t for t, i in tok["model"]["vocab"].items() if i >= base_size]
    words = [w for w in map(merge.from_byte_level, added) if w is not None]
    assert words and all(merge.is_chinese_word(w) for w in words)
    assert all(len(new.encode(w, add_special_tokens=False)) == 1 for w in words)


def test_gpt2_style_base_from_a_data_file(tmp_path, capsys):
    """A byte-level base whose regex already keeps Han runs together (Qwen, LLaMA-3) and whose
    special token sits after the vocabulary; the corpus is a data file (message contents), with a
    column renamed."""
    base = build_byte_level(tmp_path / "base", "gpt2")
    records = [{"instruction": "请回答", "zh_output": line} for line in zh_lines()]  # Alpaca, renamed column
    data = write_jsonl(tmp_path / "zh.jsonl", records)
    out = tmp_path / "out"
    code = main(["vocab", "extend", str(base), str(data), "-o", str(out), "--vocab-size", "2000",
                 "--heldout", "0.1", "--map", "zh_output=output", "--no-progress"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "| zh (held out) |" in printed and "tokens/char before" in printed
    assert "en (built-in sample)" in printed  # no English in this corpus
    report = json.loads((out / "vocab_extend.json").read_text())
    assert not report["pre_tokenizer_relaxed"]
    new = AutoTokenizer.from_pretrained(out)
    assert new.convert_tokens_to_ids("<|endoftext|>") == AutoTokenizer.from_pretrained(base).eos_token_id
    for text in [*english_lines(), *NON_CJK]:
        assert AutoTokenizer.from_pretrained(base).encode(text) == new.encode(text)
    zh = report["heldout"]["zh (held out)"]
    assert zh["after"]["per_char"] < FACTOR * zh["before"]["per_char"]
    assert zh["after"]["exact"] == zh["after"]["lines"]


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_base(model_type, tmp_path, sp_base):
    import sentencepiece as spm

    out = tmp_path / "out"
    report = extend(sp_base, out, model_type=model_type)
    assert report["kind"] == "sentencepiece"
    check_extension(sp_base, out, max_factor=FACTOR if model_type == "bpe" else 0.85)
    new = AutoTokenizer.from_pretrained(out)
    # the pad token transformers added after the SentencePiece pieces keeps its id ...
    assert (
        new.pad_token == "<pad>" and new.pad_token_id == AutoTokenizer.from_pretrained(sp_base).pad_token_id
    )
    # ... and the merged tokenizer.model agrees with tokenizer.json: same pieces, same ids, same encoding
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert sp.get_piece_size() == len(new)
    assert all(sp.id_to_piece(i) == t for t, i in new.get_vocab().items())
    for line in heldout_lines():
        assert sp.encode(line) == new.encode(line, add_special_tokens=False)
    assert (out / "chinese_sp.model").is_file()


def test_cli_errors(tmp_path, capsys, byte_base, byte_extended, sp_base):
    def run(*args: str) -> str:
        assert main(["vocab", *args, "--no-progress"] if args[0] == "extend" else ["vocab", *args]) == 1
        return capsys.readouterr().err

    out = str(tmp_path / "o")
    assert "base tokenizer directory not found" in run("extend", str(tmp_path / "nope"), str(ZH), "-o", out)
    (tmp_path / "empty").mkdir()
    assert "cannot load a tokenizer from" in run("extend", str(tmp_path / "empty"), str(ZH), "-o", out)
    assert "corpus file not found" in run("extend", str(byte_base), str(tmp_path / "x.txt"), "-o", out)
    (tmp_path / "c.pdf").write_text("x")
    assert "unsupported corpus file" in run("extend", str(byte_base), str(tmp_path / "c.pdf"), "-o", out)
    (tmp_path / "en.txt").write_text("\n".join(english_lines()))
    assert "no Chinese text" in run("extend", str(byte_base), str(tmp_path / "en.txt"), "-o", out)
    err = run("extend", str(byte_base), str(ZH), "-o", out, "--model-type", "unigram")
    assert "needs a SentencePiece-style base" in err
    assert "is not empty" in run("extend", str(byte_base), str(ZH), "-o", str(byte_extended[0]))
    assert "must not be the base" in run(
        "extend", str(byte_base), str(ZH), "-o", str(byte_base), "--overwrite"
    )
    unigram = tmp_path / "unigram"
    shutil.copytree(sp_base, unigram)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(english_lines()), model_prefix=str(unigram / "tokenizer"), vocab_size=300,
        model_type="unigram", minloglevel=2,
    )  # fmt: skip
    assert "SentencePiece unigram model; only BPE" in run("extend", str(unigram), str(ZH), "-o", out)
    # extending an extended tokenizer with the same corpus adds nothing
    err = run("extend", str(byte_extended[0]), str(ZH), "-o", out, "--vocab-size", "2000", "--heldout", "0.2")
    assert "nothing to add" in err


def test_chinese_word_rule():
    assert merge.is_chinese_word("中国") and merge.is_chinese_word(" 中国") and merge.is_chinese_word("，")
    assert merge.is_chinese_word("▁中国", merge.SP_SPACE)
    assert (
        not merge.is_chinese_word("中a") and not merge.is_chinese_word("") and not merge.is_chinese_word(" ")
    )
    assert not merge.is_chinese_word(" ，")  # a space only before U+3000-U+9FFF
    assert merge.from_byte_level(merge.to_byte_level(" 中国 ok")) == " 中国 ok"
    assert merge.from_byte_level("ä¸") is None  # part of a character
    with pytest.raises(ZhtuneError, match="model is 'WordPiece'"):
        merge.tokenizer_kind({"model": {"type": "WordPiece"}}, False)

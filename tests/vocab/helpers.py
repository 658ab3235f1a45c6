"""Helpers of the vocab tests. Base tokenizers built locally (no download): a byte-level BPE like zhtune's tiny one (every Han
character its own pre-token), a GPT-2/Qwen-style byte-level BPE, and a LLaMA-style SentencePiece
BPE with byte fallback; all trained on English text and a little Chinese, so most Chinese
characters and every Chinese word are missing. And the extended tokenizers made from them."""

from __future__ import annotations

import io
import json
from pathlib import Path

from zhtune.vocab.extend import ENGLISH_SAMPLE, ExtendOptions, extend_vocab

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "vocab"
ZH = FIXTURES / "zh.txt"
EN = FIXTURES / "en.txt"
HELDOUT = 0.2
"""extend holds out every 5th corpus line; :func:`heldout_lines` gives the same lines."""


def english_lines() -> list[str]:
    return [
        *ENGLISH_SAMPLE.read_text(encoding="utf-8").splitlines(),
        *EN.read_text(encoding="utf-8").splitlines(),
    ]


def zh_lines() -> list[str]:
    return [line for line in ZH.read_text(encoding="utf-8").splitlines() if line.strip()]


def heldout_lines() -> list[str]:
    return [line for i, line in enumerate(zh_lines(), 1) if i % round(1 / HELDOUT) == 0]


def base_texts() -> list[str]:
    """English with a few Chinese lines (the base knows some characters, no words)."""
    return english_lines() * 3 + zh_lines()[:4]


def build_byte_level(out: Path, style: str) -> Path:
    """``zhtune``: zhtune's tiny tokenizer; ``gpt2``: GPT-2's regex + ByteLevel, whose ``\\p{L}+``
    keeps runs of Han characters together (as Qwen's and LLaMA-3's do) and a ``<|endoftext|>``
    added after the vocabulary, as Qwen's specials are."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from zhtune.models.tiny import train_tokenizer

    if style == "zhtune":
        tokenizer = train_tokenizer(base_texts(), vocab_size=600)
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        )
        tok.train_from_iterator(base_texts(), trainer=trainer)
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False)
        tokenizer.add_special_tokens({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"})
    tokenizer.save_pretrained(out)
    return out


def build_sentencepiece(out: Path) -> Path:
    """A LLaMA-style tokenizer: a SentencePiece BPE (byte fallback, digits split, no
    normalization) in ``tokenizer.model``, loaded by transformers' LlamaTokenizer, plus a
    ``<pad>`` added after the SentencePiece vocabulary (as in many LLaMA-2 chat models)."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(base_texts()), model_writer=model, vocab_size=600, model_type="bpe",
        byte_fallback=True, character_coverage=0.99, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, hard_vocab_limit=False, minloglevel=2,
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    tokenizer = LlamaTokenizer.from_pretrained(out)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.save_pretrained(out)
    return out


def extend(base: Path, out: Path, corpus: Path = ZH, **kw) -> dict:
    opts = ExtendOptions(
        base=str(base), corpus=[str(corpus)], output=str(out), vocab_size=kw.pop("vocab_size", 2000),
        heldout=HELDOUT, progress=False, **kw,
    )  # fmt: skip
    return extend_vocab(opts)


def write_text_records(path: Path, lines: list[str]) -> Path:
    """Lines as ``{"text": ...}`` records (the ``text`` format, for stage pt)."""
    path.write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in lines), encoding="utf-8"
    )
    return path

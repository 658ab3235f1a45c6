"""``zhtune vocab extend``: train a Chinese vocabulary on a corpus and merge it into a base tokenizer.

Top to bottom: read the corpus (plain text files, or any data file zhtune reads: message contents)
into lines, holding out every k-th line; train a Chinese vocabulary on the training lines that
contain CJK characters, with the trainer that matches the base (a SentencePiece model, character
coverage 0.9995, for a SentencePiece-style base; a byte-level BPE with ``tokenizers`` and the
base's own pre-tokenizer for a byte-level base); merge the Chinese words the base lacks
(:mod:`zhtune.vocab.merge`); write a Hugging Face tokenizer directory; and compare the base and
the extended tokenizer on the held-out Chinese and English lines: tokens per character, tokens
per line, and round-trip exactness (``decode(encode(x)) == x``).
"""

from __future__ import annotations

import glob
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from zhtune.data.convert import iter_conversations
from zhtune.data.lang import guess_lang
from zhtune.data.readers import READERS, is_datasets_dir
from zhtune.errors import ZhtuneError
from zhtune.flags import flag
from zhtune.models.loading import load_tokenizer
from zhtune.vocab import merge

TEXT_SUFFIXES = (".txt", ".text", ".md")
"""Corpus files read as plain text, one line at a time; anything else goes through zhtune's readers."""
MAX_LINE_CHARS = 4000
"""Longer lines are cut into pieces this long (SentencePiece skips sentences over 16 KiB)."""
MAX_HELDOUT_LINES = 2000
"""Lines held out at most; once reached, every line trains."""
CHARACTER_COVERAGE = 0.9995
"""Share of the corpus' characters the SentencePiece vocabulary must cover (Chinese-LLaMA's value)."""
SP_SAMPLE_LINES = 2_000_000
"""SentencePiece trains on a random sample of at most this many lines."""
REPORT_FILE = "vocab_extend.json"
ENGLISH_SAMPLE = Path(__file__).resolve().parent.parent / "assets" / "vocab" / "english.txt"
"""Built-in English text for the table when the corpus holds out no English line."""


@dataclass
class ExtendOptions:
    """What ``zhtune vocab extend`` does (its command-line flags)."""

    base: str = flag(positional=True)
    """Base tokenizer directory (a Hugging Face model or tokenizer directory)."""
    corpus: list[str] = flag(positional=True)
    """Corpus files, directories or globs: .txt/.md (lines) or any data file zhtune reads."""
    output: str = flag(short="-o", required=True)
    """Directory to write the extended tokenizer to."""
    vocab_size: int = 20000
    """Size of the Chinese vocabulary to train; only its Chinese words the base lacks are added."""
    model_type: str = flag(default="bpe", choices=("bpe", "unigram"))
    """Chinese vocabulary model: bpe, or unigram (SentencePiece-style bases only)."""
    heldout: float = 0.01
    """Share of corpus lines held out of training for the before/after table (0: none)."""
    eval_text: list[str] = flag(default_factory=list, metavar="FILE")
    """Extra plain-text files to measure (each its own table row)."""
    format: str = "auto"
    """Data format of non-text corpus files (see `zhtune data convert`)."""
    mapping: dict[str, str] = flag(default_factory=dict, cli=False)
    """Column renames for non-text corpus files (from ``--map zh_output=output``)."""
    overwrite: bool = False
    """Write into a non-empty output directory."""
    progress: bool = True
    """Show progress bars."""


# --------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------
def corpus_files(paths: list[str]) -> list[str]:
    """Expand globs and directories into corpus files (text and data files), in a stable order."""

    known = (*TEXT_SUFFIXES, *READERS)
    out: list[str] = []
    for pattern in paths:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise ZhtuneError(f"no corpus files match {pattern}")
        for path in matches:
            if os.path.isdir(path) and not is_datasets_dir(path):
                found = sorted(
                    str(p)
                    for p in Path(path).rglob("*")
                    if p.is_file() and p.suffix.lower() in known and not p.name.startswith(".")
                )
                if not found:
                    raise ZhtuneError(f"no corpus files ({', '.join(known)}) in directory {path}")
                out.extend(found)
            elif not os.path.exists(path):
                raise ZhtuneError(f"corpus file not found: {path}")
            elif os.path.isdir(path) or Path(path).suffix.lower() in known:
                out.append(path)
            else:
                raise ZhtuneError(
                    f"unsupported corpus file {path}: use plain text ({', '.join(TEXT_SUFFIXES)}) or a "
                    f"data file ({', '.join(READERS)}, a datasets directory)"
                )
    return list(dict.fromkeys(out))


def iter_texts(path: str, fmt: str = "auto", mapping: dict[str, str] | None = None) -> Iterator[str]:
    """The texts of one corpus file: its lines (plain text) or its records' message contents."""
    if Path(path).suffix.lower() in TEXT_SUFFIXES and not os.path.isdir(path):
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            yield from f
        return

    for outcome in iter_conversations(path, fmt, mapping, chat=False):
        if outcome.record is not None:
            for message in outcome.record["messages"]:
                yield message["content"]


def iter_lines(texts: Iterator[str]) -> Iterator[str]:
    """Non-blank lines of ``texts``, cut to at most :data:`MAX_LINE_CHARS` characters."""
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                for i in range(0, len(line), MAX_LINE_CHARS):
                    yield line[i : i + MAX_LINE_CHARS]


@dataclass
class Corpus:
    """The corpus as read: training lines (with CJK) in a file, and the held-out lines."""

    train_file: Path
    heldout: list[str]
    files: int
    lines: int
    chars: int
    train_lines: int


def read_corpus(opts: ExtendOptions, workdir: Path) -> Corpus:
    """Stream the corpus once: every k-th line is held out, the other lines that contain a CJK
    character are written to ``workdir/train.txt`` (memory stays bounded)."""
    from tqdm.auto import tqdm

    if not 0 <= opts.heldout < 1:
        raise ZhtuneError(f"--heldout must be in [0, 1), got {opts.heldout}")
    files = corpus_files(opts.corpus)
    every = round(1 / opts.heldout) if opts.heldout > 0 else 0
    train_file = workdir / "train.txt"
    heldout: list[str] = []
    lines = chars = train_lines = 0
    with (
        train_file.open("w", encoding="utf-8") as out,
        tqdm(
            desc="read corpus", unit=" lines", disable=not opts.progress, file=sys.stderr, mininterval=0.5
        ) as bar,
    ):
        for path in files:
            bar.set_postfix_str(Path(path).name, refresh=False)
            for line in iter_lines(iter_texts(path, opts.format, opts.mapping)):
                lines += 1
                chars += len(line)
                bar.update(1)
                if every and lines % every == 0 and len(heldout) < MAX_HELDOUT_LINES:
                    heldout.append(line)
                elif any(merge.is_cjk(c) for c in line):
                    out.write(line + "\n")
                    train_lines += 1
    if not train_lines:
        raise ZhtuneError(
            f"no Chinese text to train on in {', '.join(opts.corpus)} (no line with CJK characters)"
        )
    return Corpus(train_file, heldout, len(files), lines, chars, train_lines)


# --------------------------------------------------------------------------------------------
# Training the Chinese vocabulary
# --------------------------------------------------------------------------------------------
def train_sentencepiece(
    train_file: Path, vocab_size: int, model_type: str, add_dummy_prefix: bool = True
) -> Any:
    """A Chinese SentencePiece model (proto) trained on ``train_file``: no normalization (pieces
    must match the base's raw text), spaces kept, digits split, character coverage 0.9995."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            input=str(train_file),
            model_writer=buffer,
            model_type=model_type,
            vocab_size=vocab_size,
            character_coverage=CHARACTER_COVERAGE,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=add_dummy_prefix,
            split_digits=True,
            hard_vocab_limit=False,  # a small corpus gives fewer pieces instead of an error
            input_sentence_size=SP_SAMPLE_LINES,
            shuffle_input_sentence=True,
            max_sentence_length=1 << 14,
            num_threads=os.cpu_count() or 1,
            bos_id=-1,
            eos_id=-1,
            minloglevel=2,
        )
    except RuntimeError as err:
        hint = " (raise --vocab-size)" if "required_chars" in str(err) else ""
        raise ZhtuneError(f"SentencePiece training failed: {str(err).splitlines()[-1]}{hint}") from None
    proto = pb.ModelProto()
    proto.ParseFromString(buffer.getvalue())
    return proto


def _bare_tokenizer_json(normalizer: Any, pre_tokenizer: Any) -> str:
    return json.dumps(
        {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
            "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": None, "decoder": None,
            "model": {
                "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                "vocab": {}, "merges": [],
            },
        }
    )  # fmt: skip


def train_byte_level(
    train_file: Path, vocab_size: int, normalizer: Any, pre_tokenizer: Any, progress: bool
) -> dict[str, Any]:
    """A byte-level BPE trained with ``tokenizers`` on ``train_file``, pre-tokenized exactly as
    the (extended) base pre-tokenizes, so every word it learns fits the base's pre-tokens."""
    from tokenizers import Tokenizer, pre_tokenizers, trainers

    tokenizer = Tokenizer.from_str(_bare_tokenizer_json(normalizer, pre_tokenizer))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=progress,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train([str(train_file)], trainer)
    return json.loads(tokenizer.to_str())


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------
@dataclass
class TextStats:
    """How a tokenizer does on some lines."""

    lines: int
    chars: int
    tokens: int
    exact: int
    """Lines for which decode(encode(line)) == line."""

    @property
    def per_char(self) -> float:
        return self.tokens / max(self.chars, 1)

    @property
    def per_line(self) -> float:
        return self.tokens / max(self.lines, 1)


def measure(tokenizer: Any, lines: list[str]) -> TextStats:
    """Tokens (no special tokens added) and round-trip exactness of ``lines``."""
    tokens = exact = 0
    for i in range(0, len(lines), 256):
        chunk = lines[i : i + 256]
        ids = tokenizer(chunk, add_special_tokens=False)["input_ids"]
        texts = tokenizer.batch_decode(ids, clean_up_tokenization_spaces=False)
        tokens += sum(map(len, ids))
        exact += sum(a == b for a, b in zip(chunk, texts))
    return TextStats(len(lines), sum(map(len, lines)), tokens, exact)


def eval_sets(heldout: list[str], eval_text: list[str]) -> dict[str, list[str]]:
    """Named sets of lines for the table: held-out Chinese and English, then each eval file."""

    sets: dict[str, list[str]] = {"zh (held out)": [], "en (held out)": []}
    for line in heldout:
        lang = guess_lang(line)
        if lang in ("zh", "en"):
            sets[f"{lang} (held out)"].append(line)
    if not sets["en (held out)"] and not eval_text:
        sets["en (built-in sample)"] = list(iter_lines(iter([ENGLISH_SAMPLE.read_text(encoding="utf-8")])))
    for path in eval_text:
        if not os.path.isfile(path):
            raise ZhtuneError(f"--eval-text file not found: {path}")
        sets[Path(path).name] = list(iter_lines(iter_texts(path)))
    return {name: lines for name, lines in sets.items() if lines}


def comparison_table(rows: dict[str, tuple[TextStats, TextStats]]) -> str:
    """A Markdown table of tokens/char, tokens/line and round trips, before -> after."""
    out = [
        "| text | lines | chars | tokens/char before | after | tokens/line before | after "
        "| round trip before | after |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, (a, b) in rows.items():
        change = f" ({b.per_char / a.per_char - 1:+.0%})" if a.tokens else ""
        out.append(
            f"| {name} | {a.lines:,} | {a.chars:,} | {a.per_char:.3f} | {b.per_char:.3f}{change} "
            f"| {a.per_line:.1f} | {b.per_line:.1f} | {a.exact / a.lines:.1%} | {b.exact / b.lines:.1%} |"
        )
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------
OUTPUT_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "chat_template.jinja", "chinese_sp.model", "chinese_bpe.json", REPORT_FILE,
)  # fmt: skip
"""Files a previous run may have left in the output directory (removed with --overwrite)."""


def _check_output(path: Path, base: str, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise ZhtuneError(f"output {path} exists and is not a directory")
    if path.resolve() == Path(base).resolve():
        raise ZhtuneError("the output directory must not be the base directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ZhtuneError(f"output directory {path} is not empty; choose another or pass --overwrite")


def require_sentencepiece() -> None:
    """Raise a clear error unless sentencepiece and protobuf (for its model proto) are installed."""
    try:
        from sentencepiece import sentencepiece_model_pb2  # noqa: F401  (imports protobuf)
    except ImportError:
        raise ZhtuneError(
            "a SentencePiece-style base needs sentencepiece and protobuf: "
            "pip install -c constraints.txt 'zhtune[vocab]'"
        ) from None


def load_base(path: str) -> Any:
    """The base tokenizer (a fast tokenizer, with a ``tokenizer.json`` behind it)."""

    if not Path(path).is_dir():
        raise ZhtuneError(f"base tokenizer directory not found: {path}")
    tokenizer = load_tokenizer(path)
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ZhtuneError(f"{path}: not a fast (tokenizers) tokenizer; vocabulary expansion needs one")
    return tokenizer


def check_loaded(tokenizer: Any, tok_json: dict[str, Any], lines: list[str]) -> None:
    """Raise if the tokenizer as transformers loads it (some classes rebuild it from the
    vocabulary and merges) encodes ``lines`` differently from the merged ``tok_json``."""
    from tokenizers import Tokenizer

    merged = Tokenizer.from_str(json.dumps(tok_json))
    expected = [e.ids for e in merged.encode_batch(lines, add_special_tokens=False)]
    got = tokenizer(lines, add_special_tokens=False)["input_ids"] if lines else []
    bad = [line for line, a, b in zip(lines, expected, got) if a != b]
    if bad:
        raise ZhtuneError(
            f"internal error: {type(tokenizer).__name__} as loaded encodes {len(bad)} of {len(lines)} lines "
            f"differently from the merged tokenizer.json, e.g. {bad[0][:60]!r}"
        )


def _write_vocab_files(out: Path, model: dict[str, Any]) -> None:
    """Rewrite ``vocab.json``/``merges.txt`` (GPT-2 style copies of the model) where present."""
    if (out / "vocab.json").exists():
        (out / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    if (out / "merges.txt").exists():
        pairs, _ = merge._merge_pairs(model)
        lines = ["#version: 0.2", *(f"{a} {b}" for a, b in pairs)]
        (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def extend_vocab(opts: ExtendOptions) -> dict[str, Any]:
    """Run ``zhtune vocab extend``; returns the report (also written to ``OUT/vocab_extend.json``)."""
    started = time.time()
    say = print
    base = load_base(opts.base)
    out = Path(opts.output)
    _check_output(out, opts.base, opts.overwrite)
    if opts.model_type not in ("bpe", "unigram"):
        raise ZhtuneError(f"--model-type must be bpe or unigram, got {opts.model_type!r}")
    if opts.vocab_size < 100:
        raise ZhtuneError(f"--vocab-size must be at least 100, got {opts.vocab_size}")
    sp_model_path = Path(opts.base) / "tokenizer.model"
    tok_json = json.loads(base.backend_tokenizer.to_str())
    kind = merge.tokenizer_kind(tok_json, sp_model_path.is_file())
    if kind == "byte_level" and opts.model_type != "bpe":
        raise ZhtuneError(
            "--model-type unigram needs a SentencePiece-style base; a byte-level BPE base takes bpe"
        )
    if kind == "sentencepiece":
        require_sentencepiece()
    proto = None
    if kind == "sentencepiece" and sp_model_path.is_file():
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto()
        try:
            proto.ParseFromString(sp_model_path.read_bytes())
        except Exception as err:  # protobuf's DecodeError
            raise ZhtuneError(f"{sp_model_path} is not a SentencePiece model: {err}") from None
        merge.check_sentencepiece_proto(proto)
    base_size = merge.next_free_id(tok_json)

    with tempfile.TemporaryDirectory(prefix="zhtune-vocab-") as tmp:
        corpus = read_corpus(opts, Path(tmp))
        trainer = "SentencePiece" if kind == "sentencepiece" else "byte-level BPE"
        say(
            f"zhtune vocab extend: {kind.replace('_', '-')} base {opts.base} ({base_size:,} ids)\n"
            f"  corpus: {corpus.files} file(s), {corpus.lines:,} lines, {corpus.chars:,} chars; "
            f"{corpus.train_lines:,} Chinese lines train, {len(corpus.heldout):,} held out\n"
            f"  training a {opts.vocab_size:,}-token {opts.model_type} {trainer} vocabulary ...",
            flush=True,
        )
        t0 = time.time()
        relaxed = False
        if kind == "sentencepiece":
            dummy = proto.normalizer_spec.add_dummy_prefix if proto is not None else True
            trained = train_sentencepiece(corpus.train_file, opts.vocab_size, opts.model_type, dummy)
            words = merge.sentencepiece_words(trained)
            trained_size = len(trained.pieces)
        else:
            relaxed = merge.join_han_runs(tok_json)  # before training: the trainer uses it
            trained = train_byte_level(
                corpus.train_file,
                opts.vocab_size,
                tok_json.get("normalizer"),
                tok_json.get("pre_tokenizer"),
                opts.progress,
            )
            words = merge.byte_level_words(trained)
            trained_size = len(trained["model"]["vocab"])
        train_seconds = time.time() - t0

    # -- merge --------------------------------------------------------------------------------
    if kind == "sentencepiece":
        added = merge.extend_sentencepiece_json(tok_json, words)
        if proto is not None:
            merge.extend_sentencepiece_proto(proto, added, tok_json)
    else:
        added = merge.extend_byte_level(tok_json, words)
    if not added:
        raise ZhtuneError(
            f"the base already has every Chinese word the corpus taught ({len(words):,} words); nothing to add"
        )

    # -- write --------------------------------------------------------------------------------
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUT_FILES:  # a previous run's (--overwrite)
        (out / name).unlink(missing_ok=True)
    base.save_pretrained(str(out))
    (out / "tokenizer.json").write_text(json.dumps(tok_json, ensure_ascii=False, indent=2), encoding="utf-8")
    _write_vocab_files(out, tok_json["model"])
    if proto is not None:
        (out / "tokenizer.model").write_bytes(proto.SerializeToString())
    if kind == "sentencepiece":
        (out / "chinese_sp.model").write_bytes(trained.SerializeToString())
    else:
        (out / "chinese_bpe.json").write_text(json.dumps(trained, ensure_ascii=False), encoding="utf-8")

    extended = load_base(str(out))
    new_vocab = extended.get_vocab()
    moved = [t for t, i in base.get_vocab().items() if new_vocab.get(t) != i]
    if moved:  # cannot happen by construction; never hand out a tokenizer that would
        raise ZhtuneError(f"internal error: {len(moved)} existing tokens changed id (e.g. {moved[:3]})")

    # -- measure ------------------------------------------------------------------------------
    sets = eval_sets(corpus.heldout, opts.eval_text)
    check_loaded(extended, tok_json, [line for lines in sets.values() for line in lines])
    rows = {name: (measure(base, lines), measure(extended, lines)) for name, lines in sets.items()}
    first, last = new_vocab[added[0]], new_vocab[added[-1]]
    say(
        f"  trained {trained_size:,} tokens in {train_seconds:.1f} s, {len(words):,} of them Chinese words; "
        f"{len(added):,} new tokens added (ids {first:,}-{last:,})\n"
        + (
            "  pre-tokenizer: the base split every Han character apart; runs of Han characters now stay "
            "together (text without Han characters pre-tokenizes as before)\n"
            if relaxed
            else ""
        )
        + f"  wrote {out} ({merge.next_free_id(tok_json):,} ids)\n\n"
        "Held-out text, base -> extended tokenizer (lower tokens/char is better):\n\n"
        + comparison_table(rows)
    )
    report = {
        "base": str(opts.base),
        "kind": kind,
        "model_type": opts.model_type,
        "vocab_size": opts.vocab_size,
        "base_ids": base_size,
        "added": len(added),
        "total_ids": merge.next_free_id(tok_json),
        "pre_tokenizer_relaxed": relaxed,
        "corpus": {k: v for k, v in asdict(corpus).items() if k not in ("train_file", "heldout")},
        "heldout": {
            name: {
                "before": asdict(a) | {"per_char": a.per_char},
                "after": asdict(b) | {"per_char": b.per_char},
            }
            for name, (a, b) in rows.items()
        },
        "seconds": round(time.time() - started, 2),
    }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return report

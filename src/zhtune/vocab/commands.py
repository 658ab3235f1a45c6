"""``zhtune vocab extend|resize``: the vocabulary stage's subcommands, registered by the stage,
with ``extend``'s flags generated from :class:`ExtendOptions`."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from zhtune.data.inputs import InputOptions
from zhtune.flags import add_options, options_from
from zhtune.vocab.extend import ExtendOptions


def cmd_extend(args: argparse.Namespace) -> int:
    from zhtune.vocab.extend import extend_vocab

    mapping = options_from(InputOptions, args).mapping()
    extend_vocab(dataclasses.replace(options_from(ExtendOptions, args), mapping=mapping))
    return 0


def cmd_resize(args: argparse.Namespace) -> int:
    from zhtune.vocab.resize import resize_command

    return resize_command(args.model, args.tokenizer, args.output, overwrite=args.overwrite)


def register(sub: Any, full_help_for: str | None = None) -> None:
    """Add ``zhtune vocab`` and its subcommands to the top-level subparsers ``sub``."""
    v = sub.add_parser("vocab", help="Chinese vocabulary expansion: extend a tokenizer, resize a model for it")
    vsub = v.add_subparsers(dest="vocab_command", metavar="VOCAB_COMMAND")
    x = vsub.add_parser(
        "extend",
        help="train a Chinese vocabulary on a corpus and merge it into a base tokenizer",
        description="Train a Chinese vocabulary on CORPUS (SentencePiece for a SentencePiece-style base such as "
        "LLaMA-1/2, byte-level BPE for a byte-level base such as Qwen or LLaMA-3), append the Chinese words the "
        "base lacks (every existing id and special token unchanged), write a Hugging Face tokenizer directory, "
        "and print tokens per character before and after on held-out Chinese and English lines.",
    )
    add_options(x, ExtendOptions)
    add_options(x, InputOptions, skip=("format", "rejects", "allow_rejects", "progress"))
    x.set_defaults(func=cmd_extend)

    r = vsub.add_parser(
        "resize",
        help="resize a model's embeddings and LM head for an extended tokenizer (mean-of-pieces init)",
        description="Grow the embeddings and LM head (tied or not) of MODEL to NEW_TOKENIZER, padded to a multiple "
        "of 64; each new row is the mean of the rows of the token's pieces under the model's own tokenizer. "
        "Writes the model and the new tokenizer to OUT.",
    )
    r.add_argument("model", help="model directory (or a full-weights run directory)")
    r.add_argument("tokenizer", help="extended tokenizer directory (from `zhtune vocab extend`)")
    r.add_argument("-o", "--output", required=True, help="directory for the resized model")
    r.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")
    r.set_defaults(func=cmd_resize)

"""How a command reads data files: one declaration of ``--format``, ``--map``, ``--rejects``,
``--allow-rejects`` and ``--progress`` for every command that reads records (convert, clean, cot,
mix, predict, eval gen, vocab extend). A command takes the flags it uses (``skip`` the others)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from zhtune.data.convert import parse_mapping
from zhtune.flags import flag


@dataclass
class InputOptions:
    """How input files are read, and where the records that cannot be used go."""

    format: str = "auto"
    """Input format: auto, alpaca, belle, sharegpt, openai, seed, text (see `zhtune data convert`)."""
    map: list[str] = flag(default_factory=list, metavar="SRC=DST")
    """Rename a column before reading, e.g. zh_instruction=instruction (repeatable, or comma-joined)."""
    rejects: str = ""
    """Where skipped records go with their reason (empty: OUTPUT.rejects.jsonl)."""
    allow_rejects: bool = False
    """Exit 0 even if some records were rejected (they are in the rejects file either way)."""
    progress: bool = True
    """Show a progress bar."""

    def mapping(self) -> dict[str, str]:
        """``--map`` as a dict of column renames (a clear error on a malformed pair)."""

        return parse_mapping(self.map)

    def rejects_path(self) -> str | None:
        """``--rejects``, or None for the default beside the output."""
        return self.rejects or None


def add_inputs_and_output(parser: argparse.ArgumentParser, output: str = "output .jsonl") -> None:
    """The positional INPUTS (files, directories or globs) and ``-o/--output`` of a command that
    reads records and writes a file (convert, clean, cot, evolve, predict)."""
    parser.add_argument("inputs", nargs="+", help="input files, directories or globs")
    parser.add_argument("-o", "--output", required=True, help=output)

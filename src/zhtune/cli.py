"""The ``zhtune`` command: a thin shell over the package.

Each stage registers its own subcommands (``zhtune/<stage>/commands.py``: parsers generated from
the stage's options dataclasses, handlers that import the stage when they run), so this module
only orders them, parses and reports errors. ``zhtune --help`` loads none of the heavy libraries.
Errors the user can fix (:class:`~zhtune.errors.ZhtuneError`) are printed as one message with
exit status 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from zhtune import __version__
from zhtune.allocator import use_huge_pages
from zhtune.data import commands as data_commands
from zhtune.errors import ZhtuneError
from zhtune.eval import commands as eval_commands
from zhtune.infer import commands as infer_commands
from zhtune.pipelines import commands as pipeline_commands
from zhtune.train import commands as train_commands
from zhtune.vocab import commands as vocab_commands

REGISTRARS = (
    pipeline_commands.register_quickstart,
    data_commands.register,
    train_commands.register,
    pipeline_commands.register_experiment,
    infer_commands.register,
    vocab_commands.register,
    eval_commands.register,
)
"""Each stage's ``register(subparsers, full_help_for)``, in the order ``zhtune --help`` lists them."""

TRAINING_COMMANDS = frozenset({"train", "quickstart", "experiment"})
"""The commands that train in their own process: started from the command line, they run again at
once with malloc on transparent huge pages (:func:`zhtune.allocator.use_huge_pages`; the training
steps 3-9% faster on SmolLM2, measured for ``train`` and ``quickstart --model``). Inference and
exams gained nothing from them (``predict``, ``eval exam`` measured) and stay as they start."""


def build_parser(full_help_for: str | None = None) -> argparse.ArgumentParser:
    """The argument parser. ``full_help_for`` names the subcommand whose expensive help text
    (config keys) should be built; others stay cheap."""
    p = argparse.ArgumentParser(prog="zhtune", description="Instruction-tune open LLMs for Chinese and English.")
    p.add_argument("--version", action="version", version=f"zhtune {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for register in REGISTRARS:
        register(sub, full_help_for)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``zhtune`` console script; returns the exit status."""
    entry = argv is None  # (the process's own command line, not a caller's list)
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if entry and command in TRAINING_COMMANDS:
        use_huge_pages()  # (runs this command again with malloc on huge pages: zhtune.allocator)
    parser = build_parser(full_help_for=command)
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow flags (`zhtune train c.yaml --no-progress lr=1e-4`)
    overrides = [e for e in extra if "=" in e and not e.startswith("-")]
    if hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *overrides]
        extra = [e for e in extra if e not in overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0 if not argv else 2
    try:
        return func(args)
    except ZhtuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

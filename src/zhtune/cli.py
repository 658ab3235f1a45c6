"""The ``zhtune`` command: a thin shell over the package.

Every subcommand imports its stage lazily, so ``zhtune --help`` stays fast. Errors the user can
fix (:class:`~zhtune.errors.ZhtuneError`) are printed as one message with exit status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Callable, Sequence
from typing import Any

from zhtune import __version__
from zhtune.errors import ZhtuneError


def _add_dataclass_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per dataclass field, typed, with its docstring and default as help."""
    from zhtune.config import field_docs

    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{docs.get(f.name, '')} (default: {f.default})"
        if hints[f.name] is bool:
            parser.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default, help=help_text
            )
        else:
            parser.add_argument(
                flag,
                dest=f.name,
                type=hints[f.name],
                default=f.default,
                help=help_text,
                metavar=f.name.upper(),
            )


def _from_args(cls: type, args: argparse.Namespace) -> Any:
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


# ---------------------------------------------------------------------------------------------
# Commands (each imports what it needs)
# ---------------------------------------------------------------------------------------------
def cmd_quickstart(args: argparse.Namespace) -> int:
    from zhtune.quickstart import QuickstartOptions, run_quickstart

    run_quickstart(_from_args(QuickstartOptions, args))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from zhtune.data.convert import convert_files, parse_mapping

    return convert_files(
        args.inputs,
        args.output,
        fmt=args.format,
        mapping=parse_mapping(args.map or []),
        rejects=args.rejects,
        allow_rejects=args.allow_rejects,
        progress=not args.no_progress,
        strict=args.strict,
    )


def cmd_stats(args: argparse.Namespace) -> int:
    from zhtune.data.stats import stats_command

    return stats_command(args.input, tokenizer=args.tokenizer, plot=args.plot, as_json=args.json)


def cmd_train(args: argparse.Namespace) -> int:
    from zhtune.config import load_config
    from zhtune.train.config import TrainConfig
    from zhtune.train.sft import train

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:  # no YAML file, only key=value pairs
        config, overrides = None, [config, *overrides]
    cfg = load_config(TrainConfig, config, overrides)
    train(cfg, progress=not args.no_progress)
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from zhtune.train.experiment import load_experiment, run_experiment

    cfg = load_experiment(args.grid, list(args.overrides))
    run_experiment(cfg, source=args.grid, progress=not args.no_progress)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from zhtune.infer.chat import chat_loop
    from zhtune.infer.generate import GenerationOptions
    from zhtune.models.loading import load_for_inference

    model, tokenizer, template = load_for_inference(args.run, dtype=args.dtype)
    chat_loop(
        model, tokenizer, args.template or template, _from_args(GenerationOptions, args), system=args.system
    )
    return 0


# ---------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------
def _train_epilog() -> str:
    from zhtune.config import config_help
    from zhtune.train.config import TrainConfig

    return "config keys (YAML or key=value):\n" + config_help(TrainConfig)


def _experiment_epilog() -> str:
    from zhtune.config import config_help
    from zhtune.train.experiment import EvalConfig, ExperimentConfig

    return (
        "grid keys (YAML or key=value):\n"
        + config_help(ExperimentConfig)
        + "\n\neval keys (under eval:, or eval.KEY=value):\n"
        + config_help(EvalConfig)
    )


def build_parser(full_help_for: str | None = None) -> argparse.ArgumentParser:
    """The argument parser. ``full_help_for`` names the subcommand whose expensive help text
    (config keys) should be built; others stay cheap."""
    from zhtune.infer.generate import GenerationOptions
    from zhtune.quickstart import QuickstartOptions

    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="zhtune", description="Instruction-tune open LLMs for Chinese and English."
    )
    p.add_argument("--version", action="version", version=f"zhtune {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    q = sub.add_parser(
        "quickstart", help="the whole loop on a CPU with no downloads (a few minutes)", formatter_class=fmt
    )
    _add_dataclass_args(q, QuickstartOptions)
    q.set_defaults(func=cmd_quickstart)

    data = sub.add_parser("data", help="convert, inspect and prepare instruction data")
    dsub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    c = dsub.add_parser(
        "convert",
        help="any supported format -> canonical conversations (JSON Lines)",
        description="Convert Alpaca, BELLE, ShareGPT/Vicuna, OpenAI messages, seed-task or column-mapped files "
        "(json, jsonl, csv, parquet, datasets directories) into canonical conversation records.",
    )
    c.add_argument("inputs", nargs="+", help="input files, directories or globs")
    c.add_argument("-o", "--output", required=True, help="output .jsonl")
    c.add_argument(
        "--format", default="auto", help="auto, alpaca, belle, sharegpt, openai, seed, text (default: auto)"
    )
    c.add_argument(
        "--map",
        action="append",
        metavar="SRC=DST",
        help="rename a column before reading, e.g. zh_instruction=instruction (repeatable)",
    )
    c.add_argument(
        "--rejects", help="where skipped records go with their reason (default: OUTPUT.rejects.jsonl)"
    )
    c.add_argument("--allow-rejects", action="store_true", help="exit 0 even if some records were rejected")
    c.add_argument(
        "--strict",
        action="store_true",
        help="reject records with fields their format does not use (default: ignore and count them)",
    )
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_convert)
    s = dsub.add_parser("stats", help="counts, length percentiles per field, languages, plot")
    s.add_argument("input", help="a data file in any supported format")
    s.add_argument("--tokenizer", help="tokenizer directory, to count tokens as well as characters")
    s.add_argument("--plot", help="write length histograms to this PNG")
    s.add_argument("--json", action="store_true", help="print the statistics as JSON")
    s.set_defaults(func=cmd_stats)

    t = sub.add_parser(
        "train",
        help="fine-tune a model from a YAML config plus key=value overrides",
        description="zhtune train CONFIG.yaml [key=value ...]   (or only key=value pairs)",
        epilog=_train_epilog()
        if full_help_for == "train"
        else "run `zhtune train --help` for every config key",
        formatter_class=fmt,
    )
    t.add_argument("config", nargs="?", help="YAML config file")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lr=1e-4 method=lora")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser(
        "experiment",
        help="a grid of train+eval runs -> one comparison table and charts",
        description="zhtune experiment GRID.yaml [key=value ...]: train every combination of the grid's axes "
        "(finished runs are skipped, interrupted ones resumed), score each one, and write results.md, "
        "results.json, loss_curves.png and metric.png. Dotted keys reach into sections: "
        "overrides.max_steps=50, eval.max_new_tokens=8.",
        epilog=_experiment_epilog()
        if full_help_for == "experiment"
        else "run `zhtune experiment --help` for every grid key",
        formatter_class=fmt,
    )
    e.add_argument("grid", help="grid YAML file (see src/zhtune/configs/experiments/)")
    e.add_argument("overrides", nargs="*", help="key=value overrides of the grid, e.g. output_dir=runs/exp2")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_experiment)

    ch = sub.add_parser("chat", help="multi-turn terminal chat with a run or model directory (streaming)")
    ch.add_argument("run", help="run directory (or local model directory)")
    ch.add_argument("--system", default="", help="system message")
    ch.add_argument("--template", help="override the run's chat template")
    ch.add_argument(
        "--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights dtype (default: fp32)"
    )
    _add_dataclass_args(ch, GenerationOptions)
    ch.set_defaults(func=cmd_chat)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``zhtune`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
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

"""The ``zhtune`` command: a thin shell over the package.

Every subcommand imports its stage lazily, so ``zhtune --help`` stays fast. Errors the user can
fix (:class:`~zhtune.errors.ZhtuneError`) are printed as one message with exit status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
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


def cmd_predict(args: argparse.Namespace) -> int:
    from zhtune.data.convert import parse_mapping
    from zhtune.infer.generate import GenerationOptions
    from zhtune.infer.predict import predict

    return predict(
        args.run,
        args.inputs,
        args.output,
        _from_args(GenerationOptions, args),
        batch_size=args.batch_size,
        template=args.template,
        dtype=args.dtype,
        fmt=args.format,
        mapping=parse_mapping(args.map or []),
        rejects=args.rejects,
        allow_rejects=args.allow_rejects,
        progress=not args.no_progress,
        seed=args.seed,
    )


def cmd_export(args: argparse.Namespace) -> int:
    from zhtune.infer.export import ExportOptions, export

    export(args.run, args.output, _from_args(ExportOptions, args))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ZhtuneError(
            "zhtune serve needs the serving packages: pip install -c constraints.txt -e '.[serve]'"
        ) from None
    from zhtune.infer.serve import serve

    serve(
        args.run,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_concurrent=args.max_concurrent,
        max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms,
        dtype=args.dtype,
        template=args.template,
    )
    return 0


def cmd_webui(args: argparse.Namespace) -> int:
    from zhtune.infer.generate import GenerationOptions
    from zhtune.infer.webui import launch

    launch(
        args.run,
        runs_dir=args.runs_dir,
        host=args.host,
        port=args.port,
        dtype=args.dtype,
        template=args.template,
        system=args.system,
        defaults=_from_args(GenerationOptions, args),
    )
    return 0


def cmd_vocab_extend(args: argparse.Namespace) -> int:
    from zhtune.data.convert import parse_mapping
    from zhtune.vocab.extend import ExtendOptions, extend_vocab

    extend_vocab(
        ExtendOptions(
            base=args.base, corpus=args.corpus, output=args.output, vocab_size=args.vocab_size,
            model_type=args.model_type, heldout=args.heldout, eval_text=args.eval_text or [],
            format=args.format, mapping=parse_mapping(args.map or []), overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    )  # fmt: skip
    return 0


def cmd_vocab_resize(args: argparse.Namespace) -> int:
    from zhtune.vocab.resize import resize_command

    return resize_command(args.model, args.tokenizer, args.output, overwrite=args.overwrite)


def _add_vocab_parser(sub: Any) -> None:
    """``zhtune vocab extend|resize``: Chinese vocabulary expansion."""
    v = sub.add_parser(
        "vocab", help="Chinese vocabulary expansion: extend a tokenizer, resize a model for it"
    )
    vsub = v.add_subparsers(dest="vocab_command", metavar="VOCAB_COMMAND")
    x = vsub.add_parser(
        "extend",
        help="train a Chinese vocabulary on a corpus and merge it into a base tokenizer",
        description="Train a Chinese vocabulary on CORPUS (SentencePiece for a SentencePiece-style base such as "
        "LLaMA-1/2, byte-level BPE for a byte-level base such as Qwen or LLaMA-3), append the Chinese words the "
        "base lacks (every existing id and special token unchanged), write a Hugging Face tokenizer directory, "
        "and print tokens per character before and after on held-out Chinese and English lines.",
    )
    x.add_argument("base", help="base tokenizer (or model) directory")
    x.add_argument(
        "corpus", nargs="+", help="text files (.txt/.md, one line at a time) or data files, dirs, globs"
    )
    x.add_argument("-o", "--output", required=True, help="directory for the extended tokenizer")
    x.add_argument(
        "--vocab-size",
        type=int,
        default=20000,
        help="size of the Chinese vocabulary to train (default: 20000)",
    )
    x.add_argument(
        "--model-type", default="bpe", choices=["bpe", "unigram"],
        help="Chinese vocabulary model; unigram needs a SentencePiece-style base (default: bpe)",
    )  # fmt: skip
    x.add_argument(
        "--heldout",
        type=float,
        default=0.01,
        help="share of corpus lines held out for the table (default: 0.01)",
    )
    x.add_argument(
        "--eval-text", action="append", metavar="FILE", help="extra text file to measure (repeatable)"
    )
    x.add_argument("--format", default="auto", help="format of non-text corpus files (default: auto)")
    x.add_argument(
        "--map",
        action="append",
        metavar="SRC=DST",
        help="rename a column of data files, e.g. zh_output=output",
    )
    x.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")
    x.add_argument("--no-progress", action="store_true", help="no progress bars")
    x.set_defaults(func=cmd_vocab_extend)
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
    r.set_defaults(func=cmd_vocab_resize)


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
    from zhtune.infer.export import ExportOptions
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

    pr = sub.add_parser(
        "predict",
        help="batched generation over a data file -> JSON Lines of predictions (resumable)",
        description="Generate a reply for every record of IN (any format `zhtune data convert` reads; the "
        "last assistant turn, if any, is kept as the reference) and append {id, messages, prediction, "
        "reference, meta} rows to OUT. Ids already in OUT are skipped, so re-running after an "
        "interruption generates only what is missing. Rejected records go to OUT.rejects.jsonl.",
    )
    pr.add_argument("run", help="run directory (or local model directory, or an export)")
    pr.add_argument("inputs", nargs="+", help="input files, directories or globs")
    pr.add_argument("-o", "--output", required=True, help="output .jsonl (appended to)")
    pr.add_argument("--batch-size", type=int, default=8, help="prompts per batch (default: 8)")
    pr.add_argument("--template", help="override the run's chat template")
    pr.add_argument(
        "--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights dtype (default: fp32)"
    )
    pr.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sampling temperature; 0 means greedy decoding (default: 0, so a resumed run gives the same rows)",
    )
    _add_dataclass_args(pr, GenerationOptions, skip=("temperature",))
    pr.add_argument("--seed", type=int, default=0, help="random seed for sampling (default: 0)")
    pr.add_argument(
        "--format", default="auto", help="auto, alpaca, belle, sharegpt, openai, seed (default: auto)"
    )
    pr.add_argument(
        "--map", action="append", metavar="SRC=DST", help="rename a column before reading (repeatable)"
    )
    pr.add_argument(
        "--rejects", help="where unusable records go with their reason (default: OUTPUT.rejects.jsonl)"
    )
    pr.add_argument("--allow-rejects", action="store_true", help="exit 0 even if some records were rejected")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")
    pr.set_defaults(func=cmd_predict)

    ex = sub.add_parser(
        "export",
        help="a run as a standalone model directory: merge adapters, cast, quantize (8/4-bit)",
        description="Write RUN to DIR as safetensors with its tokenizer (chat_template), generation config "
        "(the template's stop ids) and a zhtune_export.json manifest, loadable by plain transformers. "
        "--quantize reports size and perplexity before/after (printed and in DIR/export_report.json).",
    )
    ex.add_argument("run", help="run directory (or local model directory)")
    ex.add_argument("-o", "--output", required=True, help="directory to create")
    _add_dataclass_args(ex, ExportOptions)
    ex.set_defaults(func=cmd_export)

    sv = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP API (chat/completions, streaming) with dynamic batching",
        description="Serve RUN at /v1/chat/completions, /v1/completions and /v1/models (model name: the "
        "run directory's name, or 'default'), plus /health. Requests arriving together are decoded "
        "together in one batch, streamed ones included.",
    )
    sv.add_argument("run", help="run directory (or local model directory)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1: local only)")
    sv.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    sv.add_argument(
        "--api-key",
        default=os.environ.get("ZHTUNE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 (default: $ZHTUNE_API_KEY, else no key)",
    )
    sv.add_argument(
        "--max-concurrent", type=int, default=128, help="requests in flight before 429 busy (default: 128)"
    )
    sv.add_argument("--max-batch-size", type=int, default=32, help="replies decoded together (default: 32)")
    sv.add_argument(
        "--batch-wait-ms",
        type=float,
        default=10.0,
        help="start a batch once no request has arrived for this long (default: 10)",
    )
    sv.add_argument("--template", help="override the run's chat template")
    sv.add_argument(
        "--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights dtype (default: fp32)"
    )
    sv.set_defaults(func=cmd_serve)

    wu = sub.add_parser(
        "webui",
        help="browser UI: chat with a run (streaming), browse runs, loss curves and eval reports",
        description="Serve a web page (gradio; install the 'webui' extra) with a Chat tab, streaming replies "
        "from RUN with adjustable decoding settings, and a Runs tab showing each run's config.yaml, loss "
        "curve, train_results.json and eval reports; any run listed there can be loaded into the chat. "
        "The decoding flags below set the sliders' starting values.",
    )
    wu.add_argument("run", nargs="?", help="run directory (or local model directory) to chat with")
    wu.add_argument("--runs-dir", help="folder of runs to browse (default: RUN's parent folder, or ./runs)")
    wu.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1: local only)")
    wu.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    wu.add_argument("--system", default="", help="starting system message")
    wu.add_argument("--template", help="override the run's chat template")
    wu.add_argument(
        "--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights dtype (default: fp32)"
    )
    _add_dataclass_args(wu, GenerationOptions)
    wu.set_defaults(func=cmd_webui)
    _add_vocab_parser(sub)
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

"""``zhtune data ...``: the data stage's subcommands, registered by the stage itself.

Flags come from the stage's options dataclasses (:mod:`zhtune.flags`); each handler imports its
stage module when it runs, so ``zhtune --help`` loads none of them.
"""

from __future__ import annotations

import argparse
from typing import Any

from zhtune.data.clean import STEPS, CleanOptions
from zhtune.data.cot import CotOptions, describe_templates
from zhtune.data.evolve import EvolveOptions
from zhtune.data.generate import GenerateOptions
from zhtune.data.inputs import InputOptions, add_inputs_and_output
from zhtune.data.mix import MixOptions
from zhtune.flags import add_options, options_from


def cmd_convert(args: argparse.Namespace) -> int:
    from zhtune.data.convert import convert_files

    inputs = options_from(InputOptions, args)
    return convert_files(
        args.inputs, args.output, fmt=inputs.format, mapping=inputs.mapping(), rejects=inputs.rejects_path(),
        allow_rejects=inputs.allow_rejects, progress=inputs.progress, strict=args.strict,
    )  # fmt: skip


def cmd_stats(args: argparse.Namespace) -> int:
    from zhtune.data.stats import stats_command

    return stats_command(args.input, tokenizer=args.tokenizer, plot=args.plot, as_json=args.json)


def cmd_clean(args: argparse.Namespace) -> int:
    from zhtune.data.clean import clean_files
    from zhtune.data.convert import rejects_exit_status

    inputs = options_from(InputOptions, args)
    counts = clean_files(
        args.inputs, args.output, options_from(CleanOptions, args),
        steps={s.name: getattr(args, "step_" + s.name.replace("-", "_")) for s in STEPS},
        fmt=inputs.format, mapping=inputs.mapping(), rejects=inputs.rejects_path(), progress=inputs.progress,
        restart=args.restart,
    )  # fmt: skip
    # records removed by a cleaning step are the point; records that could not be read are
    # rejects, as in `zhtune data convert`
    return rejects_exit_status(counts["read"].removed, inputs.allow_rejects)


def cmd_cot(args: argparse.Namespace) -> int:
    from zhtune.data.cot import cot_convert

    return cot_convert(args.inputs, args.output, options_from(CotOptions, args))


def cmd_mix(args: argparse.Namespace) -> int:
    from zhtune.data.mix import mix

    return mix(args.sources, args.output, options_from(MixOptions, args))


def cmd_list(args: argparse.Namespace) -> int:
    from zhtune.data.registry import list_command

    return list_command(args.registry or None, args.tag or [], as_json=args.json)


def cmd_generate(args: argparse.Namespace) -> int:
    from zhtune.data.generate import generate

    return generate(args.seeds, args.output, options_from(GenerateOptions, args))


def cmd_evolve(args: argparse.Namespace) -> int:
    from zhtune.data.evolve import evolve

    return evolve(args.inputs, args.output, options_from(EvolveOptions, args))


def register(sub: Any, full_help_for: str | None = None) -> None:
    """Add ``zhtune data`` and its subcommands to the top-level subparsers ``sub``."""
    data = sub.add_parser("data", help="convert, inspect and prepare instruction data")
    dsub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")

    c = dsub.add_parser(
        "convert",
        help="any supported format -> canonical conversations (JSON Lines)",
        description="Convert Alpaca, BELLE, ShareGPT/Vicuna, OpenAI messages, seed-task or column-mapped files "
        "(json, jsonl, csv, parquet, datasets directories) into canonical conversation records.",
    )
    add_inputs_and_output(c)
    add_options(c, InputOptions)
    c.add_argument(
        "--strict", action="store_true",
        help="reject records with fields their format does not use (default: ignore and count them)",
    )  # fmt: skip
    c.set_defaults(func=cmd_convert)

    s = dsub.add_parser("stats", help="counts, length percentiles per field, languages, plot")
    s.add_argument("input", help="a data file in any supported format")
    s.add_argument("--tokenizer", help="tokenizer directory, to count tokens as well as characters")
    s.add_argument("--plot", help="write length histograms to this PNG")
    s.add_argument("--json", action="store_true", help="print the statistics as JSON")
    s.set_defaults(func=cmd_stats)

    _register_clean(dsub)
    _register_prep(dsub)
    _register_synth(dsub)


def _register_clean(dsub: Any) -> None:
    """``zhtune data clean``: a registry of steps, each ``--STEP`` / ``--no-STEP``."""
    c = dsub.add_parser(
        "clean",
        help="html -> markdown, language filter, BELLE/FastChat filters, split long chats, dedup",
        description="Stream IN (anything `zhtune data convert` reads) through the cleaning steps, in this order, "
        "into OUT; removed records go to OUT.rejects.jsonl with the step and reason, and a table reports per "
        "step the records in, removed and what changed. An interrupted run, started again with the same inputs and "
        "settings, goes on from its last checkpoint (OUT.partial). Exit status 0 unless an input cannot be read.",
    )
    add_inputs_and_output(c, "output .jsonl (written when the run finishes)")
    steps = c.add_argument_group("steps (in the order they run)")
    for step in STEPS:
        steps.add_argument(
            f"--{step.name}", dest="step_" + step.name.replace("-", "_"), action=argparse.BooleanOptionalAction,
            default=None, help=f"{step.help} (default: {'on' if step.default else 'off'})",
        )  # fmt: skip
    add_options(c, CleanOptions)
    add_options(c, InputOptions)
    c.add_argument("--restart", action="store_true", help="start over instead of resuming an interrupted run")
    c.set_defaults(func=cmd_clean)


def _register_prep(dsub: Any) -> None:
    """``zhtune data cot|mix|list``: CoT formatting, weighted mixing, the dataset registry."""
    c = dsub.add_parser(
        "cot",
        help="chain-of-thought data ({question, rationale, answer} or Alpaca-CoT) -> conversations",
        description="Turn FLAN-style CoT records {question, rationale, answer} (or Alpaca-CoT's {instruction,\n"
        "input, output}) into conversations: the question in a prompt template, the rationale then the\n"
        "answer. --template auto draws a template per record (by seed, among its language's); --suffix is\n"
        "Alpaca-CoT's CoT* variant. Templates (prompt -> response):\n" + describe_templates(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_inputs_and_output(c)
    add_options(c, CotOptions)
    c.set_defaults(func=cmd_cot)

    m = dsub.add_parser(
        "mix",
        help="a weighted, stable mixture of datasets: A.jsonl:0.7 B.jsonl:0.3 -o OUT.jsonl",
        description="Mix SOURCE:WEIGHT inputs (files, globs or registered dataset names; weight default 1) into "
        "one canonical JSON Lines file; weights are shares of the output. Records are picked by a hash of "
        "(seed, source, id), so the same seed gives the same output and growing one source does not change "
        "what is picked from the others. Each record gets meta.mix_source.",
    )
    m.add_argument("sources", nargs="+", metavar="SOURCE[:WEIGHT]", help="e.g. alpaca.json:0.7 belle_zh:0.3")
    m.add_argument("-o", "--output", required=True, help="output .jsonl")
    add_options(m, MixOptions)
    m.set_defaults(func=cmd_mix)

    ls = dsub.add_parser(
        "list",
        help="the dataset registry: names usable in train configs and data mix, with paths and tags",
        description="List registered datasets from --registry FILE, ./datasets.yaml and zhtune's shipped "
        "registry (first match wins), with whether each path exists and its lang/task/gen_method tags.",
    )
    ls.add_argument("--registry", default="", help="a registry YAML to read first")
    ls.add_argument(
        "--tag", action="append", metavar="KEY=VALUE", help="only datasets with this tag, e.g. lang=zh"
    )
    ls.add_argument("--json", action="store_true", help="print the entries as JSON")
    ls.set_defaults(func=cmd_list)


def _register_synth(dsub: Any) -> None:
    """``zhtune data generate|evolve``: self-instruct and evol-instruct through a teacher endpoint."""
    g = dsub.add_parser(
        "generate",
        help="self-instruct: new instruction data from seed tasks via an OpenAI-compatible endpoint",
        description="Ask the teacher (--base-url/--model/--api-key or OPENAI_BASE_URL/OPENAI_MODEL/OPENAI_API_KEY) "
        "with BELLE's Chinese or Alpaca's English self-instruct prompt (3 sampled seed tasks, 10 tasks per request), "
        "filter the tasks (incomplete, cut off, length, blacklist, assistant phrases, near copies by ROUGE-L or BM25) "
        "and append kept records to OUT and rejects with their reason to OUT.rejects.jsonl as they arrive. Stops at "
        "--num records, or after --patience requests in a row that kept nothing. Re-running resumes: replies "
        "already received come from OUT.cache.sqlite. Exit status 1 when it stopped short of --num.",
    )
    g.add_argument("--seeds", required=True, help="seed tasks (BELLE/Alpaca seed_tasks .json/.jsonl)")
    g.add_argument("-o", "--output", required=True, help="output .jsonl (appended to)")
    add_options(g, GenerateOptions)
    g.set_defaults(func=cmd_generate)

    e = dsub.add_parser(
        "evolve",
        help="evol-instruct: evolve instructions in depth/breadth via an endpoint, with WizardLM's elimination",
        description="For every record of IN (any format `zhtune data convert` reads; its first user turn), --rounds "
        "times: evolve it in depth (constraints, deepen, concretize, reasoning, complicate input) or breadth, "
        "picked at random, ask the teacher for the answer, and eliminate evolutions that copy prompt words, "
        "that the Equal judge finds no different, or whose answer is a short refusal or only punctuation. "
        "Kept ones are appended to OUT, eliminated ones to OUT.rejects.jsonl with the rule. Stops early (exit status "
        "1, keeping what it has) after --patience requests in a row that kept nothing, or at --max-requests. "
        "Re-running resumes.",
    )
    add_inputs_and_output(e, "output .jsonl (appended to)")
    add_options(e, EvolveOptions)
    e.set_defaults(func=cmd_evolve)

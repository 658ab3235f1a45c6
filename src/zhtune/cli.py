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


TRUST_REMOTE_CODE_HELP = (
    "allow the model's own Python code (auto_map) to run; never switched on by a run's or export's metadata"
)


def _add_device_args(parser: argparse.ArgumentParser, dtype: bool = True) -> None:
    """``--device`` and (unless ``dtype`` is False) ``--dtype``: where an inference command runs
    its model and in what dtype (:mod:`zhtune.models.device`), and ``--trust-remote-code``
    (:func:`_add_trust_arg`). The one declaration of these flags for chat, predict, serve, webui,
    eval and export; export keeps its own ``--dtype`` (auto = the base's)."""
    from zhtune.models.device import DEVICE_HELP, DTYPE_HELP, DTYPES

    parser.add_argument("--device", default="auto", help=f"{DEVICE_HELP} (default: auto)")
    if dtype:
        parser.add_argument("--dtype", default="auto", choices=DTYPES, help=f"{DTYPE_HELP} (default: auto)")
    _add_trust_arg(parser)


def _add_trust_arg(parser: argparse.ArgumentParser) -> None:
    """``--trust-remote-code``: the only switch that lets a loaded model's own Python code run
    (:func:`zhtune.models.loading.check_remote_code`); a run's ``config.yaml`` or an export's
    manifest may ask for it, never grant it. Commands whose options are a dataclass skip that
    field in :func:`_add_dataclass_args` and get it here (``dest`` is the field's name)."""
    parser.add_argument(
        "--trust-remote-code", dest="trust_remote_code", action="store_true", help=TRUST_REMOTE_CODE_HELP
    )


def _from_args(cls: type, args: argparse.Namespace) -> Any:
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


# ---------------------------------------------------------------------------------------------
# Commands (each imports what it needs)
# ---------------------------------------------------------------------------------------------
def cmd_quickstart(args: argparse.Namespace) -> int:
    from zhtune.pipelines.quickstart import QuickstartOptions, run_quickstart

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


def cmd_data_clean(args: argparse.Namespace) -> int:
    from zhtune.data.clean import STEPS, CleanOptions, clean_files
    from zhtune.data.convert import parse_mapping, rejects_exit_status

    counts = clean_files(
        args.inputs,
        args.output,
        _from_args(CleanOptions, args),
        steps={s.name: getattr(args, "step_" + s.name.replace("-", "_")) for s in STEPS},
        fmt=args.format,
        mapping=parse_mapping(args.map or []),
        rejects=args.rejects,
        progress=not args.no_progress,
        restart=args.restart,
    )
    # records removed by a cleaning step are the point; records that could not be read are
    # rejects, as in `zhtune data convert`
    return rejects_exit_status(counts["read"].removed, args.allow_rejects)


def _add_clean_parser(dsub: Any) -> None:
    """``zhtune data clean``: a registry of steps, each ``--STEP`` / ``--no-STEP``."""
    from zhtune.data.clean import STEPS, CleanOptions

    c = dsub.add_parser(
        "clean",
        help="html -> markdown, language filter, BELLE/FastChat filters, split long chats, dedup",
        description="Stream IN (anything `zhtune data convert` reads) through the cleaning steps, in this order, "
        "into OUT; removed records go to OUT.rejects.jsonl with the step and reason, and a table reports per "
        "step the records in, removed and what changed. An interrupted run, started again with the same inputs and "
        "settings, goes on from its last checkpoint (OUT.partial). Exit status 0 unless an input cannot be read.",
    )
    c.add_argument("inputs", nargs="+", help="input files, directories or globs")
    c.add_argument("-o", "--output", required=True, help="output .jsonl (written when the run finishes)")
    steps = c.add_argument_group("steps (in the order they run)")
    for step in STEPS:
        steps.add_argument(
            f"--{step.name}", dest="step_" + step.name.replace("-", "_"), action=argparse.BooleanOptionalAction,
            default=None, help=f"{step.help} (default: {'on' if step.default else 'off'})",
        )  # fmt: skip
    _add_dataclass_args(c, CleanOptions, skip=("tokenizer",))
    c.add_argument("--tokenizer", help="split: tokenizer directory that counts tokens (turns split on)")
    c.add_argument("--format", default="auto", help="input format, as for convert (default: auto)")
    c.add_argument(
        "--map", action="append", metavar="SRC=DST", help="rename a column before reading (repeatable)"
    )
    c.add_argument("--rejects", help="where removed records go (default: OUTPUT.rejects.jsonl)")
    c.add_argument("--restart", action="store_true", help="start over instead of resuming an interrupted run")
    c.add_argument(
        "--allow-rejects", action="store_true",
        help="exit 0 even if some records could not be read (they are in the rejects file either way)",
    )  # fmt: skip
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_data_clean)


def cmd_data_generate(args: argparse.Namespace) -> int:
    from zhtune.data.generate import GenerateOptions, generate

    return generate(args.seeds, args.output, _from_args(GenerateOptions, args))


def cmd_data_evolve(args: argparse.Namespace) -> int:
    from zhtune.data.evolve import EvolveOptions, evolve

    return evolve(args.inputs, args.output, _from_args(EvolveOptions, args))


def _add_synth_parsers(dsub: Any) -> None:
    """``zhtune data generate|evolve``: self-instruct and evol-instruct through a teacher endpoint."""
    from zhtune.data.evolve import EvolveOptions
    from zhtune.data.generate import GenerateOptions

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
    _add_dataclass_args(g, GenerateOptions)
    g.set_defaults(func=cmd_data_generate)

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
    e.add_argument("inputs", nargs="+", help="input files, directories or globs")
    e.add_argument("-o", "--output", required=True, help="output .jsonl (appended to)")
    _add_dataclass_args(e, EvolveOptions)
    e.set_defaults(func=cmd_data_evolve)


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
    from zhtune.pipelines.experiment import load_experiment, run_experiment

    cfg = load_experiment(args.grid, list(args.overrides))
    run_experiment(cfg, source=args.grid, progress=not args.no_progress)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from zhtune.infer.chat import chat_loop
    from zhtune.infer.generate import GenerationOptions
    from zhtune.models.loading import load_for_inference

    model, tokenizer, template = load_for_inference(
        args.run, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code
    )
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
        device=args.device,
        fmt=args.format,
        mapping=parse_mapping(args.map or []),
        rejects=args.rejects,
        allow_rejects=args.allow_rejects,
        progress=not args.no_progress,
        seed=args.seed,
        trust_remote_code=args.trust_remote_code,
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
    from zhtune.infer.serve_config import ServeOptions

    serve(
        args.run,
        _from_args(ServeOptions, args),
        dtype=args.dtype,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
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
        device=args.device,
        template=args.template,
        system=args.system,
        defaults=_from_args(GenerationOptions, args),
        seed=args.seed,
        auth=args.auth,
        insecure_no_auth=args.insecure_no_auth,
        trust_remote_code=args.trust_remote_code,
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


def cmd_eval_exam(args: argparse.Namespace) -> int:
    from zhtune.eval.exam import ExamOptions, print_summary, run_exam

    options = _from_args(ExamOptions, args)
    options.progress = not args.no_progress
    report = run_exam(args.run, options)
    print_summary(report, options.output or os.path.join(args.run, "eval"))
    return 0


def _add_eval_parser(sub: Any) -> Any:
    """``zhtune eval ...``: the group every evaluation command joins; returns its subparsers."""
    ev = sub.add_parser(
        "eval", help="evaluate runs: LLM judge, exams (C-Eval, CMMLU, MMCU), BLEU/ROUGE, compare runs"
    )
    return ev.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND")


def _add_exam_parser(esub: Any) -> None:
    """``zhtune eval exam``: multiple-choice exams scored by letter logits."""
    from zhtune.eval.exam import ExamOptions

    x = esub.add_parser(
        "exam",
        help="multiple-choice exams (C-Eval, CMMLU, MMCU): per-subject accuracy, category means",
        description="Score RUN on a multiple-choice exam: DATA/test/*.csv (C-Eval/CMMLU layout), JSON or xlsx "
        "(MMCU), with few-shot examples from DATA/dev. Each question is scored by the next-token logits over "
        "A-D (generation + extraction for multi-letter answers). Writes exam.json, exam.md and "
        "exam_predictions.jsonl to RUN/eval (or -o); re-running skips the subjects already scored.",
    )
    x.add_argument("run", help="run directory (or local model directory, or an export)")
    x.add_argument("--data", required=True, help="exam folder (test/ + dev/), folder of files, or one file")
    x.add_argument("-o", "--output", default="", help="folder for the reports (default: RUN/eval)")
    _add_dataclass_args(
        x, ExamOptions, skip=("data", "output", "progress", "device", "dtype", "trust_remote_code")
    )
    _add_device_args(x)
    x.add_argument(
        "--no-template", dest="template", action="store_const", const="none",
        help="plain-text prompt, no chat template (same as --template none)",
    )  # fmt: skip
    x.add_argument("--no-progress", action="store_true", help="no progress bar")
    x.set_defaults(func=cmd_eval_exam)


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


def cmd_data_cot(args: argparse.Namespace) -> int:
    from zhtune.data.convert import parse_mapping
    from zhtune.data.cot import CotOptions, cot_convert

    opts = _from_args(CotOptions, args)
    return cot_convert(args.inputs, args.output, opts, parse_mapping(args.map or []), rejects=args.rejects)


def cmd_data_mix(args: argparse.Namespace) -> int:
    from zhtune.data.mix import MixOptions, mix

    return mix(args.sources, args.output, _from_args(MixOptions, args), rejects=args.rejects)


def cmd_data_list(args: argparse.Namespace) -> int:
    from zhtune.data.registry import list_command

    return list_command(args.registry or None, args.tag or [], as_json=args.json)


def cmd_eval_gen(args: argparse.Namespace) -> int:
    from zhtune.data.convert import parse_mapping
    from zhtune.eval.gen import GenEvalOptions, gen_command

    return gen_command(args.run, args.data, _from_args(GenEvalOptions, args), parse_mapping(args.map or []))


def _add_data_prep_parsers(dsub: Any) -> None:
    """``zhtune data cot|mix|list``: CoT formatting, weighted mixing, the dataset registry."""
    from zhtune.data.cot import CotOptions
    from zhtune.data.mix import MixOptions

    fmt = argparse.RawDescriptionHelpFormatter
    c = dsub.add_parser(
        "cot",
        help="chain-of-thought data ({question, rationale, answer} or Alpaca-CoT) -> conversations",
        description="Turn FLAN-style CoT records {question, rationale, answer} (or Alpaca-CoT's {instruction,\n"
        "input, output}) into conversations: the question in a prompt template, the rationale then the\n"
        "answer. --template auto draws a template per record (by seed, among its language's); --suffix is\n"
        "Alpaca-CoT's CoT* variant. Templates (prompt -> response):\n" + _cot_templates(),
        formatter_class=fmt,
    )
    c.add_argument("inputs", nargs="+", help="input files, directories or globs")
    c.add_argument("-o", "--output", required=True, help="output .jsonl")
    c.add_argument(
        "--map", action="append", metavar="SRC=DST", help="rename a column, e.g. chain_of_thought=rationale"
    )
    c.add_argument(
        "--rejects", help="where skipped records go with their reason (default: OUTPUT.rejects.jsonl)"
    )
    _add_dataclass_args(c, CotOptions)
    c.set_defaults(func=cmd_data_cot)

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
    m.add_argument("--rejects", help="where unusable input records go (default: OUTPUT.rejects.jsonl)")
    _add_dataclass_args(m, MixOptions)
    m.set_defaults(func=cmd_data_mix)

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
    ls.set_defaults(func=cmd_data_list)


def _cot_templates() -> str:
    from zhtune.data.cot import describe_templates

    return describe_templates()


def _add_gen_parser(esub: Any) -> None:
    """``zhtune eval gen``: BLEU-4, ROUGE-1/2/L and exact match of generated answers."""
    from zhtune.eval.gen import GenEvalOptions

    g = esub.add_parser(
        "gen",
        help="generation metrics: BLEU-4 (characters), ROUGE-1/2/L (jieba words), exact match",
        description="Generate greedy answers for every record of --data (the last assistant turn is the "
        "reference) and score them as LLaMA-Factory's predict does: BLEU-4 on characters (NLTK smoothing "
        "method 3), ROUGE-1/2/L F1 on jieba words (rouge-chinese), plus exact match, all x100. Writes gen.json, "
        "gen.md, gen_scores.jsonl and gen_predictions.jsonl to RUN/eval (resumable).",
    )
    g.add_argument("run", help="run directory (or local model directory, or an export)")
    g.add_argument("--data", required=True, nargs="+", help="test files in any supported format")
    g.add_argument(
        "--map", action="append", metavar="SRC=DST", help="rename a column before reading (repeatable)"
    )
    _add_dataclass_args(g, GenEvalOptions, skip=("device", "dtype", "trust_remote_code"))
    _add_device_args(g)
    g.set_defaults(func=cmd_eval_gen)


def cmd_eval_judge(args: argparse.Namespace) -> int:
    from pathlib import Path

    from zhtune.eval.judge import JudgeOptions, judge, print_summary
    from zhtune.rundir import eval_dir

    options = _from_args(JudgeOptions, args)
    options.progress = not args.no_progress
    report = judge(args.run, options)
    print_summary(report, Path(options.output) if options.output else eval_dir(args.run))
    return 1 if report["failed"] else 0


def cmd_eval_compare(args: argparse.Namespace) -> int:
    from zhtune.eval.compare import compare

    print(compare(args.runs, metric=args.metric, output=args.output), end="")
    return 0


def _add_judge_parsers(esub: Any) -> None:
    """``zhtune eval judge`` (LLM judge, BELLE-eval / MT-bench) and ``zhtune eval compare``."""
    from zhtune.eval.judge import JudgeOptions

    j = esub.add_parser(
        "judge",
        help="LLM-as-judge on BELLE-eval (0-1 per class, score_w/o_others) or MT-bench style (1-10)",
        description="Answer every {question, std_answer, class} of --data with RUN (greedy, resumable), have an "
        "OpenAI-compatible judge score each answer at temperature 0 (BELLE's per-class prompts, the gold answer "
        "except for generation/brainstorming/rewrite; or --protocol mtbench), and report the mean per class, "
        "score (mean over classes) and score_w/o_others (without math and code). Replies with no score are asked "
        "once more, then counted as unparsed, never scored 0. Writes judge.jsonl, judge.json, judge.md, "
        "report.md to RUN/eval (or -o); re-running asks nothing twice (judged ids skipped, replies cached). "
        "Exit status 1 if some questions failed at the judge.",
    )
    j.add_argument("run", help="run directory (or local model directory, or an export)")
    j.add_argument("--data", required=True, help="questions, e.g. ../shared/data/belle/eval_set.json")
    j.add_argument("-o", "--output", default="", help="folder for the reports (default: RUN/eval)")
    j.add_argument(
        "--protocol", default="belle", choices=["belle", "mtbench"],
        help="belle: 0-1 score after 得分; mtbench: 1-10 in [[rating]] (default: belle)",
    )  # fmt: skip
    _add_dataclass_args(
        j,
        JudgeOptions,
        skip=("data", "output", "protocol", "progress", "device", "dtype", "trust_remote_code"),
    )
    _add_device_args(j)
    j.add_argument("--no-progress", action="store_true", help="no progress bars")
    j.set_defaults(func=cmd_eval_judge)

    c = esub.add_parser(
        "compare",
        help="runs side by side: one markdown table per metric (rows = runs) and PNG bar charts",
        description="Read each run's eval reports (RUN/eval/<metric>.json: judge, exam, gen, exact_match, ...) "
        "and write one table per metric, rows = runs and columns = classes / subjects + overall (judge: also "
        "score_w/o_others), to stdout and DIR/compare.md, with compare.json and DIR/compare_<metric>.png. "
        "Runs without a report are listed under the table.",
    )
    c.add_argument("runs", nargs="+", help="run directories (or their eval folders)")
    c.add_argument("--metric", default="", help="only this metric, e.g. judge (default: every one found)")
    c.add_argument(
        "-o", "--output", default="compare", help="folder for compare.md and charts (default: compare)"
    )
    c.set_defaults(func=cmd_eval_compare)


# ---------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------
def _train_epilog() -> str:
    from zhtune.config import config_help
    from zhtune.train.config import TrainConfig

    return "config keys (YAML or key=value):\n" + config_help(TrainConfig)


def _experiment_epilog() -> str:
    from zhtune.config import config_help
    from zhtune.pipelines.experiment import EvalConfig, ExperimentConfig

    return (
        "grid keys (YAML or key=value):\n"
        + config_help(ExperimentConfig)
        + "\n\neval keys (under eval:, or eval.KEY=value):\n"
        + config_help(EvalConfig)
    )


def _add_inference_parsers(sub: Any) -> None:
    """``chat``, ``predict``, ``export``, ``serve`` and ``webui``: the commands that run a model."""
    from zhtune.infer.export import ExportOptions
    from zhtune.infer.generate import GenerationOptions
    from zhtune.infer.serve_config import ServeOptions

    ch = sub.add_parser("chat", help="multi-turn terminal chat with a run or model directory (streaming)")
    ch.add_argument("run", help="run directory (or local model directory)")
    ch.add_argument("--system", default="", help="system message")
    ch.add_argument("--template", help="override the run's chat template")
    _add_device_args(ch)
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
    _add_device_args(pr)
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
    _add_dataclass_args(ex, ExportOptions, skip=("device", "trust_remote_code"))
    _add_device_args(ex, dtype=False)
    ex.set_defaults(func=cmd_export)

    sv = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP API (chat/completions, streaming) with dynamic batching",
        description="Serve RUN at /v1/chat/completions, /v1/completions and /v1/models (model name: the "
        "run directory's name, or 'default'), plus /health. Requests arriving together are decoded "
        "together in one batch, streamed ones included.",
    )
    sv.add_argument("run", help="run directory (or local model directory)")
    _add_dataclass_args(sv, ServeOptions)
    _add_device_args(sv)
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
    wu.add_argument(
        "--auth", default=os.environ.get("ZHTUNE_WEBUI_AUTH", ""), metavar="USER:PASSWORD",
        help="a login in front of the page (default: $ZHTUNE_WEBUI_AUTH; needed for a non-loopback --host)",
    )  # fmt: skip
    wu.add_argument(
        "--insecure-no-auth", action="store_true", help="serve on a non-loopback --host without --auth"
    )
    wu.add_argument("--system", default="", help="starting system message")
    wu.add_argument(
        "--seed",
        type=int,
        help="seed the sampler once at start: the same messages sent to a fresh server get the same "
        "sampled replies (default: random)",
    )
    wu.add_argument("--template", help="override the run's chat template")
    _add_device_args(wu)
    _add_dataclass_args(wu, GenerationOptions)
    wu.set_defaults(func=cmd_webui)


def build_parser(full_help_for: str | None = None) -> argparse.ArgumentParser:
    """The argument parser. ``full_help_for`` names the subcommand whose expensive help text
    (config keys) should be built; others stay cheap."""
    from zhtune.pipelines.quickstart import QuickstartOptions

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
    _add_clean_parser(dsub)
    _add_data_prep_parsers(dsub)
    _add_synth_parsers(dsub)

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

    _add_inference_parsers(sub)
    _add_vocab_parser(sub)
    esub = _add_eval_parser(sub)
    _add_exam_parser(esub)
    _add_gen_parser(esub)
    _add_judge_parsers(esub)
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

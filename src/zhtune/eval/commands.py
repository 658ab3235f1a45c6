"""``zhtune eval exam|gen|judge|compare``: the evaluation stage's subcommands, registered by the
stage itself, with flags from :class:`ExamOptions`, :class:`GenEvalOptions` and
:class:`JudgeOptions` (whose judge endpoint is an :class:`~zhtune.llm.options.EndpointOptions`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from zhtune.data.inputs import InputOptions
from zhtune.eval.exam import ExamOptions
from zhtune.eval.gen import GenEvalOptions
from zhtune.eval.judge import JudgeOptions
from zhtune.flags import add_options, options_from
from zhtune.rundir import eval_dir

RUN_HELP = "run directory (or local model directory, or an export)"


def cmd_exam(args: argparse.Namespace) -> int:
    from zhtune.eval.exam import print_summary, run_exam

    options = options_from(ExamOptions, args)
    report = run_exam(args.run, options)
    print_summary(report, options.output or str(eval_dir(args.run)))
    return 0


def cmd_gen(args: argparse.Namespace) -> int:
    from zhtune.eval.gen import gen_command

    mapping = options_from(InputOptions, args).mapping()
    return gen_command(args.run, args.data, options_from(GenEvalOptions, args), mapping)


def cmd_judge(args: argparse.Namespace) -> int:
    from zhtune.eval.judge import judge, print_summary

    options = options_from(JudgeOptions, args)
    report = judge(args.run, options)
    print_summary(report, Path(options.output) if options.output else eval_dir(args.run))
    return 1 if report["failed"] else 0


def cmd_compare(args: argparse.Namespace) -> int:
    from zhtune.eval.compare import compare

    print(compare(args.runs, metric=args.metric, output=args.output), end="")
    return 0


def register(sub: Any, full_help_for: str | None = None) -> None:
    """Add ``zhtune eval`` and its subcommands to the top-level subparsers ``sub``."""
    ev = sub.add_parser(
        "eval", help="evaluate runs: LLM judge, exams (C-Eval, CMMLU, MMCU), BLEU/ROUGE, compare runs"
    )
    esub = ev.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND")

    x = esub.add_parser(
        "exam",
        help="multiple-choice exams (C-Eval, CMMLU, MMCU): per-subject accuracy, category means",
        description="Score RUN on a multiple-choice exam: DATA/test/*.csv (C-Eval/CMMLU layout), JSON or xlsx "
        "(MMCU), with few-shot examples from DATA/dev. Each question is scored by the next-token logits over "
        "A-D (generation + extraction for multi-letter answers). Writes exam.json, exam.md and "
        "exam_predictions.jsonl to RUN/eval (or -o); re-running skips the subjects already scored.",
    )
    x.add_argument("run", help=RUN_HELP)
    add_options(x, ExamOptions)
    x.add_argument(
        "--no-template", dest="template", action="store_const", const="none",
        help="plain-text prompt, no chat template (same as --template none)",
    )  # fmt: skip
    x.set_defaults(func=cmd_exam)

    g = esub.add_parser(
        "gen",
        help="generation metrics: BLEU-4 (characters), ROUGE-1/2/L (jieba words), exact match",
        description="Generate greedy answers for every record of --data (the last assistant turn is the "
        "reference) and score them as LLaMA-Factory's predict does: BLEU-4 on characters (NLTK smoothing "
        "method 3), ROUGE-1/2/L F1 on jieba words (rouge-chinese), plus exact match, all x100. Writes gen.json, "
        "gen.md, gen_scores.jsonl and gen_predictions.jsonl to RUN/eval (resumable).",
    )
    g.add_argument("run", help=RUN_HELP)
    g.add_argument("--data", required=True, nargs="+", help="test files in any supported format")
    add_options(g, InputOptions, skip=("format", "rejects", "allow_rejects", "progress"))
    add_options(g, GenEvalOptions)
    g.set_defaults(func=cmd_gen)

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
    j.add_argument("run", help=RUN_HELP)
    add_options(j, JudgeOptions)
    j.set_defaults(func=cmd_judge)

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
    c.set_defaults(func=cmd_compare)

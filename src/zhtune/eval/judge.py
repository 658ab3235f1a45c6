"""``zhtune eval judge RUN --data FILE``: an LLM judge scores the run's answers, per class.

Top to bottom:

1. **Questions**: BELLE-eval's layout, ``{question, std_answer, class}`` per record (JSON Lines,
   a JSON array, CSV, ...; any file ``zhtune data convert`` reads). Class names are normalised
   (Unicode NFKC, so a non-breaking space is a space; case; ``_``/``-`` as spaces): the data
   says ``open qa`` and ``closed\\xa0qa`` where BELLE's prompts say ``open QA`` and ``closed QA``.
   Unusable records go to ``judge.rejects.jsonl`` with file, line, field and reason.
2. **Prompts**: one per class, from ``--prompts FILE`` (BELLE's ``eval_prompt.json`` or a JSON
   mapping class -> prompt), else ``eval_prompt.json`` beside the data, else zhtune's own
   (``assets/judge/<protocol>.json``). Every class must have one (or a ``default``) before
   anything runs.
3. **Answers**: the run answers each question greedily with :func:`zhtune.infer.predict.predict`
   (batched, resumable: ``judge_answers.jsonl``).
4. **Judge**: each (question, answer) becomes the judge message of its class (BELLE's layout:
   the class prompt, the question, the gold answer except for generation, brainstorming and
   rewrite, the model's answer), sent at temperature 0 through
   :class:`zhtune.llm.client.ChatClient` (concurrency, retries, SQLite reply cache). The score
   is parsed from the reply with an ordered list of patterns (:data:`PROTOCOLS`); a reply with
   no score is asked once more and, if still without one, recorded as ``unparsed`` and counted,
   never scored 0. Judgements are appended to ``judge.jsonl`` as they arrive; a re-run judges
   only the questions not in it (and the cache answers anything asked before).
5. **Report**: the mean score per class (over parsed replies), ``score`` (the mean over classes)
   and ``score_w/o_others`` (BELLE's: without the "others" classes math and code), with counts
   and unparsed counts, in ``judge.json``, ``judge.md`` and the run's ``report.md``.

A second protocol, ``mtbench``, grades single answers MT-bench style: a 1-10 rating in
``[[rating]]``, the gold answer given as a reference for math, reasoning and coding questions,
normalised to 0-1 (/10) for the report beside the raw mean.

Steps 1 and 2 and the protocols live in :mod:`zhtune.eval.judge_prompts`; this module answers,
judges and reports.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from zhtune.errors import ZhtuneError, where
from zhtune.eval.judge_prompts import (
    BELLE_PATTERNS,
    DEFAULT_KEY,
    MTBENCH_PATTERNS,
    PROTOCOLS,
    Prompts,
    Protocol,
    Question,
    choose_prompts,
    get_protocol,
    judge_messages,
    load_prompts,
    normalize_class,
    parse_score,
    read_questions,
)
from zhtune.eval.report import fmt_value, markdown_table, write_run_report
from zhtune.flags import flag
from zhtune.infer.generate import GenerationOptions
from zhtune.infer.predict import done_ids, predict
from zhtune.llm.client import ApiError, map_limited
from zhtune.llm.options import EndpointOptions
from zhtune.models.device import RuntimeOptions, resolve_device
from zhtune.progress import progress_bar
from zhtune.rundir import eval_dir, read_jsonl_rows, write_text_atomic

OTHERS = frozenset({"math", "code"})
"""BELLE's "others" classes, left out of ``score_w/o_others`` (normalised names)."""
ANSWERS, JUDGEMENTS, REPORT_JSON, REPORT_MD, CACHE, QUESTIONS = (
    "judge_answers.jsonl",
    "judge.jsonl",
    "judge.json",
    "judge.md",
    "judge_cache.sqlite",
    "judge_questions.jsonl",
)
FAILURES = "judge_failures.jsonl"
"""Questions the judge failed for good, one ``{"id", "error"}`` row each (appended per run)."""
MAX_CONSECUTIVE_FAILURES = 5
"""Give up when this many new questions in a row fail at the judge (it is down, not flaky);
questions that failed on an earlier run do not count (they may fail for good, e.g. a content
filter), so a re-run always gets past them to the questions never asked."""
FATAL_STATUSES = frozenset({401, 402, 403, 404})
"""Judge errors that would be the same for every question (key, billing, model name): stop at
once. Any other failure (a prompt too long for the judge, retries exhausted) fails that question
only: it is counted, left out of judge.jsonl and asked again on the next run."""


# --------------------------------------------------------------------------------------------
# Score parsing: patterns as data, tried in order
# --------------------------------------------------------------------------------------------
def generate_answers(run: str, questions: list[Question], out: Path, opts: JudgeOptions) -> dict[str, str]:
    """The run's greedy answer to every question, generated where ``judge_answers.jsonl`` lacks
    it (:func:`zhtune.infer.predict.predict`: batched, appended as it goes, resumable)."""

    qfile = out / QUESTIONS
    lines = [
        {"id": q.id, "messages": [{"role": "user", "content": q.question}], "meta": {"class": q.cls}}
        for q in questions
    ]
    write_text_atomic(qfile, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
    answers_path = out / ANSWERS
    options = GenerationOptions(max_new_tokens=opts.max_new_tokens, temperature=0.0)
    status = predict(
        run,
        [str(qfile)],
        str(answers_path),
        options,
        batch_size=opts.batch_size,
        template=opts.template or None,
        dtype=opts.runtime.dtype,
        device=opts.runtime.device,
        trust_remote_code=opts.runtime.trust_remote_code,
        fmt="openai",
        progress=opts.progress,
    )
    if status:
        raise ZhtuneError(f"answer generation rejected questions (see {qfile.with_suffix('.rejects.jsonl')})")
    answers: dict[str, str] = {}
    asked = {q.id: q.question for q in questions}
    for lineno, line in enumerate(answers_path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            if row["id"] in asked and row["messages"][-1]["content"] != asked[row["id"]]:
                raise ZhtuneError(
                    f"{where(str(answers_path), lineno)}: id {row['id']!r} answers another question than "
                    f"{opts.data} asks now; delete {answers_path} or choose another -o"
                )
            answers[row["id"]] = row["prediction"]
    return answers


# --------------------------------------------------------------------------------------------
# 4. Judge
# --------------------------------------------------------------------------------------------
def read_judgements(path: Path) -> dict[str, dict[str, Any]]:
    """The newest row per id already in ``judge.jsonl`` (a cut-off last line from a kill is
    repaired; rows are appended, so a later row of an id supersedes an earlier one)."""

    if not path.exists():
        return {}
    done_ids(path)  # repairs or drops an incomplete last line
    rows = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            rows[str(row["id"])] = row
    return rows


def still_valid(row: dict[str, Any] | None, protocol: Protocol, model: str, prompt: str) -> bool:
    """Whether an earlier judgement stands: same protocol, same judge model and the very same
    judge prompt (so the same question, answer and class prompt). Anything else is judged again
    (the reply cache still answers what was asked before)."""
    return row is not None and (row.get("protocol"), row.get("judge_model"), row.get("judge_prompt")) == (
        protocol.name,
        model,
        prompt,
    )


async def judge_one(
    client: Any, protocol: Protocol, messages: list[dict], max_tokens: int
) -> tuple[float | None, str | None, str, int]:
    """Ask the judge (temperature 0); a reply without a score is asked once more (a new
    request, not the cached one). Returns (raw score or None, pattern, last reply, attempts)."""
    reply = ""
    for attempt in range(2):
        extra = "" if attempt == 0 else f"unparsed-retry-{attempt}"
        answer = await client.chat(messages, cache_extra=extra, temperature=0, max_tokens=max_tokens)
        reply = answer.text
        value, how = parse_score(reply, protocol.patterns, protocol.low, protocol.high, protocol.noise)
        if value is not None:
            return value, how, reply, attempt + 1
    return None, None, reply, 2


def run_judge(
    todo: list[tuple[Question, str]],
    out_file: Path,
    protocol: Protocol,
    prompts: Prompts,
    endpoint: Any,
    opts: JudgeOptions,
    cache: str,
    failed_before: frozenset[str] = frozenset(),
) -> tuple[list[dict[str, Any]], Any, list[str]]:
    """Judge every (question, answer) of ``todo``, appending each row to ``out_file`` as it
    arrives. Returns (new rows, usage, failures). A question that fails at the judge for good
    is left out and recorded in ``judge_failures.jsonl`` beside ``out_file`` (a re-run asks
    again, after the questions never asked, see :data:`MAX_CONSECUTIVE_FAILURES`); a
    non-retryable error (bad key, unknown model) stops all."""

    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    streak = [0]

    async def go() -> Any:
        async with opts.judge.client(cache, flag_prefix="judge-") as client:
            with (
                out_file.open("a", encoding="utf-8") as f,
                (out_file.parent / FAILURES).open("a", encoding="utf-8") as failed,
                progress_bar("judge", opts.progress, total=len(todo), unit=" answers") as bar,
            ):

                async def work(item: tuple[Question, str]) -> None:
                    q, answer = item
                    messages = judge_messages(protocol, prompts, q, answer)
                    try:
                        raw, how, reply, attempts = await judge_one(
                            client, protocol, messages, opts.judge.max_tokens
                        )
                    except ApiError as e:
                        if e.status in FATAL_STATUSES:
                            raise  # the same for every request: stop at once
                        failures.append(f"{q.id}: {e}")
                        failed.write(json.dumps({"id": q.id, "error": str(e)}, ensure_ascii=False) + "\n")
                        failed.flush()
                        if q.id in failed_before:
                            return  # known to fail: says nothing about the judge being down
                        streak[0] += 1
                        if streak[0] >= MAX_CONSECUTIVE_FAILURES:
                            raise ZhtuneError(
                                f"the judge failed {streak[0]} times in a row, giving up; last error: {e}"
                            ) from None
                        return
                    streak[0] = 0
                    row = {
                        "id": q.id,
                        "class": q.cls,
                        "question": q.question,
                        "std_answer": q.std_answer,
                        "answer": answer,
                        "judge_prompt": messages[-1]["content"],
                        "judge_reply": reply,
                        "score": None if raw is None else raw / protocol.high,
                        "raw_score": raw,
                        "unparsed": raw is None,
                        "parsed_by": how,
                        "attempts": attempts,
                        "protocol": protocol.name,
                        "judge_model": endpoint.model,
                    }
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    f.flush()
                    rows.append(row)

                # never-asked questions first: a re-run gets to them whatever the known failures do
                ordered = sorted(todo, key=lambda item: item[0].id in failed_before)
                await map_limited(ordered, work, progress=bar)
            return client.usage

    usage = asyncio.run(go())
    return rows, usage, failures


# --------------------------------------------------------------------------------------------
# 5. Report
# --------------------------------------------------------------------------------------------
def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def macro_scores(class_means: dict[str, float | None]) -> tuple[float | None, float | None]:
    """``score`` (the mean of the class means) and ``score_w/o_others`` (the same without the
    "others" classes math and code), as the BELLE paper reports them. Classes with no parsed
    score are left out of both."""
    scored = {c: v for c, v in class_means.items() if v is not None}
    plain = [v for c, v in scored.items() if c not in OTHERS]
    return _mean(list(scored.values())), _mean(plain)


def summarize(rows: list[dict[str, Any]], protocol: Protocol) -> dict[str, Any]:
    """Per-class means, counts and unparsed counts, ``score`` and ``score_w/o_others``."""
    by_class: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_class.setdefault(row["class"], []).append(row)
    scores = {c: _mean([r["score"] for r in rs if r["score"] is not None]) for c, rs in by_class.items()}
    raw = {c: _mean([r["raw_score"] for r in rs if r["raw_score"] is not None]) for c, rs in by_class.items()}
    unparsed = {c: sum(r["unparsed"] for r in rs) for c, rs in by_class.items()}
    score, without = macro_scores(scores)
    report: dict[str, Any] = {
        "metric": "judge",
        "overall": score,
        "scores": scores,
        "counts": {c: len(rs) for c, rs in by_class.items()},
        "score": score,
        "score_w/o_others": without,
        "others": sorted(OTHERS),
        "unparsed": unparsed,
        "unparsed_total": sum(unparsed.values()),
        "protocol": protocol.name,
    }
    if protocol.high != 1.0:
        report["raw_scores"] = raw
        report["raw_score"], report["raw_score_w/o_others"] = macro_scores(raw)
        report["scale"] = [protocol.low, protocol.high]
    return report


def report_markdown(report: dict[str, Any]) -> str:
    """``judge.md``: a row per class (n, mean score, unparsed), then score and score_w/o_others."""

    raw = "raw_scores" in report
    head = ["class", "n", "score", "unparsed"] + (["raw mean (1-10)"] if raw else [])
    rows = []
    for c, n in report["counts"].items():
        row = [c, n, fmt_value(report["scores"][c]), report["unparsed"][c]]
        rows.append(row + ([fmt_value(report["raw_scores"][c], "{:.2f}")] if raw else []))
    plain = [c for c in report["counts"] if c not in OTHERS]
    for key, classes, raw_key in (
        ("score", list(report["counts"]), "raw_score"),
        ("score_w/o_others", plain, "raw_score_w/o_others"),
    ):
        row = [
            f"**{key}**",
            sum(report["counts"][c] for c in classes),
            f"**{fmt_value(report[key])}**",
            sum(report["unparsed"][c] for c in classes),
        ]
        rows.append(row + ([fmt_value(report[raw_key], "{:.2f}")] if raw else []))
    u = report["unparsed_total"]
    lines = [
        f"# Judge: {report['data']}",
        "",
        f"Protocol {report['protocol']}, judge `{report['judge_model']}` at {report['judge_url']}, "
        f"prompts: {report['prompts']}. {report['judged']:,} of {report['questions']:,} questions judged"
        + (f", {report['failed']:,} failed at the judge (re-run to retry)" if report["failed"] else "")
        + ".",
        "",
        markdown_table(head, rows),
        "",
        'score: the mean of the class means; score_w/o_others: the same without the "others" classes '
        f"({', '.join(report['others'])}), as in the BELLE paper. Class means are over parsed replies"
        + (
            f": {u:,} {'reply' if u == 1 else 'replies'} had no score even when asked again "
            "(counted in 'unparsed', not scored)."
            if u
            else "; every reply had a score."
        ),
    ]
    if raw:
        lines.append("Scores are the judge's 1-10 ratings / 10; the raw means are beside them.")
    if report.get("usage"):
        us = report["usage"]
        lines += [
            "",
            f"Judge requests: {us['requests']:,} ({us['cached']:,} from the cache), {us['retries']:,} retries; "
            f"tokens {us['prompt_tokens']:,} prompt + {us['completion_tokens']:,} completion.",
        ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------
def default_judge() -> EndpointOptions:
    """The judge endpoint's defaults: those of any endpoint, with shorter replies (a score and
    its reasons fit in 1,024 tokens)."""
    return EndpointOptions(max_tokens=1024)


@dataclass
class JudgeOptions:
    """Options of ``zhtune eval judge``."""

    data: str = flag(default="", required=True)
    """Questions: BELLE-eval's {question, std_answer, class} records (JSON Lines, JSON, CSV, ...)."""
    judge: EndpointOptions = flag(
        default_factory=default_judge, prefix="judge-",
        aliases={"base_url": ("--judge-url",), "concurrency": ("--concurrency",),
                 "max_retries": ("--max-retries",), "timeout": ("--timeout",), "backoff": ("--backoff",)},
    )  # fmt: skip
    """The judge: its endpoint and how to talk to it (--judge-base-url, --judge-model, --judge-api-key, --judge-concurrency, ...; the older --judge-url, --concurrency, --max-retries, --timeout and --backoff still work)."""
    protocol: str = flag(default="belle", choices=("belle", "mtbench"))
    """belle (0-1 score after 得分, per-class prompts) or mtbench (1-10 in [[rating]])."""
    prompts: str = ""
    """Judge prompts: BELLE's eval_prompt.json or a JSON mapping class -> prompt with {question}, {answer}, {std_answer} slots; empty: eval_prompt.json beside --data for belle, else built-in prompts."""
    output: str = flag(default="", short="-o")
    """Folder for judge.jsonl, judge.json, judge.md, report.md, answers and cache; empty: RUN/eval."""
    limit: int = 0
    """Judge only the first N questions (0: all)."""
    judge_cache: str = ""
    """SQLite cache of judge replies, so re-runs pay nothing twice; empty: OUTPUT/judge_cache.sqlite."""
    batch_size: int = 8
    """Questions answered together by the run."""
    max_new_tokens: int = 512
    """Most tokens in the run's answers (greedy)."""
    template: str = ""
    """Chat template for the run's prompts; empty: the run's own."""
    runtime: RuntimeOptions = flag(default_factory=RuntimeOptions)
    """Device, dtype and whether the model's own code may run (--device, --dtype, --trust-remote-code)."""
    progress: bool = True
    """Show progress bars."""


def judge(run: str, opts: JudgeOptions) -> dict[str, Any]:
    """``zhtune eval judge``: answer, judge and report; returns the report (also in judge.json).
    ``report["failed"]`` counts questions the judge never answered (not in the report)."""

    protocol = get_protocol(opts.protocol)
    opts.judge.check(flag_prefix="judge-")
    for name in ("batch_size", "max_new_tokens"):
        if getattr(opts, name) < 1:
            raise ZhtuneError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(opts, name)}")
    if opts.limit < 0:
        raise ZhtuneError(f"--limit must be >= 0, got {opts.limit}")
    if not opts.data:
        raise ZhtuneError("--data: give the questions file (e.g. ../shared/data/belle/eval_set.json)")
    endpoint = opts.judge.resolve(flag_prefix="judge-")
    if not Path(run).exists():
        raise ZhtuneError(f"run or model directory not found: {run}")
    resolve_device(opts.runtime.device)  # a device this machine lacks fails before anything is asked
    out = Path(opts.output) if opts.output else eval_dir(run)
    out.mkdir(parents=True, exist_ok=True)

    # 1 + 2: questions and prompts, all checked before anything runs
    questions = read_questions(opts.data, str(out / "judge.rejects.jsonl"))
    if opts.limit:
        questions = questions[: opts.limit]
    prompts = choose_prompts(opts.prompts, opts.data, protocol)
    classes = list(dict.fromkeys(q.cls for q in questions))
    missing = prompts.missing(classes)
    if missing:
        raise ZhtuneError(
            f"{prompts.source}: no prompt for class(es) {', '.join(missing)} (it has: "
            f"{', '.join(sorted(prompts.templates))}); add them or a '{DEFAULT_KEY}' prompt"
        )
    print(
        f"zhtune eval judge: {len(questions):,} questions in {len(classes)} classes from {opts.data}; "
        f"protocol {protocol.name}, judge {endpoint.model} at {endpoint.base_url}; prompts: {prompts.source}",
        file=sys.stderr,
    )

    # 3: answers
    answers = generate_answers(run, questions, out, opts)

    # 4: judge what is not judged yet
    judged_path = out / JUDGEMENTS
    earlier = read_judgements(judged_path)
    done = {
        q.id: earlier[q.id]
        for q in questions
        if still_valid(
            earlier.get(q.id),
            protocol,
            endpoint.model,
            judge_messages(protocol, prompts, q, answers[q.id])[-1]["content"],
        )
    }
    todo = [(q, answers[q.id]) for q in questions if q.id not in done]
    stale = sum(q.id in earlier for q, _ in todo)
    print(
        f"judging {len(todo):,} answers ({len(done):,} judged earlier"
        + (
            f"; {stale:,} judged earlier with another judge, prompt or answer are judged again"
            if stale
            else ""
        )
        + ")",
        file=sys.stderr,
    )
    cache = opts.judge_cache or str(out / CACHE)
    failed_before = frozenset(str(r.get("id")) for r in read_jsonl_rows(out / FAILURES))
    new_rows, usage, failures = run_judge(
        todo, judged_path, protocol, prompts, endpoint, opts, cache, failed_before
    )
    done.update({r["id"]: r for r in new_rows})

    # 5: report over this question set, in data order
    rows = [done[q.id] for q in questions if q.id in done]
    report = summarize(rows, protocol)
    report.update(
        judge_model=endpoint.model,
        judge_url=endpoint.base_url,
        prompts=prompts.source,
        data=opts.data,
        questions=len(questions),
        judged=len(rows),
        failed=len(failures),
        usage={k: v for k, v in asdict(usage).items() if k not in ("price_in", "price_out")},
    )
    write_text_atomic(out / REPORT_JSON, json.dumps(report, ensure_ascii=False, indent=1) + "\n")
    write_text_atomic(out / REPORT_MD, report_markdown(report))
    write_run_report(out)
    if failures:
        n = len(failures)
        print(f"{n:,} question{'s' * (n != 1)} failed at the judge (re-run to retry):", file=sys.stderr)
        print("\n".join(f"  {f}" for f in failures[:5]), file=sys.stderr)
    print(f"judge: {usage.summary()}", file=sys.stderr)
    return report


def print_summary(report: dict[str, Any], out: Path) -> None:
    """The command's stdout: the per-class table and where the files are."""
    print(report_markdown(report))
    print(f"Files: {out / REPORT_JSON}, {out / REPORT_MD}, {out / JUDGEMENTS}, {out / 'report.md'}")


__all__ = [
    "BELLE_PATTERNS",
    "MTBENCH_PATTERNS",
    "OTHERS",
    "PROTOCOLS",
    "JudgeOptions",
    "Protocol",
    "Question",
    "judge",
    "judge_messages",
    "load_prompts",
    "macro_scores",
    "normalize_class",
    "parse_score",
    "read_questions",
    "summarize",
]

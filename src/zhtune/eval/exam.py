"""Multiple-choice exams (C-Eval, CMMLU, MMCU): per-subject accuracy, category means, overall.

``zhtune eval exam RUN --data DIR_OR_FILE`` reads one file per subject (``test/`` for the
questions, ``dev/`` for the few-shot examples), builds CMMLU's prompt::

    以下是关于{科目}的单项选择题，请直接给出正确答案的选项。

    题目：...
    A. ...
    B. ...
    C. ...
    D. ...
    答案：C

    题目：...
    答案：

and scores each question by the model's next-token logits over the letters A-D (as CMMLU's and
LLaMA-Factory's evaluators do): one batched forward pass per batch of prompts of similar length,
left-padded. The header and shots that a subject's prompts share are run once, and each batch
runs only its questions against their key/value cache. Subjects whose answers can be several
letters (MMCU) are scored by greedy generation plus MMCU's extraction rule instead, the
prediction counting only if it names exactly the right set of letters.

The report is the mean accuracy of the subjects (not of the questions), the mean per category
(CMMLU's STEM / Humanities / Social Science / Other / China specific, C-Eval's four; an unknown
subject counts as Other), and every prediction with the letter probabilities. Predictions are
appended one subject at a time, so an interrupted run resumes at the first unfinished subject.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zhtune.data.readers import RawError, iter_raw
from zhtune.data.templates import render
from zhtune.errors import ZhtuneError, where
from zhtune.eval.exam_prompts import PROMPTS, PromptLayout, resolve_prompt
from zhtune.flags import flag
from zhtune.infer.generate import GenerationOptions, Prompter, generate_replies, left_pad
from zhtune.infer.prefix import prefix_cache, repeat_cache, shared_prefix_length
from zhtune.models.device import RuntimeOptions, resolve_device, resolve_dtype
from zhtune.models.loading import load_for_inference
from zhtune.progress import progress_bar
from zhtune.rundir import RunDir, write_text_atomic

LETTERS = ("A", "B", "C", "D")

# --------------------------------------------------------------------------------------------
# 1. Subjects and categories (data tables)
# --------------------------------------------------------------------------------------------
STEM, HUM, SOC, OTHER, CHINA = "STEM", "Humanities", "Social Science", "Other", "China specific"


@dataclass(frozen=True)
class Subject:
    """One row of a benchmark's subject table."""

    zh: str
    """The Chinese name that goes into the prompt header (以下是关于{zh}的单项选择题...)."""
    categories: tuple[str, ...]
    """Categories whose means include this subject (CMMLU puts some in two)."""


def _subject_table(benchmark: str) -> dict[str, Subject]:
    """A benchmark's subject table from ``assets/exam/<benchmark>.json`` (its source named there)."""
    data = json.loads((ASSETS / f"{benchmark}.json").read_text(encoding="utf-8"))
    return {k: Subject(v["zh"], tuple(v["categories"])) for k, v in data["subjects"].items()}


ASSETS = Path(__file__).resolve().parent.parent / "assets" / "exam"
BENCHMARKS: dict[str, dict[str, Subject]] = {b: _subject_table(b) for b in ("cmmlu", "ceval")}
"""Subject tables by benchmark (data: CMMLU's 67 subjects, C-Eval's 52); a data set uses the
table that knows most of its subjects."""
CMMLU, CEVAL = BENCHMARKS["cmmlu"], BENCHMARKS["ceval"]

CATEGORY_ORDER = (STEM, HUM, SOC, OTHER, CHINA)


def subject_info(name: str, table: dict[str, Subject]) -> Subject:
    """The table row of subject ``name``; an unknown subject (MMCU's, your own) is named as is
    in the prompt and counts as Other."""
    return table.get(name) or Subject(name.replace("_", " "), (OTHER,))


def pick_benchmark(subjects: list[str], test_files: list[str] | tuple[str, ...] = ()) -> str:
    """The benchmark of an exam: C-Eval if its files are named as C-Eval's
    (``{subject}_{split}.csv``, which CMMLU's never are), else the one whose table holds most of
    ``subjects`` ("other" if none holds any)."""
    if any(Path(f).stem.endswith(SUFFIXES) for f in test_files):
        return "ceval"
    best = max(BENCHMARKS, key=lambda b: sum(s in BENCHMARKS[b] for s in subjects))
    return best if any(s in BENCHMARKS[best] for s in subjects) else "other"


# --------------------------------------------------------------------------------------------
# 2. Reading questions: CSV (C-Eval, CMMLU), JSON / JSON Lines, xlsx (MMCU)
# --------------------------------------------------------------------------------------------
@dataclass
class Question:
    """One multiple-choice question."""

    id: str
    """The file's ``id`` column, else the 0-based row number within its subject."""
    subject: str
    question: str
    options: dict[str, str]
    """Letter -> option text, A-D."""
    answer: str
    """The right letter(s), sorted (``"C"``, or ``"ABD"`` for an MMCU multi-answer question)."""
    source: str = ""
    """``file:line`` where the question was read (for error messages)."""


COLUMN_ALIASES: dict[str, str] = {
    "question": "question",
    "题目": "question",
    "问题": "question",
    "answer": "answer",
    "答案": "answer",
    "id": "id",
    "subject": "subject",
    **{letter.lower(): letter for letter in LETTERS},
}
"""Header names (case-insensitive) -> field. CMMLU writes ``Question, A-D, Answer`` after an
unnamed index column; C-Eval ``id, question, A-D, answer, explanation``."""

_FULL_WIDTH = str.maketrans("ＡＢＣＤａｂｃｄ", "ABCDabcd")
SUFFIXES = ("_test", "_val", "_dev")
"""C-Eval names its files ``{subject}_{split}.csv``; the suffix is not part of the subject."""


def normalize_answer(value: str) -> str:
    """Answer cell -> sorted letters: ``" c"`` -> ``"C"``, ``"Ｂ、Ａ"`` -> ``"AB"``; anything
    else (another letter, an empty cell) -> ``""``."""
    text = re.sub(r"[\s、,，;；.．/]", "", str(value).translate(_FULL_WIDTH)).upper()
    if not text or any(c not in LETTERS for c in text):
        return ""
    return "".join(sorted(set(text)))


def _cell(value: Any) -> str:
    """A cell's text as the file has it (the official evaluators keep its spaces); layouts that
    strip, strip."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _fields(raw: dict[str, Any]) -> dict[str, Any]:
    """Rename a raw record's keys to question/A-D/answer/id/subject (others dropped); an
    ``options``/``choices`` list becomes A-D."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = COLUMN_ALIASES.get(str(key).strip().lower())
        if name:
            out[name] = value
        elif str(key).strip().lower() in ("options", "choices") and isinstance(value, list):
            out.update(zip(LETTERS, value))
    return out


def parse_question(raw: dict[str, Any], path: str, line: int, subject: str, index: int) -> Question:
    """Check and convert one raw record; a missing field or an answer outside A-D raises
    :class:`ZhtuneError` naming the file, line and field."""
    f = _fields(raw)
    for name in ("question", *LETTERS, "answer"):
        if name not in f:
            header = ", ".join(str(k) for k in raw) or "nothing"
            raise ZhtuneError(f"{where(path, line, name)}: missing (the record has {header})")
    answer = normalize_answer(_cell(f["answer"]))
    if not _cell(f["answer"]).strip():
        raise ZhtuneError(
            f"{where(path, line, 'answer')}: empty; scoring needs the right answers "
            "(C-Eval's test split has none public: use --split val)"
        )
    if not answer:
        raise ZhtuneError(
            f"{where(path, line, 'answer')}: {_cell(f['answer']).strip()!r} is not an option letter "
            f"({', '.join(LETTERS)}, or several of them)"
        )
    question = _cell(f["question"])
    if not question.strip():
        raise ZhtuneError(f"{where(path, line, 'question')}: empty")
    qid = _cell(f.get("id")).strip() or str(index)
    return Question(qid, subject, question, {c: _cell(f[c]) for c in LETTERS}, answer, f"{path}:{line}")


def _iter_xlsx(path: str) -> Iterator[tuple[str | None, int, dict[str, Any]]]:
    """Rows of every sheet of an xlsx file as ``(sheet, row number, {header: value})``; the sheet
    is None when the workbook has only one."""
    try:
        import openpyxl
    except ImportError:
        raise ZhtuneError(
            f"{path}: reading xlsx needs openpyxl: pip install -c constraints.txt -e '.[exam]'"
        ) from None
    book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    try:
        sheets = book.worksheets
        for sheet in sheets:
            rows = sheet.iter_rows(values_only=True)
            header = [_cell(h).strip() for h in next(rows, ())]
            for number, row in enumerate(rows, 2):
                if all(v is None or not _cell(v).strip() for v in row):
                    continue
                yield (sheet.title if len(sheets) > 1 else None), number, dict(zip(header, row))
    finally:
        book.close()


def iter_records(path: str) -> Iterator[tuple[str | None, int, dict[str, Any]]]:
    """``(subject or None, line, raw record)`` for every record of a CSV/TSV/JSON/JSONL/xlsx file.
    The subject comes from an xlsx sheet name or a ``subject`` field, else None (the file's)."""
    if path.lower().endswith((".xlsx", ".xlsm")):
        yield from _iter_xlsx(path)
        return

    for line, raw in iter_raw(path):
        if isinstance(raw, RawError):
            raise ZhtuneError(f"{where(path, line)}: {raw.reason}")
        subject = _fields(raw).get("subject")
        yield (str(subject) if subject else None), line, raw


EXAM_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".xlsx", ".xlsm")


def subject_of(path: str) -> str:
    """The subject a file holds: its name without extension and split suffix."""
    stem = Path(path).stem
    for suffix in SUFFIXES:
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def read_questions(paths: list[str]) -> dict[str, list[Question]]:
    """Questions by subject, in file order."""
    out: dict[str, list[Question]] = defaultdict(list)
    for path in paths:
        default = subject_of(path)
        for subject, line, raw in iter_records(path):
            name = subject or default
            out[name].append(parse_question(raw, path, line, name, len(out[name])))
    return dict(out)


def _files(folder: Path) -> list[str]:
    return sorted(
        str(p) for p in folder.iterdir() if p.suffix.lower() in EXAM_SUFFIXES and not p.name.startswith(".")
    )


@dataclass
class ExamData:
    """The questions to score and the few-shot examples, by subject."""

    test: dict[str, list[Question]]
    dev: dict[str, list[Question]]
    test_files: list[str]
    dev_folder: str | None
    file_subject: dict[str, str] = field(default_factory=dict)
    """Subject -> the subject of its test file (an xlsx sheet -> its workbook), to find dev examples."""


def load_exam(data: str, split: str = "test", subjects: list[str] | None = None) -> ExamData:
    """Find and read an exam: ``DATA/{split}/*`` (or the files of DATA, or one file) with few-shot
    examples from the ``dev`` folder beside the test folder, if there is one."""
    p = Path(data)
    if not p.exists():
        raise ZhtuneError(f"exam data not found: {data}")
    if p.is_dir():
        folder = p / split if (p / split).is_dir() else p
        files = _files(folder)
        if not files:
            raise ZhtuneError(f"no exam files ({', '.join(EXAM_SUFFIXES)}) in {folder}")
    else:
        folder, files = p.parent, [str(p)]
    dev_folder = folder.parent / "dev" if folder.name != "dev" else None
    test: dict[str, list[Question]] = {}
    file_subject: dict[str, str] = {}
    for path in files:
        for name, qs in read_questions([path]).items():
            test.setdefault(name, []).extend(qs)
            file_subject[name] = subject_of(path)
    if subjects:
        unknown = [s for s in subjects if s not in test]
        if unknown:
            raise ZhtuneError(
                f"unknown subject(s) {', '.join(unknown)}; {data} has: {', '.join(sorted(test))}"
            )
        test = {s: test[s] for s in subjects}
    dev: dict[str, list[Question]] = {}
    if dev_folder is not None and dev_folder.is_dir():
        dev = read_questions(_files(dev_folder))
    return ExamData(
        test, dev, files, str(dev_folder) if dev_folder and dev_folder.is_dir() else None, file_subject
    )


# --------------------------------------------------------------------------------------------
# 3. Prompts
# --------------------------------------------------------------------------------------------
def format_question(q: Question, with_answer: bool, layout: PromptLayout = PROMPTS["cmmlu"]) -> str:
    """One question in ``layout`` (CMMLU's: ``题目：...\nA. ...\nD. ...\n答案是：``), plus its
    answer and a blank line when ``with_answer``."""
    question = q.question.strip() if layout.strip_question else q.question
    text = (
        layout.question_prefix + question + "".join(f"\n{c}. {layout.option(q.options[c])}" for c in LETTERS)
        + "\n" + layout.answer_prefix
    )  # fmt: skip
    return text + layout.answer_sep + q.answer + "\n\n" if with_answer else text


def header(
    subject: str, table: dict[str, Subject], multi: bool, layout: PromptLayout = PROMPTS["cmmlu"], benchmark: str = ""
) -> str:
    """The instruction line that opens every prompt of ``subject`` in ``layout``."""
    text = layout.multi_header if multi else layout.headers.get(benchmark, layout.headers[""])
    return text.format(subject=subject_info(subject, table).zh)


def raw_prompt(head: str, shots: list[Question], q: Question, layout: PromptLayout = PROMPTS["cmmlu"]) -> str:
    """The plain-text prompt: header, solved examples, the question."""
    return head + "".join(format_question(s, True, layout) for s in shots) + format_question(q, False, layout)


def chat_messages(
    head: str, shots: list[Question], q: Question, layout: PromptLayout = PROMPTS["cmmlu"]
) -> list[dict[str, str]]:
    """The prompt as a conversation (LLaMA-Factory's layout): each solved example is a user turn
    answered by the assistant with its letter(s); the header opens the first user turn."""
    messages: list[dict[str, str]] = []
    for s in [*shots, q]:
        messages.append({"role": "user", "content": format_question(s, False, layout)})
        if s is not q:
            messages.append({"role": "assistant", "content": s.answer})
    messages[0]["content"] = head + messages[0]["content"]
    return messages


class PromptBuilder:
    """Token ids of exam prompts, raw or through a chat template, that fit the context.

    ``template=None`` encodes :func:`raw_prompt` as plain text (with the tokenizer's usual
    special tokens); a template name lays out :func:`chat_messages` exactly as training did.
    """

    def __init__(
        self, tokenizer: Any, template: str | None, max_length: int, layout: PromptLayout = PROMPTS["cmmlu"]
    ) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = max_length
        self.layout = layout
        self.stop_ids: list[int] = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        if template is not None:

            self.prompter: Any = Prompter(tokenizer, template)
            self.stop_ids = self.prompter.stop_ids

    def encode(self, head: str, shots: list[Question], q: Question) -> list[int]:
        """The prompt ids for ``q`` after ``shots`` (no truncation)."""
        if self.template is None:
            return self.tokenizer(raw_prompt(head, shots, q, self.layout))["input_ids"]
        return self.prompter.prompt_ids(chat_messages(head, shots, q, self.layout))

    def build(self, head: str, shots: list[Question], q: Question) -> tuple[list[int], int]:
        """``(ids, shots used)``: shots are dropped from the front until the prompt fits in
        ``max_length``; without any, the header goes, and then the question's start is cut."""
        for k in range(len(shots), -1, -1):
            ids = self.encode(head, shots[len(shots) - k :], q)
            if len(ids) <= self.max_length:
                return ids, k
        ids = self.encode("", [], q)
        return ids[-self.max_length :], 0

    def letter_ids(self) -> list[int]:
        """The token id of each letter as the first token of an answer, found by encoding a
        solved one-question prompt and taking the token right after the unsolved one (so a
        tokenizer that writes the letter with a leading space, or joins it to the prefix, is
        handled as it would be in training). Distinct ids are required."""
        probe = Question("probe", "probe", "?", {c: c for c in LETTERS}, "A")
        prompt = self.encode("", [], probe)
        ids = []
        for letter in LETTERS:
            solved = Question("probe", "probe", "?", {c: c for c in LETTERS}, letter)
            if self.template is None:
                full = self.tokenizer(format_question(solved, True, self.layout).rstrip("\n"))["input_ids"]
            else:
                msgs = chat_messages("", [], solved, self.layout) + [{"role": "assistant", "content": letter}]

                full = render(self.prompter.template, msgs, self.tokenizer)[0]
            if full[: len(prompt)] == prompt and len(full) > len(prompt):
                ids.append(full[len(prompt)])
            else:  # the letter merged with the prefix: fall back to the letter on its own
                ids.append(self.tokenizer(letter, add_special_tokens=False)["input_ids"][0])
        if len(set(ids)) != len(ids):
            raise ZhtuneError(f"the tokenizer does not give A-D distinct first tokens: {ids}")
        return ids


# --------------------------------------------------------------------------------------------
# 4. Scoring
# --------------------------------------------------------------------------------------------
def batches_by_length(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices in batches of similar length, longest first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


#: A subject's prompts share their header and shots. A shared head at least this many tokens
#: long is run once and its key/value cache reused by every question of the subject (for 5-shot
#: CMMLU about 80% of each prompt); a shorter one is not worth the extra pass.
MIN_SHARED_PREFIX = 32


def letter_probs(
    model: Any,
    prompts: list[list[int]],
    letter_ids: list[int],
    pad_id: int,
    prefix: tuple[int, Any] | None = None,
) -> list[list[float]]:
    """Softmax over the four letters of the next-token logits after each prompt: one forward
    pass, left-padded, with the attention mask and position ids counting real tokens only (so
    a padded row gives the logits it gives alone).

    ``prefix`` is ``(n, cache)``: every prompt starts with the same ``n`` tokens, whose
    :func:`prefix_cache` is ``cache``; only the rest of each prompt is run, attending to a copy of
    the cache repeated for the batch (the padding then sits between the prefix and the rest,
    masked, and positions continue from ``n``). Same probabilities to float rounding (tested)."""
    import torch

    n, cache = prefix if prefix is not None else (0, None)
    ids, mask = left_pad([p[n:] for p in prompts], pad_id)
    positions = n + (mask.cumsum(-1) - 1).clamp(min=0)
    extra: dict[str, Any] = {"use_cache": False}
    if cache is not None:
        past = repeat_cache(cache, len(prompts))
        mask = torch.cat([torch.ones(len(prompts), n, dtype=mask.dtype), mask], dim=1)
        extra = {"use_cache": True, "past_key_values": past}
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            logits_to_keep=1,
            **extra,
        ).logits[:, -1, :]
    return torch.softmax(logits[:, letter_ids].float(), dim=-1).cpu().tolist()


_SEPARATORS = re.compile(r"[、.,;，；。．\s]")


def extract_letters(reply: str) -> str:
    """MMCU's rule: drop separators (、 . , ; ，), take the first run of 1-4 letters A-D without a
    repeated letter, sorted (``"答案是B、D"`` -> ``"BD"``); ``""`` if there is none."""
    text = _SEPARATORS.sub("", reply.translate(_FULL_WIDTH))
    for run in re.findall(r"[ABCD]{1,4}", text):
        if len(set(run)) == len(run):
            return "".join(sorted(run))
    return ""


# --------------------------------------------------------------------------------------------
# 5. The command
# --------------------------------------------------------------------------------------------
@dataclass
class ExamOptions:
    """Options of ``zhtune eval exam``."""

    data: str = flag(default="", required=True)
    """Exam folder (with test/ and dev/, or the test files themselves) or one file: CSV
    (C-Eval, CMMLU), JSON/JSONL, or xlsx (MMCU)."""
    output: str = flag(default="", short="-o")
    """Folder for exam.json, exam.md and exam_predictions.jsonl (default: RUN/eval)."""
    shots: int = 5
    """Solved dev examples before each question (0-5; dropped from the front if too long)."""
    subjects: str = ""
    """Comma-separated subjects to score (default: all)."""
    split: str = "test"
    """Folder of DATA holding the questions (C-Eval's test answers are not public: use val)."""
    scoring: str = "auto"
    """auto (letter logits; generation for subjects with multi-letter answers), logits, generate."""
    prompt: str = flag(default="auto", choices=("auto", *PROMPTS))
    """Question layout: auto (the benchmark's official one: CMMLU's, C-Eval's or MMCU's), cmmlu, ceval, mmcu, or lm-eval (lm-evaluation-harness's: 答案： A)."""
    template: str = "auto"
    """Prompt layout: auto (the run's chat template for a zhtune run or export, plain text for a
    plain model directory), none (plain text), or a template name."""
    batch_size: int = 16
    """Prompts per forward pass (batched by similar length)."""
    max_length: int = 0
    """Longest prompt in tokens (0: the model's context length)."""
    max_new_tokens: int = 16
    """Tokens generated per answer when scoring by generation."""
    runtime: RuntimeOptions = flag(default_factory=RuntimeOptions)
    """Device, dtype and whether the model's own code may run (--device, --dtype, --trust-remote-code)."""
    overwrite: bool = False
    """Start over instead of resuming from exam_predictions.jsonl."""
    progress: bool = True
    """Show a progress bar."""


SCORINGS = ("auto", "logits", "generate")
PREDICTIONS, REPORT_JSON, REPORT_MD, SETTINGS = (
    "exam_predictions.jsonl",
    "exam.json",
    "exam.md",
    "exam_settings.json",
)


def _resolve_template(run: str, option: str, run_template: str) -> str | None:
    """``--template`` -> a template name, or None for plain text."""
    if option == "none":
        return None
    if option != "auto":
        return option

    tuned = (rd := RunDir(run)).finished or rd.is_export
    return run_template if tuned else None


def _context_length(model: Any, tokenizer: Any) -> int:
    n = getattr(model.config, "max_position_embeddings", None) or getattr(tokenizer, "model_max_length", 0)
    return int(n) if n and n < 1_000_000 else 2048


def _finished(path: Path, counts: dict[str, int]) -> dict[str, list[dict[str, Any]]]:
    """Rows of the subjects of ``counts`` already complete in ``path``; rows of an unfinished one
    (a run killed while writing it) are removed from the file. Rows of other subjects (an earlier
    run with other ``--subjects``) stay in the file and are not returned."""
    if not path.exists():
        return {}
    rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            rows[row["subject"]].append(row)
        except (ValueError, KeyError, TypeError):
            if i == len(lines):  # a last line cut short by a kill
                break
            raise ZhtuneError(f"{where(str(path), i)}: not an exam prediction row; delete the file") from None
    keep = {s: r for s, r in rows.items() if s not in counts or len(r) == counts[s]}
    if sum(len(r) for r in keep.values()) != len(lines):
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for rs in keep.values() for r in rs)
    return {s: r for s, r in keep.items() if s in counts}


def summarize(
    rows: dict[str, list[dict[str, Any]]], table: dict[str, Subject]
) -> tuple[dict[str, float], dict[str, int], dict[str, float]]:
    """``(accuracy per subject, questions per subject, mean accuracy per category)``."""
    scores = {s: sum(r["correct"] for r in rs) / len(rs) for s, rs in sorted(rows.items())}
    counts = {s: len(rs) for s, rs in sorted(rows.items())}
    by_cat: dict[str, list[float]] = defaultdict(list)
    for s, acc in scores.items():
        for c in subject_info(s, table).categories:
            by_cat[c].append(acc)
    order = [c for c in CATEGORY_ORDER if c in by_cat] + sorted(set(by_cat) - set(CATEGORY_ORDER))
    return scores, counts, {c: sum(by_cat[c]) / len(by_cat[c]) for c in order}


def report_markdown(report: dict[str, Any], table: dict[str, Subject]) -> str:
    """exam.md: one row per subject, then the category means and the overall mean."""
    lines = [
        f"# Exam: {report['data']}",
        "",
        f"{report['shots']}-shot, prompt {report['prompt']}, {report['questions']:,} questions "
        f"in {len(report['scores'])} subjects, {report['benchmark']} categories.",
        "",
        "| subject | category | n | accuracy |",
        "| --- | --- | ---: | ---: |",
    ]
    for s, acc in report["scores"].items():
        cats = ", ".join(subject_info(s, table).categories)
        lines.append(f"| {s} | {cats} | {report['counts'][s]} | {100 * acc:.1f}% |")
    lines += ["", "| category | subjects | mean accuracy |", "| --- | ---: | ---: |"]
    for c, acc in report["categories"].items():
        n = sum(c in subject_info(s, table).categories for s in report["scores"])
        lines.append(f"| {c} | {n} | {100 * acc:.1f}% |")
    lines.append(
        f"| **overall (mean of subjects)** | {len(report['scores'])} | {100 * report['overall']:.1f}% |"
    )
    return "\n".join(lines) + "\n"


def _score_subject(
    model: Any,
    tokenizer: Any,
    builder: PromptBuilder,
    questions: list[Question],
    shots: list[Question],
    head: str,
    generate: bool,
    letter_ids: list[int],
    options: ExamOptions,
    step: Callable[[int], None],
) -> tuple[list[dict[str, Any]], int]:
    """Prediction rows of one subject (in question order) and how many prompts lost shots."""

    built = [builder.build(head, shots, q) for q in questions]
    prompts = [ids for ids, _ in built]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (builder.stop_ids or [0])[0]
    rows: list[dict[str, Any] | None] = [None] * len(questions)
    gen = GenerationOptions(max_new_tokens=options.max_new_tokens, temperature=0.0)
    shared = shared_prefix_length(prompts) if not generate else 0
    cache = prefix_cache(model, prompts[0][:shared]) if shared >= MIN_SHARED_PREFIX else None
    prefix = (shared, cache) if cache is not None else None
    for batch in batches_by_length([len(p) for p in prompts], options.batch_size):
        chunk = [prompts[i] for i in batch]
        if generate:
            replies = generate_replies(model, tokenizer, chunk, gen, builder.stop_ids or [pad_id])
            results = [(extract_letters(r.text.split("\n\n")[0]), {"reply": r.text}) for r in replies]
        else:
            probs = letter_probs(model, chunk, letter_ids, pad_id, prefix)
            results = [
                (LETTERS[max(range(4), key=p.__getitem__)], {"probs": dict(zip(LETTERS, p))}) for p in probs
            ]
        for i, (predicted, extra) in zip(batch, results):
            q = questions[i]
            rows[i] = {
                "id": q.id,
                "subject": q.subject,
                "answer": q.answer,
                "predicted": predicted,
                "correct": predicted == q.answer,
                **extra,
                "shots": built[i][1],
            }
        step(len(batch))
    return [r for r in rows if r is not None], sum(k < len(shots) for _, k in built)


def run_exam(run: str, options: ExamOptions) -> dict[str, Any]:
    """``zhtune eval exam``: score RUN on the exam in ``options.data``; returns the report (also
    written to OUTPUT/exam.json and exam.md, predictions to OUTPUT/exam_predictions.jsonl)."""

    device = resolve_device(options.runtime.device)  # a device this machine lacks fails before anything runs
    dtype = resolve_dtype(options.runtime.dtype, device)
    if not 0 <= options.shots <= 5:
        raise ZhtuneError(f"--shots must be between 0 and 5, got {options.shots}")
    if options.scoring not in SCORINGS:
        raise ZhtuneError(f"--scoring must be one of {', '.join(SCORINGS)}, got {options.scoring!r}")
    if options.batch_size < 1:
        raise ZhtuneError(f"--batch-size must be >= 1, got {options.batch_size}")
    wanted = [s.strip() for s in options.subjects.split(",") if s.strip()]
    exam = load_exam(options.data, options.split, wanted or None)
    benchmark = pick_benchmark(list(exam.test), exam.test_files)
    table = BENCHMARKS.get(benchmark, {})
    prompt = resolve_prompt(options.prompt, benchmark, any(f.endswith(".xlsx") for f in exam.test_files))
    layout = PROMPTS[prompt]

    def dev_for(subject: str) -> list[Question]:
        dev = exam.dev.get(subject) or exam.dev.get(exam.file_subject.get(subject, ""), [])
        if options.shots and len(dev) < options.shots:
            raise ZhtuneError(
                f"{options.shots}-shot needs {options.shots} dev examples of '{subject}'; found {len(dev)} in "
                f"{exam.dev_folder or 'no dev folder (expected beside the test folder)'}: use --shots {len(dev)}"
            )
        return dev[: options.shots]

    shots = {s: dev_for(s) for s in exam.test}
    multi = {s: any(len(q.answer) > 1 for q in [*qs, *shots[s]]) for s, qs in exam.test.items()}
    generate = {
        s: options.scoring == "generate" or (options.scoring == "auto" and multi[s]) for s in exam.test
    }

    out = Path(options.output or Path(run) / "eval")
    out.mkdir(parents=True, exist_ok=True)
    pred_path = out / PREDICTIONS
    settings = {
        "data": str(Path(options.data).resolve()),
        "split": options.split,
        "shots": options.shots,
        "scoring": options.scoring,
        "prompt": prompt,
        "template": options.template,
        "max_length": options.max_length,
        "dtype": dtype,  # resolved: auto on a CPU resumes an fp32 run
    }
    settings_path = out / SETTINGS
    if options.overwrite:
        pred_path.unlink(missing_ok=True)
    elif pred_path.exists() and settings_path.exists():
        before = json.loads(settings_path.read_text(encoding="utf-8"))
        changed = [k for k in settings if before.get(k) != settings[k]]
        if changed:
            raise ZhtuneError(
                f"{pred_path} holds predictions made with other settings ("
                + ", ".join(f"{k}: {before.get(k)!r} -> {settings[k]!r}" for k in changed)
                + "): pass --overwrite to start over, or -o for another folder"
            )
    write_text_atomic(settings_path, json.dumps(settings, ensure_ascii=False, indent=2) + "\n")
    counts = {s: len(qs) for s, qs in exam.test.items()}
    done = _finished(pred_path, counts)
    todo = [s for s in exam.test if s not in done]
    n_todo = sum(counts[s] for s in todo)
    print(
        f"zhtune eval exam: {sum(counts.values()):,} questions in {len(counts)} subjects ({benchmark}); "
        f"{len(done)} subjects already in {pred_path}; scoring {n_todo:,} at {options.shots}-shot"
        + (f" on {device} ({dtype})" if n_todo else ""),
        file=sys.stderr,
    )

    prompt_desc, letter_tokens, dropped, seconds = "", {}, 0, 0.0
    if todo:
        model, tokenizer, run_template = load_for_inference(
            run, dtype=dtype, device=device, trust_remote_code=options.runtime.trust_remote_code
        )
        template = _resolve_template(run, options.template, run_template)
        max_length = options.max_length or _context_length(model, tokenizer)
        builder = PromptBuilder(tokenizer, template, max_length, layout)
        letter_ids = builder.letter_ids()
        letter_tokens = dict(zip(LETTERS, letter_ids))
        prompt_desc = f"{prompt}, " + (f"chat:{template}" if template else "raw")
        t0 = time.perf_counter()
        with (
            open(pred_path, "a", encoding="utf-8") as f,
            progress_bar("exam", options.progress, total=n_todo, unit=" q") as bar,
        ):
            for s in todo:
                bar.set_postfix_str(s, refresh=False)
                head = header(s, table, multi[s], layout, benchmark)
                rows, lost = _score_subject(
                    model, tokenizer, builder, exam.test[s], shots[s], head, generate[s],
                    letter_ids, options, bar.update,
                )  # fmt: skip
                dropped += lost
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
                f.flush()
                done[s] = rows
        seconds = time.perf_counter() - t0
        print(
            f"scored {n_todo:,} questions in {seconds:.1f} s ({n_todo / max(seconds, 1e-9):.1f} questions/s, "
            f"batch size {options.batch_size}, prompt {prompt_desc})",
            file=sys.stderr,
        )
        if dropped:
            print(
                f"{dropped:,} prompts were too long for all {options.shots} shots; shots dropped from the front",
                file=sys.stderr,
            )

    done = {s: done[s] for s in exam.test}
    scores, n, categories = summarize(done, table)
    previous = (
        json.loads((out / REPORT_JSON).read_text(encoding="utf-8")) if (out / REPORT_JSON).exists() else {}
    )
    report = {
        "metric": "exam",
        "overall": sum(scores.values()) / len(scores),
        "scores": scores,
        "counts": n,
        "categories": categories,
        "shots": options.shots,
        "benchmark": benchmark,
        "data": options.data,
        "split": options.split,
        "prompt": prompt_desc or previous.get("prompt", ""),
        "scoring": {s: ("generate" if generate[s] else "logits") for s in exam.test},
        "letter_tokens": letter_tokens or previous.get("letter_tokens", {}),
        "questions": sum(n.values()),
        "shots_dropped": dropped,
        "seconds": round(seconds, 2),
        "questions_per_s": round(n_todo / seconds, 2) if seconds else None,
        "device": device if todo else previous.get("device", ""),
        "dtype": dtype,
        "run": str(run),
    }
    write_text_atomic(out / REPORT_JSON, json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    write_text_atomic(out / REPORT_MD, report_markdown(report, table))
    return report


def print_summary(report: dict[str, Any], out: str) -> None:
    """The category means and overall, as printed at the end of ``zhtune eval exam``."""
    parts = [f"{c} {100 * v:.1f}%" for c, v in report["categories"].items()]
    print(f"{'; '.join(parts)}")
    print(f"overall (mean of {len(report['scores'])} subjects): {100 * report['overall']:.1f}%  -> {out}")

"""What the judge asks and how its replies are read: steps 1 and 2 of ``zhtune eval judge``
(:mod:`zhtune.eval.judge`) and the protocols.

- **Protocols** (:data:`PROTOCOLS`): BELLE's 0-1 score after 得分, MT-bench's 1-10 ``[[rating]]``;
  each an ordered list of score patterns and how the judge message is wrapped.
- **Questions**: BELLE-eval's ``{question, std_answer, class}`` records, class names normalised;
  unusable records go to the rejects file with file, line, field and reason.
- **Prompts**: one per class (``--prompts FILE``, ``eval_prompt.json`` beside the data, or
  ``assets/judge/<protocol>.json``), filled into the judge message of each (question, answer).
"""

from __future__ import annotations

import json
import re
import sys
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zhtune.data.convert import Outcome, RejectWriter, make_record_id
from zhtune.data.readers import RawError, iter_raw
from zhtune.data.schema import RecordError
from zhtune.errors import ZhtuneError, where

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "judge"
SLOTS = ("question", "answer", "std_answer")
"""What a custom prompt may contain: ``{question}``, ``{answer}``, ``{std_answer}``."""
DEFAULT_KEY = "default"
"""The prompt-file key used for a class without its own prompt."""


@dataclass(frozen=True)
class ScorePattern:
    """One way a judge writes its score; group 1 is the number."""

    name: str
    regex: re.Pattern[str]


_NUM = r"(?<![\d.])(\d+(?:\.\d+)?)(?![\d])"
_LABEL = r"(?:得分|评分|分数|打分|score|rating)"
BELLE_PATTERNS: tuple[ScorePattern, ...] = (
    # "得分：0.8", "得分: 1分", "**得分**：0.6", "得分为0.5", "Score: 0.7" (anywhere, reasons included)
    ScorePattern("label", re.compile(_LABEL + r"\W{0,4}(?:为|是)?\s*[:：]?\s*\**\s*" + _NUM, re.I)),
    # "0.8分", "1 分"
    ScorePattern("fen", re.compile(r"(?<![\d.])([01](?:\.\d+)?)\s*分")),
    # a lone number in [0, 1] ending the reply: "...所以我给 0.7。"
    ScorePattern("trailing", re.compile(r"(?<![\d.])([01](?:\.\d+)?)\s*[。.!！]?\s*$")),
)
"""BELLE's 0-1 score, most explicit form first."""
BELLE_NOISE = re.compile(r"(?:满分|最高分|最低分|总分)\s*(?:为|是)?\s*[01](?:\.0+)?\s*分?")
"""Phrases echoing the scale ("满分为1分，最低分为0分"), removed before parsing."""
MTBENCH_PATTERNS: tuple[ScorePattern, ...] = (
    ScorePattern("double-bracket", re.compile(r"\[\[\s*" + _NUM + r"\s*\]\]")),
    ScorePattern("bracket", re.compile(r"\[\s*" + _NUM + r"\s*\]")),
    ScorePattern("label", re.compile(r"(?:rating|score|评分|得分)\s*[:：]\s*" + _NUM, re.I)),
)
"""MT-bench's 1-10 rating: ``[[8]]`` (FastChat's form), then ``[8]``, then ``Rating: 8``."""


def parse_score(
    text: str,
    patterns: tuple[ScorePattern, ...],
    low: float,
    high: float,
    noise: re.Pattern[str] | None = None,
) -> tuple[float | None, str | None]:
    """The score in a judge reply and the name of the pattern that found it, or ``(None, None)``.

    Patterns are tried in order; within one, matches from the start. A value outside
    ``[low, high]`` is not a score (``得分：8`` on a 0-1 scale) and the search goes on.
    Full-width digits and colons count (NFKC).
    """
    text = unicodedata.normalize("NFKC", text)
    if noise is not None:
        text = noise.sub(" ", text)
    for pattern in patterns:
        for match in pattern.regex.finditer(text):
            value = float(match.group(1))
            if low <= value <= high:
                return value, pattern.name
    return None, None


# --------------------------------------------------------------------------------------------
# Protocols: a registry
# --------------------------------------------------------------------------------------------
def _belle_wrap(instruction: str, with_reference: bool) -> str:
    """BELLE's judge message around a class instruction (its ChatGPT_Score page's layout)."""
    gold = "标准回答：{std_answer}\n" if with_reference else ""
    return f"{instruction}\n问题：{{question}}\n{gold}模型回答：{{answer}}\n请针对模型回答给出得分，顺便给出理由："


def _mtbench_wrap(instruction: str, with_reference: bool) -> str:
    """An instruction-only prompt laid out MT-bench style."""
    gold = "[Reference answer begins]\n{std_answer}\n[Reference answer ends]\n\n" if with_reference else ""
    return (
        f"{instruction}\n\n[Question]\n{{question}}\n\n{gold}"
        "[Assistant's answer begins]\n{answer}\n[Assistant's answer ends]"
    )


@dataclass(frozen=True)
class Protocol:
    """A way of judging: how messages are laid out and how the score is read."""

    name: str
    patterns: tuple[ScorePattern, ...]
    low: float
    """Lowest valid score as the judge writes it."""
    high: float
    """Highest valid score; the report's 0-1 score is the judge's score / ``high``."""
    uses_reference: Callable[[str], bool]
    """Whether a class's message includes the gold answer (for instruction-only prompts)."""
    wrap: Callable[[str, bool], str]
    """(instruction, with reference) -> a template with {question}, {answer}, {std_answer}."""
    noise: re.Pattern[str] | None = None
    system: str = ""
    """A system message sent before the judge prompt (none if empty)."""


PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in [
        Protocol(
            "belle",
            BELLE_PATTERNS,
            0.0,
            1.0,
            uses_reference=lambda c: c not in {"generation", "brainstorming", "rewrite"},
            wrap=_belle_wrap,
            noise=BELLE_NOISE,
        ),
        Protocol(
            "mtbench",
            MTBENCH_PATTERNS,
            1.0,
            10.0,
            uses_reference=lambda c: c in {"math", "code", "coding", "reasoning"},
            wrap=_mtbench_wrap,
            system="You are a helpful assistant.",
        ),
    ]
}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ZhtuneError(f"--protocol {name!r}: unknown; choose one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


# --------------------------------------------------------------------------------------------
# 1. Questions
# --------------------------------------------------------------------------------------------
def normalize_class(name: Any) -> str:
    """``"closed\\xa0qa"``, ``"Closed QA"``, ``"closed_qa"`` -> ``"closed qa"``."""
    text = unicodedata.normalize("NFKC", str(name))
    return re.sub(r"[\s_\-]+", " ", text).strip().lower()


@dataclass(frozen=True)
class Question:
    id: str
    cls: str
    """The normalised class name."""
    question: str
    std_answer: str


def _question(raw: dict[str, Any], rid: str) -> Question:
    """One raw record -> a :class:`Question`; raises :class:`RecordError` naming the field."""

    for key in ("question", "class"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise RecordError(key, "missing" if key not in raw else "expected a non-empty string")
    std = raw.get("std_answer", "")
    if std is None:
        std = ""
    if not isinstance(std, str):
        raise RecordError("std_answer", f"expected a string, got {type(std).__name__}")
    return Question(rid, normalize_class(raw["class"]), raw["question"], std)


def read_questions(path: str, rejects: str) -> list[Question]:
    """The questions of ``path`` in file order; unusable records go to ``rejects`` (and are
    reported on stderr). Duplicate ids are rejected: ids identify rows of every output."""

    questions: list[Question] = []
    seen: set[str] = set()
    shown: list[str] = []
    with RejectWriter(rejects) as rejected:
        for index, (line, raw) in enumerate(iter_raw(path), 1):
            if isinstance(raw, RawError):
                problem: tuple[str | None, str] | None = (None, raw.reason)
            else:
                try:
                    q = _question(raw, make_record_id(raw, path, index))
                    problem = ("id", f"duplicate id {q.id!r}") if q.id in seen else None
                except RecordError as e:
                    problem = (e.field, e.reason)
            if problem is not None:
                fld, reason = problem
                o = Outcome(
                    path,
                    line,
                    None,
                    reason=reason,
                    field=fld,
                    index=index,
                    raw=None if isinstance(raw, RawError) else raw,
                )
                rejected.write(o)
                if len(shown) < 5:
                    shown.append(f"{o.location()}{': ' + where(field=fld) if fld else ''}: {reason}")
                continue
            seen.add(q.id)
            questions.append(q)
    if rejected.count:
        print(
            f"rejected {rejected.count:,} record(s) of {path} -> {rejects}; the first ones:", file=sys.stderr
        )
        print("\n".join(f"  {s}" for s in shown), file=sys.stderr)
    else:
        Path(rejects).unlink(missing_ok=True)
    if not questions:
        raise ZhtuneError(f"{path}: no usable questions (records need 'question' and 'class')")
    return questions


# --------------------------------------------------------------------------------------------
# 2. Prompts
# --------------------------------------------------------------------------------------------
@dataclass
class Prompts:
    """Judge prompt templates per normalised class (``{question}``, ``{answer}``,
    ``{std_answer}`` slots), and where they came from."""

    templates: dict[str, str]
    source: str

    def template(self, cls: str) -> str:
        return self.templates.get(cls) or self.templates[DEFAULT_KEY]

    def missing(self, classes: list[str]) -> list[str]:
        return [c for c in classes if c not in self.templates and DEFAULT_KEY not in self.templates]


def _prompt_entries(path: Path) -> list[tuple[str, str, str]]:
    """``(class key, prompt, location)`` of a prompt file: BELLE's JSON Lines / JSON array of
    ``{class, prompt}``, or a JSON object mapping class -> prompt."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except ValueError:
        data = None  # JSON Lines
    if isinstance(data, dict) and not {"class", "prompt"} <= set(data):
        return [(str(k), v, where(str(path), field=str(k))) for k, v in data.items()]
    if isinstance(data, dict):
        data = [data]
    if isinstance(data, list):
        items = [(i + 1, item) for i, item in enumerate(data)]
        loc = lambda n: f"{path} (item {n})"  # noqa: E731
    else:
        items = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append((lineno, json.loads(line)))
                except ValueError as e:
                    raise ZhtuneError(f"{where(str(path), lineno)}: not JSON ({e})") from None
        loc = lambda n: where(str(path), n)  # noqa: E731
    entries = []
    for n, item in items:
        if not isinstance(item, dict) or not isinstance(item.get("class"), str):
            raise ZhtuneError(f"{loc(n)}: expected an object with 'class' and 'prompt' strings")
        entries.append((item["class"], item.get("prompt"), where(loc(n), field="prompt")))
    return entries


def load_prompts(path: str | Path, protocol: Protocol) -> Prompts:
    """Read a prompt file into templates. A prompt containing ``{answer}`` is a whole template
    (its slots are filled as written); any other prompt is a class instruction laid out by the
    protocol (BELLE: instruction, question, gold answer where the class uses one, answer).
    A key may name several classes with ``|`` (``math|code``); ``default`` covers the rest."""
    path = Path(path)
    if not path.is_file():
        raise ZhtuneError(f"--prompts: file not found: {path}")
    templates: dict[str, str] = {}
    for key, prompt, loc in _prompt_entries(path):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ZhtuneError(f"{loc}: expected a non-empty prompt string")
        for cls in (normalize_class(k) for k in key.split("|")):
            if "{answer}" in prompt:
                templates[cls] = prompt
            else:
                templates[cls] = protocol.wrap(prompt.strip(), protocol.uses_reference(cls))
    if not templates:
        raise ZhtuneError(f"{path}: no prompts in it")
    return Prompts(templates, str(path))


def choose_prompts(prompts: str, data: str, protocol: Protocol) -> Prompts:
    """``--prompts`` if given; for BELLE, the ``eval_prompt.json`` beside the data (BELLE ships
    them together); else zhtune's built-in prompts for the protocol."""
    if prompts:
        return load_prompts(prompts, protocol)
    beside = Path(data).parent / "eval_prompt.json"
    if protocol.name == "belle" and beside.is_file():
        return load_prompts(beside, protocol)
    found = load_prompts(ASSETS / f"{protocol.name}.json", protocol)
    found.source = f"built-in {protocol.name} prompts"
    return found


def fill(template: str, question: Question, answer: str) -> str:
    """The template with its slots filled (other braces are left as they are)."""
    values = {"question": question.question, "answer": answer, "std_answer": question.std_answer}
    return re.sub(r"\{(" + "|".join(SLOTS) + r")\}", lambda m: values[m.group(1)], template)


def judge_messages(protocol: Protocol, prompts: Prompts, question: Question, answer: str) -> list[dict]:
    """The chat messages sent to the judge for one answer."""
    messages = [{"role": "system", "content": protocol.system}] if protocol.system else []
    messages.append({"role": "user", "content": fill(prompts.template(question.cls), question, answer)})
    return messages


# --------------------------------------------------------------------------------------------
# 3. Answers
# --------------------------------------------------------------------------------------------

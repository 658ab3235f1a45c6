"""The prompt layouts of ``zhtune eval exam``: each benchmark's own, as its official evaluation
code writes it, and lm-evaluation-harness's (a registry, ``--prompt``). Data only: the
question and prompt builders are in :mod:`zhtune.eval.exam`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from zhtune.errors import ZhtuneError

MULTI_HEADER = "以下是关于{subject}的选择题，可能有多个正确答案，请直接给出所有正确答案的选项。\n\n"
"""The header of a subject with multi-letter answers (the benchmarks' own are single-answer)."""


def _as_is(text: str) -> str:
    return text


_MMCU_REMOVED = (" ．", "A、", "B、", "C、", "D、", "A.", "B.", "C.", "D.", "A", "B", "C", "D", "Ａ、", "Ｂ、", "Ｃ、", "Ｄ、")


def _mmcu_option(text: str) -> str:
    """An option cell as MMCU's evaluation code writes it: its letter labels removed (and, as
    that code does, every Latin A-D in the text), then stripped."""
    for piece in _MMCU_REMOVED:
        text = text.replace(piece, "")
    return text.strip()


@dataclass(frozen=True)
class PromptLayout:
    """How an exam's prompt is written: one question is ``question_prefix + question``, then
    ``\nA. option`` ... ``\nD. option``, then ``\n + answer_prefix``; a solved example adds
    ``answer_sep + letters + "\n\n"``. The header opens the prompt."""

    headers: dict[str, str]
    """The instruction line by detected benchmark (``""``: any other), ``{subject}`` being the
    subject's Chinese name (lm-eval words C-Eval's without 考试)."""
    question_prefix: str
    answer_prefix: str
    answer_sep: str
    """Between the answer prefix and the letter (``" "``: scored on the token of ``" A"``)."""
    strip_question: bool
    option: Callable[[str], str]
    """An option cell -> the text written after ``A. `` (the cell as it is, or cleaned)."""
    source: str
    """Whose layout this is (the file it reproduces)."""
    multi_header: str = MULTI_HEADER
    """The header of a subject with multi-letter answers (MMCU's own already allows several)."""


CMMLU_HEADER = "以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n"
MMCU_HEADER = "请阅读以下选择题并给出正确选项，不要解释原因。请只给出答案的序号。\n"
PROMPTS: dict[str, PromptLayout] = {
    "cmmlu": PromptLayout(
        {"": CMMLU_HEADER}, "题目：", "答案是：", "", False, _as_is, "CMMLU's own code (haonan-li/CMMLU src/mp_utils.py)"
    ),
    "ceval": PromptLayout(
        {"": "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n"}, "", "答案：", "", False, _as_is,
        "C-Eval's own code (hkust-nlp/ceval code/evaluator_series/evaluators/llama.py)",
    ),
    "mmcu": PromptLayout(
        {"": MMCU_HEADER}, "", "正确答案的序号是：", " ", False,
        _mmcu_option, "MMCU's own code (Felixgithub2017/MMCU TestBloomz.py)", MMCU_HEADER,
    ),
    "lm-eval": PromptLayout(
        {"ceval": "以下是中国关于{subject}的单项选择题，请选出其中的正确答案。\n\n", "": CMMLU_HEADER}, "", "答案：", " ",
        True, _as_is, "lm-evaluation-harness (tasks cmmlu and ceval-valid)",
    ),
}  # fmt: skip
"""Prompt layouts by name (``--prompt``); ``auto`` is the official one of the detected benchmark."""


def resolve_prompt(option: str, benchmark: str, xlsx: bool) -> str:
    """``--prompt``'s layout name: ``auto`` is the detected benchmark's own (CMMLU's for data no
    table knows, MMCU's for such data read from xlsx files, as MMCU ships)."""
    if option != "auto":
        if option not in PROMPTS:
            raise ZhtuneError(f"--prompt must be auto or one of {', '.join(PROMPTS)}, got {option!r}")
        return option
    if benchmark in PROMPTS:
        return benchmark
    return "mmcu" if xlsx else "cmmlu"

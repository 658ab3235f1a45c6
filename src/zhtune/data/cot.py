"""``zhtune data cot IN... -o OUT.jsonl``: chain-of-thought data -> canonical conversations.

FLAN's CoT mixture states each example as ``{question, rationale, answer}`` and trains on it
through several prompt templates (the question asked in different words, the rationale then the
answer); Alpaca-CoT ships the same data already joined as ``{instruction, input, output}`` with
the rationale and answer in ``output``. Both are read here (any file ``zhtune data convert``
reads; other column names via ``--map``, e.g. ``--map chain_of_thought=rationale``):

* ``{question, rationale, answer}``: the user turn is the question in a template's prompt, the
  assistant turn the rationale, then the answer in the template's words ("So the answer is ...").
* ``{instruction, input?, output}``: the user turn is ``instruction\\ninput`` in the template's
  prompt; the assistant turn is ``output`` unchanged.

Templates are data (:data:`TEMPLATES`), a few English and Chinese ones. ``--template auto``
picks one per record among those of the record's language, by a hash of (seed, record id): the
same seed gives the same choice, independent of record order. ``--template plain`` keeps the
question as it is. ``--suffix`` is Alpaca-CoT's CoT* variant: the question followed by
"先思考，再决定。" (Chinese) or "Let's think step by step." (English), no other wording.

Records lacking a field go to ``OUT.rejects.jsonl`` with the reason, as in ``data convert``.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zhtune.data.convert import (
    Outcome,
    RejectWriter,
    atomic_open,
    default_rejects_path,
    dump_line,
    make_record_id,
    rejects_exit_status,
)
from zhtune.data.formats import CARRIED, apply_mapping
from zhtune.data.inputs import InputOptions
from zhtune.data.lang import guess_lang
from zhtune.data.readers import RawError, expand_inputs, iter_raw
from zhtune.data.schema import RecordError
from zhtune.errors import ZhtuneError
from zhtune.flags import flag


@dataclass(frozen=True)
class CotTemplate:
    """One way to state a CoT example: ``prompt`` holds ``{question}``; ``response`` holds
    ``{rationale}`` and ``{answer}``."""

    name: str
    lang: str
    prompt: str
    response: str


#: Chinese CoT* suffix (Alpaca-CoT) and its English counterpart.
SUFFIX = {"zh": "先思考，再决定。", "en": "Let's think step by step."}
_ANSWER_EN = "{rationale}\nSo the answer is {answer}."
_ANSWER_ZH = "{rationale}\n所以答案是：{answer}"

#: Templates in the spirit of FLAN's CoT templates; ``auto`` draws among the ``flan`` ones of a
#: record's language.
TEMPLATES: dict[str, CotTemplate] = {
    t.name: t
    for t in (
        CotTemplate("en_step", "en", "{question}\nLet's reason step by step before answering.", _ANSWER_EN),
        CotTemplate(
            "en_explain",
            "en",
            "Answer the following question. Explain your reasoning first.\n{question}",
            "{rationale}\nTherefore, the answer is {answer}.",
        ),
        CotTemplate(
            "en_qa",
            "en",
            "Question: {question}\nGive the reasoning, then the answer.",
            "Reasoning: {rationale}\nAnswer: {answer}",
        ),
        CotTemplate("en_think", "en", "{question} Think it through, then answer.", _ANSWER_EN),
        CotTemplate("zh_step", "zh", "{question}\n请一步一步地推理，然后给出答案。", _ANSWER_ZH),
        CotTemplate(
            "zh_explain",
            "zh",
            "请回答下面的问题，先说明推理过程。\n{question}",
            "{rationale}\n因此，答案是{answer}。",
        ),
        CotTemplate(
            "zh_qa", "zh", "问题：{question}\n请写出推理过程和答案。", "推理过程：{rationale}\n答案：{answer}"
        ),
        CotTemplate("zh_think", "zh", "{question}\n先分析，再作答。", "{rationale}\n综上，答案是{answer}。"),
        CotTemplate("plain_en", "en", "{question}", _ANSWER_EN),
        CotTemplate("plain_zh", "zh", "{question}", _ANSWER_ZH),
        CotTemplate("suffix_en", "en", "{question}\n" + SUFFIX["en"], _ANSWER_EN),
        CotTemplate("suffix_zh", "zh", "{question}\n" + SUFFIX["zh"], _ANSWER_ZH),
    )
}
#: Template choices that are families (one member per language) rather than single templates.
FAMILIES = ("auto", "plain", "suffix")


@dataclass
class CotOptions:
    """Options of ``zhtune data cot`` (besides inputs and output)."""

    template: str = "auto"
    """auto (a FLAN-style template per record, drawn by seed among its language's), plain (the question as is), suffix, or a template name (see --help)."""
    suffix: bool = False
    """Alpaca-CoT's CoT*: the question followed by 先思考，再决定。 (or Let's think step by step.); same as --template suffix."""
    lang: str = "auto"
    """Template language: auto (from the question's script), zh or en."""
    seed: int = 0
    """Seed of the per-record template draw."""
    reading: InputOptions = flag(default_factory=InputOptions, skip=("format",))
    """--map, --rejects, --allow-rejects and --progress (the format is always CoT records)."""


def _choice(seed: int, record_id: str, n: int) -> int:
    digest = hashlib.blake2b(f"{seed}\0{record_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % n


def pick_template(choice: str, lang: str, seed: int, record_id: str) -> CotTemplate:
    """The template for one record: a named one, the family member of ``lang``, or (auto) one of
    ``lang``'s FLAN-style templates chosen by a hash of (seed, record id)."""
    if choice in TEMPLATES:
        return TEMPLATES[choice]
    if choice in ("plain", "suffix"):
        return TEMPLATES[f"{choice}_{lang}"]
    pool = [t for t in TEMPLATES.values() if t.lang == lang and not t.name.startswith(FAMILIES)]
    return pool[_choice(seed, record_id, len(pool))]


def _text(raw: dict[str, Any], key: str, required: bool = True) -> str:

    value = raw.get(key)
    if value is None:
        if required:
            raise RecordError(key, "missing")
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RecordError(key, f"must be a string, got {type(value).__name__}")
    value = str(value).strip()
    if required and not value:
        raise RecordError(key, "empty")
    return value


def _fill_response(template: str, rationale: str, answer: str) -> str:
    if answer[-1:] in ".。!！?？":  # "So the answer is 42.." -> one full stop
        template = re.sub(r"\{answer\}[.。]", "{answer}", template)
    return template.format(rationale=rationale, answer=answer)


def cot_messages(
    raw: dict[str, Any], choice: str, lang: str, seed: int, record_id: str
) -> tuple[list, CotTemplate]:
    """One raw record -> ``(messages, template)``; raises :class:`~zhtune.data.schema.RecordError`."""

    if "question" in raw:
        question = _text(raw, "question")
        rationale, answer = _text(raw, "rationale"), _text(raw, "answer")
        response = None
    elif "instruction" in raw:
        question = "\n".join(p for p in (_text(raw, "instruction"), _text(raw, "input", False)) if p)
        response = _text(raw, "output")
    else:
        raise RecordError(
            "question",
            "missing: expected {question, rationale, answer} (FLAN CoT) or {instruction, input?, output} "
            "(Alpaca-CoT); rename other columns with --map SRC=DST",
        )
    if lang == "auto":
        lang = "zh" if guess_lang(question) == "zh" else "en"
    template = pick_template(choice, lang, seed, record_id)
    prompt = template.prompt.format(question=question)
    reply = response if response is not None else _fill_response(template.response, rationale, answer)
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}], template


def check_options(opts: CotOptions) -> str:
    """Validate the options; return the template choice (``--suffix`` means the suffix family)."""
    choice = opts.template
    if choice not in TEMPLATES and choice not in FAMILIES:
        import difflib

        close = difflib.get_close_matches(choice, [*FAMILIES, *TEMPLATES], n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ZhtuneError(
            f"unknown CoT template {choice!r}.{hint} (templates: {', '.join([*FAMILIES, *TEMPLATES])})"
        )
    if opts.lang not in ("auto", "zh", "en"):
        raise ZhtuneError(f"--lang must be auto, zh or en, got {opts.lang!r}")
    if opts.suffix:
        if choice not in ("auto", "suffix"):
            raise ZhtuneError(f"--suffix and --template {choice} contradict each other; give one of them")
        choice = "suffix"
    return choice


def cot_convert(
    inputs: list[str],
    output: str,
    opts: CotOptions,
) -> int:
    """``zhtune data cot``: write CoT conversations for every record of ``inputs`` to ``output``.

    Returns the exit status: 1 if records were rejected and not ``opts.reading.allow_rejects``, else 0.
    """
    import os

    from tqdm import tqdm


    choice = check_options(opts)
    lang = opts.lang
    mapping, rejects = opts.reading.mapping(), opts.reading.rejects_path()
    paths = expand_inputs(inputs)
    if any(os.path.abspath(p) == os.path.abspath(output) for p in paths):
        raise ZhtuneError(f"output {output} is also an input; choose another output path")
    rejects_path = rejects or default_rejects_path(output)
    used: Counter[str] = Counter()
    shown: list[str] = []
    written = 0
    with (
        atomic_open(output) as out,
        RejectWriter(rejects_path) as rejected,
        tqdm(desc="cot", unit=" rec", file=sys.stderr, disable=not opts.reading.progress, mininterval=0.5) as bar,
    ):
        for path in paths:
            for index, (line, original) in enumerate(iter_raw(path), 1):
                bar.update()
                common = {"path": path, "line": line, "index": index, "fmt": "cot"}
                if isinstance(original, RawError):
                    o = Outcome(record=None, reason=original.reason, **common)
                else:
                    raw = apply_mapping(original, mapping)
                    rid = make_record_id(raw, path, index)
                    try:
                        messages, template = cot_messages(raw, choice, lang, opts.seed, rid)
                    except RecordError as e:
                        o = Outcome(record=None, reason=e.reason, field=e.field, raw=original, **common)
                    else:
                        meta = {"source": Path(path).name, "lang": guess_lang(messages[0]["content"])}
                        meta.update({dst: raw[key] for key, dst in CARRIED.items() if key in raw})
                        if isinstance(raw.get("meta"), dict):
                            meta.update(raw["meta"])
                        meta["cot_template"] = template.name
                        out.write(dump_line({"id": rid, "messages": messages, "meta": meta}))
                        used[template.name] += 1
                        written += 1
                        continue
                rejected.write(o)
                if len(shown) < 5:
                    shown.append(f"{o.location()}{': field ' + repr(o.field) if o.field else ''}: {o.reason}")
    if rejected.count == 0 and rejects is None:
        Path(rejects_path).unlink(missing_ok=True)
    print(f"wrote {written:,} CoT conversations to {output}", file=sys.stderr)
    for name, n in sorted(used.items()):
        print(f"  {name:<12} {n:>9,}  {TEMPLATES[name].prompt!r}", file=sys.stderr)
    if rejected.count:
        print(f"rejected {rejected.count:,} record(s) -> {rejects_path}; the first ones:", file=sys.stderr)
        print("\n".join(f"  {s}" for s in shown), file=sys.stderr)
    return rejects_exit_status(rejected.count, opts.reading.allow_rejects)


def describe_templates() -> str:
    """One line per template, for ``--help``."""
    return "\n".join(f"  {t.name:<11} {t.prompt!r} -> {t.response!r}" for t in TEMPLATES.values())

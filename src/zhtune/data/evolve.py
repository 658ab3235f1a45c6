"""``zhtune data evolve``: evol-instruct (WizardLM) through an OpenAI-compatible teacher.

For every input record (any format ``zhtune data convert`` reads; the first user turn is the
instruction), ``--rounds`` times:

1. **Evolve**: pick a method at random (seeded by ``--seed``, the record id and the round): one of
   the five in-depth ones — add constraints, deepen, concretize, increase reasoning steps,
   complicate the input — or in-breadth (a new, rarer instruction of the same domain), and ask the
   teacher with that prompt (``assets/prompts/evol_instruct.yaml``, Chinese or English by
   ``--lang``, ``auto``: by the instruction's script).
2. **Eliminate** (the paper's rules, :data:`RULES`, cheapest first): an evolved instruction that
   copies the prompt's own words (``#Rewritten Prompt#``, ``#改写后的提示#``), one the "Equal" judge
   finds no different from its parent (no information gain), then — after asking the teacher for
   the answer — an answer that is a short refusal ("sorry", "抱歉"), or only punctuation and stop
   words.
3. **Write** a kept evolution at once to ``OUT.jsonl`` (id ``{id}-evol{round}``; ``meta``:
   ``gen_method = "evol-instruct"``, ``round``, ``method``, ``parent`` — the id it evolved from —
   and ``origin``, the input id); an eliminated one to ``OUT.rejects.jsonl`` with its rule. The
   next round evolves the last kept version.

It stops early, keeping what it has (exit status 1), after ``--patience`` endpoint requests in a
row that kept no evolution (the message names the main elimination rules), or once this run has
sent ``--max-requests`` requests; a round cut short is done again by a re-run.

A re-run resumes: rounds already in ``OUT`` or its rejects are skipped (their instruction carried
on), and every request of an unfinished round comes from ``OUT.cache.sqlite`` if it was answered.
"""

from __future__ import annotations

import random
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from zhtune.data.convert import iter_conversations, reject_entry
from zhtune.data.lang import guess_lang
from zhtune.data.synth import (
    Appender,
    Rule,
    StopGuard,
    TeacherOptions,
    contains_any,
    first_rejection,
    format_reasons,
    load_prompts,
    read_appended,
    sidecar,
)
from zhtune.errors import ZhtuneError
from zhtune.flags import flag
from zhtune.llm.client import RETRY_STATUSES, ApiError, map_limited
from zhtune.progress import progress_bar

#: The in-depth methods (their texts are in the prompt asset) and the in-breadth one.
DEPTH_METHODS = ("constraints", "deepen", "concretize", "reasoning", "complicate_input")
METHODS = (*DEPTH_METHODS, "breadth")
#: An answer shorter than this many tokens (characters of Chinese, words of English) that says
#: "sorry" is a refusal (the paper: "contains 'sorry' and is relatively short (< 80 words)").
SHORT_ANSWER = 80


@dataclass
class EvolveOptions:
    """Options of ``zhtune data evolve`` (the endpoint ones are shared with ``generate``)."""

    teacher: TeacherOptions = flag(default_factory=TeacherOptions)
    """The teacher endpoint, sampling, seed, cache and progress bar (shared with the other generator)."""
    rounds: int = 1
    """Evolution rounds per instruction."""
    lang: str = "auto"
    """Prompt language: auto (by each instruction's script), zh or en."""
    format: str = "auto"
    """Input format (auto, alpaca, belle, sharegpt, openai, seed)."""
    patience: int = 20
    """Stop after this many requests in a row that kept no evolution."""
    max_requests: int = 0
    """Most requests this run sends, replies from the cache included (0: none)."""


class _Stopped(Exception):
    """Raised instead of sending a request once the run has stopped (``StopGuard.stop``)."""


# --------------------------------------------------------------------------------------------
# Prompts and elimination rules
# --------------------------------------------------------------------------------------------
def evolve_prompt(lang: str, method: str, instruction: str) -> str:
    """The rewriter (in-depth) or creator (in-breadth) prompt for ``instruction``."""
    p = load_prompts("evol_instruct")[lang]
    if method == "breadth":
        return p["breadth"].format(instruction=instruction)
    return p["depth"].format(method=p["methods"][method], instruction=instruction)


def equal_prompt(lang: str, first: str, second: str) -> str:
    """The judge prompt asking whether two instructions are equal."""
    return load_prompts("evol_instruct")[lang]["equal"].format(first=first, second=second)


def judged_equal(lang: str, verdict: str) -> bool:
    """True when the judge said "Equal"/"相同" (and not "Not Equal"/"不相同")."""
    p = load_prompts("evol_instruct")[lang]
    if contains_any(verdict, p["equal_no"]):
        return False
    return contains_any(verdict, p["equal_yes"]) is not None


def check_copied(lang: str, instruction: str, answer: str = "") -> str | None:
    word = contains_any(instruction, load_prompts("evol_instruct")[lang]["copied"])
    return f"the evolved instruction copies {word!r} from the prompt" if word else None


def check_empty(lang: str, instruction: str, answer: str = "") -> str | None:
    return None if instruction.strip() else "the evolved instruction is empty"


def check_sorry(lang: str, instruction: str, answer: str) -> str | None:
    from zhtune.data.novelty import tokenize

    word = contains_any(answer, load_prompts("evol_instruct")[lang]["sorry"])
    n = len(tokenize(answer))
    return f"a short answer ({n} tokens) containing {word!r}" if word and n < SHORT_ANSWER else None


def check_no_content(lang: str, instruction: str, answer: str) -> str | None:
    from zhtune.data.novelty import tokenize

    text = answer.lower()
    stop = load_prompts("evol_instruct")[lang]["stop_words"]
    for word in sorted((w for w in stop if not w.isascii()), key=len, reverse=True):
        text = text.replace(word, " ")  # Chinese stop words are cut out of the text
    words = {w.lower() for w in stop if w.isascii()}  # English ones are whole words
    if any(t not in words for t in tokenize(text)):
        return None
    return "the answer is only punctuation and stop words"


#: The rules in the order applied; ``no_information_gain`` (the Equal judge) runs between the
#: "instruction" and "answer" stages, since it costs a request.
RULES: tuple[Rule, ...] = (
    Rule("empty", check_empty, stage="instruction"),
    Rule("copied_prompt", check_copied, stage="instruction"),
    Rule("sorry", check_sorry, stage="answer"),
    Rule("no_content", check_no_content, stage="answer"),
)


def pick_method(seed: int, rid: str, round_: int) -> str:
    """The method of round ``round_`` of record ``rid``: the same on every run."""
    return random.Random(f"{seed}:{rid}:{round_}").choice(METHODS)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
@dataclass
class Source:
    """An input instruction and where its evolution stands (restored from earlier runs)."""

    id: str
    instruction: str
    lang: str
    current_id: str = ""
    current: str = ""
    done: dict[int, dict[str, Any] | None] = field(default_factory=dict)
    """Rounds finished by earlier runs: the kept row, or None if eliminated."""


@dataclass
class EvolveState:
    kept: int = 0
    eliminated: Counter[str] = field(default_factory=Counter)
    failed: int = 0
    skipped: int = 0


class Evolver:
    """One ``zhtune data evolve`` run."""

    def __init__(self, output: str, options: EvolveOptions) -> None:
        self.options = options
        self.output = output
        self.records = Appender(output)
        self.rejects = Appender(sidecar(output, ".rejects.jsonl"))
        self.state = EvolveState()
        self.guard = StopGuard(options.patience, options.max_requests)
        self.slots: Any = None
        """At most ``--concurrency`` rounds at once (an asyncio.Semaphore made in ``run``): a round's
        requests go one after another, so the stop rules count requests as they go out."""
        self.teacher = ""
        self.usage: Any = None

    def restore(self, sources: list[Source]) -> None:
        """Mark the rounds earlier runs finished (kept or eliminated)."""
        by_id = {s.id: s for s in sources}
        for row in read_appended(self.output):
            meta = row.get("meta") or {}
            if meta.get("origin") in by_id and isinstance(meta.get("round"), int):
                by_id[meta["origin"]].done[meta["round"]] = row
        for row in read_appended(self.rejects.path):
            if row.get("origin") in by_id and isinstance(row.get("round"), int):
                by_id[row["origin"]].done.setdefault(row["round"], None)

    async def ask(
        self, client: Any, text: str, extra: str, asked: list[str], temperature: float | None = None
    ) -> str:
        """One request (its cache key appended to ``asked``); raises ``_Stopped`` once the run stops."""
        o = self.options.teacher
        if not self.guard.allow():
            raise _Stopped
        asked.append(extra)
        reply = await client.chat(
            [{"role": "user", "content": text}],
            cache_extra=extra,
            temperature=o.temperature if temperature is None else temperature,
            max_tokens=o.endpoint.max_tokens,
        )
        return reply.text.strip()

    async def evolve_round(self, client: Any, src: Source, r: int, asked: list[str]) -> str | None:
        """One round of one instruction: evolve, judge, answer, check, write; returns the rule that
        eliminated it (None: kept)."""
        method = pick_method(self.options.teacher.seed, src.id, r)
        extra = f"evol-instruct:{src.id}:{r}"
        lang = src.lang
        evolved = await self.ask(client, evolve_prompt(lang, method, src.current), f"{extra}:evolve", asked)
        evolved = re.sub(r"^[ \t]*[:：]", "", evolved).strip()
        answer = ""
        base = {"id": f"{src.id}-evol{r}", "origin": src.id, "round": r, "method": method,
                "parent": src.current_id, "instruction": evolved}  # fmt: skip
        rule, reason = None, None
        for stage in ("instruction", "judge", "answer"):
            if stage == "judge":
                verdict = await self.ask(
                    client, equal_prompt(lang, src.current, evolved), f"{extra}:equal", asked, 0.0
                )
                if judged_equal(lang, verdict):
                    rule, reason = (
                        "no_information_gain",
                        f"the judge found it equal to its parent ({verdict!r})",
                    )
            else:
                if stage == "answer":
                    answer = await self.ask(client, evolved, f"{extra}:answer", asked)
                rule, reason = first_rejection(RULES, lang, evolved, answer, stage=stage) or (None, None)
            if rule is not None:
                self.state.eliminated[rule] += 1
                self.rejects.write({**base, "rule": rule, "reason": reason, "answer": answer})
                return rule
        meta = {"source": self.teacher, "lang": lang, "gen_method": "evol-instruct", "round": r,
                "method": method, "parent": src.current_id, "origin": src.id}  # fmt: skip
        record = {
            "id": base["id"],
            "messages": [{"role": "user", "content": evolved}, {"role": "assistant", "content": answer}],
            "meta": meta,
        }
        self.records.write(record)
        self.state.kept += 1
        src.current_id, src.current = record["id"], evolved
        return None

    async def evolve_source(self, client: Any, src: Source, bar: Any) -> None:

        src.current_id, src.current = src.id, src.instruction
        for r in range(1, self.options.rounds + 1):
            if r in src.done:
                row = src.done[r]
                if row is not None:
                    src.current_id, src.current = row["id"], row["messages"][0]["content"]
                continue
            asked: list[str] = []
            try:
                async with self.slots:
                    rule = await self.evolve_round(client, src, r, asked)
            except _Stopped:
                return  # the rest of this instruction waits for a re-run
            except ApiError as e:
                if e.status not in (None, *RETRY_STATUSES):
                    raise ZhtuneError(f"the endpoint refused a request: {e}") from None
                self.state.failed += 1
                self.guard.record(len(asked), 0, ["api_error"])
                bar.update(self.options.rounds - r + 1)
                return  # the rest of this instruction waits for a re-run
            self.guard.record(len(asked), rule is None, [rule] if rule else [])
            bar.update(1)

    async def run(self, sources: list[Source], bar: Any) -> None:
        import asyncio


        self.slots = asyncio.Semaphore(self.options.teacher.endpoint.concurrency)
        async with self.options.teacher.client(self.output) as client:
            self.teacher = client.endpoint.model
            await map_limited(sources, lambda s: self.evolve_source(client, s, bar))
            self.usage = client.usage


def read_sources(
    inputs: list[str], fmt: str, lang: str, rejects: Appender, seen: set[tuple[Any, ...]]
) -> tuple[list[Source], int]:
    """The instructions to evolve (first user turn of each record), and how many records were
    unusable (written to the rejects file once, with the converter's reason)."""

    sources, bad = [], 0
    ids: set[str] = set()
    for o in iter_conversations(inputs, fmt, chat=False):
        reason, field_name = o.reason, o.field
        user = None
        if o.record is not None:
            user = next((m["content"] for m in o.record["messages"] if m["role"] == "user"), None)
            if user is None:
                reason, field_name = "no user turn (nothing to evolve)", "messages"
            elif o.record["id"] in ids:
                reason, field_name = f"duplicate id {o.record['id']!r}", "id"
        if reason is not None:
            bad += 1
            key = ("input", o.path, o.line, o.index)
            if key not in seen:
                rejects.write({"rule": "input", **reject_entry(o), "reason": reason, "field": field_name})
            continue
        rid = o.record["id"]
        ids.add(rid)
        chosen = lang if lang != "auto" else ("zh" if guess_lang(user) == "zh" else "en")
        sources.append(Source(rid, user, chosen))
    return sources, bad


def evolve(inputs: list[str], output: str, options: EvolveOptions) -> int:
    """``zhtune data evolve``: ``options.rounds`` evol-instruct rounds for every input instruction.

    Returns the exit status: 0, or 1 when some requests failed for good or the run stopped early
    (``--patience``, ``--max-requests``); a re-run goes on.
    """
    import asyncio


    if options.rounds < 1 or options.patience < 1:
        raise ZhtuneError("--rounds and --patience must be at least 1")
    if options.lang not in ("auto", *load_prompts("evol_instruct")):
        raise ZhtuneError(f"--lang {options.lang!r}: choose auto, {', '.join(load_prompts('evol_instruct'))}")
    if not output.endswith(".jsonl"):
        raise ZhtuneError(f"-o {output}: the output must be a .jsonl file (it is appended to)")
    options.teacher.endpoint.resolve()  # fail on a missing endpoint before reading anything
    ev = Evolver(output, options)
    seen = {("input", r.get("file"), r.get("line"), r.get("index")) for r in read_appended(ev.rejects.path)}
    sources, bad = read_sources(inputs, options.format, options.lang, ev.rejects, seen)
    if not sources:
        raise ZhtuneError(f"no instructions to evolve in {', '.join(inputs)}")
    ev.restore(sources)
    total = len(sources) * options.rounds
    done = sum(len(s.done) for s in sources)
    print(
        f"zhtune data evolve: {len(sources):,} instructions x {options.rounds} round(s); {done:,} rounds done "
        f"by earlier runs" + (f"; {bad:,} unusable records -> {ev.rejects.path}" if bad else ""),
        file=sys.stderr,
    )
    with progress_bar("evolve", options.teacher.progress, total=total, initial=done, unit=" round") as bar:
        try:
            asyncio.run(ev.run(sources, bar))
        finally:
            ev.records.close()
            ev.rejects.close()
    st = ev.state
    print(
        f"kept {st.kept:,} evolved instructions -> {output}; eliminated {sum(st.eliminated.values()):,} -> "
        f"{ev.rejects.path}: {format_reasons(st.eliminated, 10)}",
        file=sys.stderr,
    )
    if ev.usage is not None:
        print(f"usage: {ev.usage.summary()}", file=sys.stderr)
    if ev.guard.stop is not None:
        print(
            f"stopped: {ev.guard.stop}. Kept {st.kept:,} evolutions in {output}; run again to go on (received "
            "replies are cached), or change the inputs, prompt language or temperature.",
            file=sys.stderr,
        )
    if st.failed:
        print(
            f"{st.failed:,} instructions stopped on a failed request; run the same command again to finish them",
            file=sys.stderr,
        )
    return 1 if st.failed or ev.guard.stop is not None else 0


__all__ = [
    "METHODS",
    "RULES",
    "EvolveOptions",
    "evolve",
    "evolve_prompt",
    "equal_prompt",
    "judged_equal",
    "pick_method",
]

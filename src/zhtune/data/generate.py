"""``zhtune data generate``: self-instruct from seed tasks through an OpenAI-compatible teacher.

Top to bottom, one request at a time (``--concurrency`` of them in flight):

1. **Prompt** (:func:`encode_prompt`): BELLE's Chinese or Alpaca's English self-instruct prompt
   (``assets/prompts/self_instruct.yaml``): the requirements, then 3 seed tasks sampled from the
   seed file as tasks 1-3, and the teacher asked to go on to task 10. The sample is drawn from
   ``Random((seed, request number))``, so request *n* is always the same prompt. With
   ``--machine-examples K`` (Self-Instruct's mix: 2 machine tasks among its 8 examples), K of the 3
   come from the records this output kept from requests numbered below ``n - MACHINE_LAG`` (as
   many as there are, up to K), and request *n* is only sent once every request below
   ``n - MACHINE_LAG`` has finished: the pool is then the same when a re-run asks request *n*
   again, so its reply still comes from the cache (unless a request below it failed after all
   retries: asked again, it can keep new tasks and change the later prompts, which are then new).
2. **Parse** (:func:`parse_tasks`): numbered ``指令/输入/输出`` (or ``Instruction/Input/Output``)
   fields, half- or full-width colons, ``<无输入>``/``<noinput>`` meaning no input.
3. **Filter** (:data:`FILTERS`, then novelty): incomplete tasks, the last task of a reply cut off
   at ``--max-tokens``, instruction length, blacklisted words (images, files, audio: things a text
   model cannot do), assistant boilerplate, odd starts, and finally a near copy of any instruction
   kept so far, seeds included (ROUGE-L > 0.7 as Alpaca, or BM25 as BELLE;
   :mod:`zhtune.data.novelty`).
4. **Write** each kept task at once to ``OUT.jsonl`` as a canonical record
   (``meta.gen_method = "self-instruct"``, the request number and the seed ids) and each
   dropped one to ``OUT.rejects.jsonl`` with the filter's name, the reason and the raw text.

It stops when ``--num`` records are kept; or, keeping what it has, after ``--patience`` requests
in a row that kept nothing (the teacher returns duplicates, refusals or garbage; the message names
the main reasons), or at ``--max-requests``. A re-run resumes: it reads ``OUT`` and its rejects
back (kept instructions into the novelty index, used request numbers) and takes the next unused
request numbers; replies already received come from ``OUT.cache.sqlite`` instead of the endpoint.
"""

from __future__ import annotations

import itertools
import random
import re
import string
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zhtune.data.readers import RawError, iter_raw
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
from zhtune.errors import ZhtuneError, where
from zhtune.flags import flag
from zhtune.llm.client import RETRY_STATUSES, ApiError
from zhtune.progress import progress_bar

if TYPE_CHECKING:  # numpy and asyncio load only when a run starts, so `zhtune --help` stays fast
    from zhtune.data.novelty import NoveltyIndex


@dataclass
class GenerateOptions:
    """Options of ``zhtune data generate`` (the endpoint ones are shared with ``evolve``)."""

    teacher: TeacherOptions = flag(default_factory=TeacherOptions)
    """The teacher endpoint, sampling, seed, cache and progress bar (shared with the other generator)."""
    num: int = 100
    """Records to keep in OUT (a re-run with a larger --num goes on)."""
    lang: str = "zh"
    """Prompt language: zh (BELLE's prompt) or en (Alpaca's)."""
    novelty: str = "rouge"
    """Near-copy measure: rouge (ROUGE-L F1, Alpaca) or bm25 (BELLE)."""
    novelty_threshold: float = 0.0
    """Scores above this are near copies (0: the measure's default, 0.7)."""
    patience: int = 20
    """Stop after this many requests in a row that kept nothing."""
    max_requests: int = 0
    """Hard limit on request numbers, counting earlier runs (0: none)."""
    machine_examples: int = 0
    """Of the 3 prompt examples, how many come from tasks this output already kept (0: seeds only;
    Self-Instruct mixed 2 in 8). Drawn only from requests numbered 32 or more below, as many as
    there are, so a re-run asks the same prompts and reads its cache; at most 32 requests in flight."""


#: Request n draws machine examples only from requests numbered below n - MACHINE_LAG, and waits
#: for all of them to finish: a pool fixed by n alone (at most this many requests in flight).
MACHINE_LAG = 32


# --------------------------------------------------------------------------------------------
# Seeds and prompts
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    """One task: an instruction, its (possibly empty) input and the output."""

    instruction: str
    input: str
    output: str


@dataclass(frozen=True)
class Seed:
    """A seed task and its id in the seed file."""

    id: str
    task: Task


def load_seeds(path: str) -> list[Seed]:
    """BELLE/Alpaca seed tasks ``{id?, instruction, instances: [{input, output}]}`` (the first
    instance is used, as Alpaca does) or Alpaca records ``{instruction, input?, output}``, from any
    JSON/JSON Lines file. A malformed seed is an error naming its file, line and field."""
    seeds = []
    for index, (line, raw) in enumerate(iter_raw(path), 1):
        if isinstance(raw, RawError):
            raise ZhtuneError(f"{where(path, line)}: {raw.reason}")
        example = raw
        if "instances" in raw:
            instances = raw["instances"]
            if not isinstance(instances, list) or not instances or not isinstance(instances[0], dict):
                raise ZhtuneError(f"{where(path, line, 'instances')}: must be a non-empty list of objects")
            example = instances[0]
        fields = {"instruction": raw.get("instruction"), "input": example.get("input") or "",
                  "output": example.get("output")}  # fmt: skip
        for name, value in fields.items():
            if not isinstance(value, str) or (name != "input" and not value.strip()):
                raise ZhtuneError(f"{where(path, line, name)}: expected a non-empty string, got {value!r}")
        seeds.append(
            Seed(str(raw.get("id", f"seed-{index}")), Task(**{k: v.strip() for k, v in fields.items()}))
        )
    if not seeds:
        raise ZhtuneError(f"{path}: no seed tasks")
    return seeds


@dataclass(frozen=True)
class SelfInstructPrompt:
    """One language's prompt and filter word lists (``assets/prompts/self_instruct.yaml``)."""

    lang: str
    tasks_per_request: int
    seeds_per_request: int
    header: str
    task: str
    separator: str
    no_input: str
    ask: str
    length: dict[str, Any]
    blacklist: list[str]
    gpt_phrases: list[str]
    no_input_words: list[str]

    @classmethod
    def load(cls, lang: str) -> SelfInstructPrompt:
        prompts = load_prompts("self_instruct")
        if lang not in prompts:
            raise ZhtuneError(f"--lang {lang!r}: choose one of {', '.join(prompts)}")
        return cls(lang=lang, **prompts[lang])


def encode_prompt(prompt: SelfInstructPrompt, seeds: list[Task]) -> str:
    """The request text: requirements, the seed tasks numbered from 1, and the ask for the rest."""
    parts = [prompt.header.format(total=prompt.tasks_per_request)]
    for n, task in enumerate(seeds, 1):
        text = prompt.task.format(
            n=n, instruction=task.instruction, input=task.input or prompt.no_input, output=task.output
        )
        parts += [prompt.separator, text]
    parts += [prompt.separator, prompt.ask.format(first=len(seeds) + 1, last=prompt.tasks_per_request)]
    return "\n".join(parts)


def sample_seeds(seeds: list[Seed], k: int, seed: int, request: int) -> list[Seed]:
    """The seeds of request number ``request``: the same for the same (seed, request)."""
    rng = random.Random(f"{seed}:{request}")
    return rng.sample(seeds, min(k, len(seeds)))


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------
_FIELD = re.compile(
    r"^[ \t#*>-]*(?:(\d{1,3})[ \t]*[.、．)）]?[ \t]*)?\**(指令|输入|输出|instruction|input|output)\**[ \t]*[:：]",
    re.IGNORECASE | re.MULTILINE,
)
_FIELD_NAMES = {"指令": "instruction", "输入": "input", "输出": "output"}
_TRAILER = re.compile(r"(\s*(#{2,}|\*{3,}|-{3,})\s*)+$")


@dataclass
class ParsedTask:
    """One task as found in a reply: its number, fields, and the raw text it came from."""

    number: int | None
    fields: dict[str, str] = field(default_factory=dict)
    raw: str = ""

    def get(self, name: str) -> str:
        return self.fields.get(name, "")


def parse_tasks(text: str, no_input_words: list[str]) -> list[ParsedTask]:
    """The tasks of a reply, in order. A task starts at each ``N. 指令：`` / ``N. Instruction:``
    marker (number optional, half- or full-width colon); the input and output markers after it
    fill its fields. Text before the first marker (a preamble) is ignored; an input that says
    there is none (``<无输入>``) becomes empty."""
    marks = list(_FIELD.finditer(text))
    tasks: list[ParsedTask] = []
    no_input = {w.lower() for w in no_input_words}
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        name = _FIELD_NAMES.get(m.group(2), m.group(2).lower())
        value = _TRAILER.sub("", text[m.end() : end]).strip()
        if name == "instruction":
            tasks.append(ParsedTask(int(m.group(1)) if m.group(1) else None))
            tasks[-1].raw = text[m.start() : end]
        elif not tasks:
            continue
        else:
            tasks[-1].raw += text[m.start() : end]
        if name == "input" and value.lower() in no_input:
            value = ""
        tasks[-1].fields.setdefault(name, value)
    for task in tasks:
        task.raw = _TRAILER.sub("", task.raw).strip()
    return tasks


# --------------------------------------------------------------------------------------------
# Filters
# --------------------------------------------------------------------------------------------
def _length(text: str, unit: str) -> int:
    from zhtune.data.novelty import tokenize

    return len(text) if unit == "char" else len(tokenize(text))


def check_incomplete(task: ParsedTask, prompt: SelfInstructPrompt) -> str | None:
    missing = [name for name in ("instruction", "output") if not task.get(name)]
    return f"no {' and no '.join(missing)}" if missing else None


def check_length(task: ParsedTask, prompt: SelfInstructPrompt) -> str | None:
    unit, lo, hi = prompt.length["unit"], prompt.length["min"], prompt.length["max"]
    n = _length(task.get("instruction"), unit)
    return None if lo <= n <= hi else f"instruction has {n} {unit}s (allowed {lo}-{hi})"


def check_blacklist(task: ParsedTask, prompt: SelfInstructPrompt) -> str | None:
    text = task.get("instruction").lower()
    for word in prompt.blacklist:
        # whole words for English (Alpaca: "map" but not "mapping"), substrings for Chinese
        pattern = rf"\b{re.escape(word)}\b" if word.isascii() else re.escape(word)
        if re.search(pattern, text):
            return f"mentions {word!r} (a text model cannot do it)"
    return None


def check_gpt_phrase(task: ParsedTask, prompt: SelfInstructPrompt) -> str | None:
    for name in ("instruction", "output"):
        phrase = contains_any(task.get(name).replace(" ", "") if prompt.lang == "zh" else task.get(name),
                              prompt.gpt_phrases)  # fmt: skip
        if phrase:
            return f"{name} contains {phrase!r}"
    return None


def check_start(task: ParsedTask, prompt: SelfInstructPrompt) -> str | None:
    text = task.get("instruction")
    if text[0] in string.punctuation or text[0] in "，。！？；：、“”‘’（）【】《》":
        return "instruction starts with punctuation"
    if prompt.lang == "en" and not text[0].isascii():
        return "instruction starts with a non-English character"
    if prompt.lang == "en" and text.lower().startswith("write a program"):
        return "asks to write a program (Alpaca's rule)"
    return None


#: The filters, in the order they are applied (novelty comes last: it is the costliest).
FILTERS: tuple[Rule, ...] = (
    Rule("incomplete", check_incomplete),
    Rule("length", check_length),
    Rule("blacklist", check_blacklist),
    Rule("gpt_phrase", check_gpt_phrase),
    Rule("start", check_start),
)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def make_record(task: Task, rid: str, meta: dict[str, Any]) -> dict[str, Any]:
    """A canonical record: user = instruction (+ newline + input), assistant = output."""
    user = task.instruction + (f"\n{task.input}" if task.input else "")
    return {
        "id": rid,
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": task.output}],
        "meta": meta,
    }


@dataclass
class RunState:
    """What the run knows: counts, used request numbers, and why things were rejected."""

    kept: int = 0
    done: set[int] = field(default_factory=set)
    rejected: Counter[str] = field(default_factory=Counter)
    kept_now: int = 0
    failed: int = 0


class Generator:
    """One ``zhtune data generate`` run: the prompt, seeds, novelty index, outputs and state."""

    def __init__(self, seeds: list[Seed], output: str, options: GenerateOptions) -> None:
        from zhtune.data.novelty import build_novelty

        self.options = options
        self.prompt = SelfInstructPrompt.load(options.lang)
        self.seeds = seeds
        self.output = output
        self.index: NoveltyIndex = build_novelty(options.novelty, options.novelty_threshold or None)
        self.state = RunState()
        self.guard = StopGuard(options.patience, options.max_requests)
        self.machine: list[tuple[int, str, Task]] = []
        """Kept tasks as (request, record id, task): the pool of ``--machine-examples``."""
        self.records = Appender(output)
        self.rejects = Appender(sidecar(output, ".rejects.jsonl"))
        self.teacher = ""
        self.usage: Any = None

    def restore(self) -> None:
        """Seeds into the novelty index, then what earlier runs kept and the request numbers used."""
        for s in self.seeds:
            self.index.add(s.task.instruction)
        for row in read_appended(self.output):
            meta = row.get("meta") or {}
            instruction = meta.get("instruction") or row["messages"][0]["content"]
            self.index.add(instruction)
            self.state.kept += 1
            if isinstance(meta.get("request"), int):
                self.state.done.add(meta["request"])
                user, output = row["messages"][0]["content"], row["messages"][-1]["content"]
                given = user[len(instruction) :].lstrip("\n") if user.startswith(instruction) else ""
                self.machine.append((meta["request"], str(row.get("id")), Task(instruction, given, output)))
        for row in read_appended(self.rejects.path):
            if isinstance(row.get("request"), int):
                self.state.done.add(row["request"])

    def request_numbers(self) -> Iterator[int]:
        """Unused request numbers, in order, up to ``--max-requests``."""
        limit = self.options.max_requests
        numbers = itertools.count() if limit <= 0 else iter(range(limit))
        return (n for n in numbers if n not in self.state.done)

    def examples(self, n: int) -> tuple[list[Seed], list[Seed]]:
        """The prompt examples of request ``n``: seeds, and ``--machine-examples`` kept tasks drawn
        from requests below ``n - MACHINE_LAG`` (fewer while there are not enough; seeds fill up)."""
        k, seed = self.options.machine_examples, self.options.teacher.seed
        pool = sorted((m for m in self.machine if m[0] < n - MACHINE_LAG), key=lambda m: (m[0], m[1]))
        drawn = random.Random(f"{seed}:{n}:machine").sample(pool, min(k, len(pool))) if k else []
        seeds = sample_seeds(self.seeds, self.prompt.seeds_per_request - len(drawn), seed, n)
        return seeds, [Seed(rid, task) for _, rid, task in drawn]

    def ready(self, n: int, pending: Any) -> bool:
        """Whether request ``n`` may be sent: with machine examples, only once every request below
        ``n - MACHINE_LAG`` has finished (so its pool is complete, and the same on a re-run)."""
        return not self.options.machine_examples or all(m >= n - MACHINE_LAG for m in pending)

    async def ask(self, client: Any, n: int) -> tuple[list[Seed], list[Seed], Any]:
        seeds, machine = self.examples(n)
        text = encode_prompt(self.prompt, [s.task for s in seeds + machine])
        reply = await client.chat(
            [{"role": "user", "content": text}],
            cache_extra=f"self-instruct:{n}",
            temperature=self.options.teacher.temperature,
            max_tokens=self.options.teacher.endpoint.max_tokens,
            seed=self.options.teacher.seed * 1_000_003 + n,
        )
        return seeds, machine, reply

    def reject(self, n: int, name: str, reason: str, raw: str, instruction: str = "") -> None:
        self.state.rejected[name] += 1
        row = {"request": n, "filter": name, "reason": reason, "instruction": instruction, "raw": raw}
        self.rejects.write(row)

    def take(self, n: int, seeds: list[Seed], machine: list[Seed], reply: Any) -> int:
        """Filter the tasks of request ``n``'s reply, write what is kept; returns how many."""
        prompt, state, kept = self.prompt, self.state, 0
        tasks = parse_tasks(reply.text, prompt.no_input_words)
        if not tasks:
            reason = "no numbered 指令/输入/输出 (Instruction/Input/Output) tasks in the reply"
            self.reject(n, "parse", reason, reply.text)
            return 0
        for k, task in enumerate(tasks):
            if state.kept >= self.options.num:
                break
            instruction = task.get("instruction")
            if k == len(tasks) - 1 and reply.finish_reason == "length":
                self.reject(n, "truncated", "the reply was cut at --max-tokens", task.raw, instruction)
                continue
            failed = first_rejection(FILTERS, task, prompt)
            if failed is None and (match := self.index.check(instruction)) is not None:
                failed = ("duplicate", f"{self.options.novelty} {match.score:.2f} with {match.text!r}")
            if failed is not None:
                self.reject(n, *failed, task.raw, instruction)
                continue
            self.index.add(instruction)
            meta = {
                "source": self.teacher,
                "lang": prompt.lang,
                "gen_method": "self-instruct",
                "round": 0,
                "request": n,
                "seeds": [s.id for s in seeds],
                **({"machine_examples": [s.id for s in machine]} if machine else {}),
                "instruction": instruction,
            }
            result = Task(instruction, task.get("input"), task.get("output"))
            rid = f"self-instruct-{n}-{k}"
            self.records.write(make_record(result, rid, meta))
            self.machine.append((n, rid, result))
            state.kept += 1
            state.kept_now += 1
            kept += 1
        return kept

    async def run(self, bar: Any) -> str | None:
        """Ask and filter until ``--num`` is reached; returns why it stopped early (None: done)."""
        import asyncio


        options, state, guard = self.options, self.state, self.guard
        numbers = self.request_numbers()
        exhausted = False
        held: int | None = None  # the next request number, waiting for ``ready``
        async with options.teacher.client(self.output) as client:
            self.teacher = client.endpoint.model
            pending: dict[asyncio.Future, int] = {}
            while True:
                while (
                    not (guard.stop or exhausted)
                    and state.kept < options.num
                    and len(pending) < options.teacher.endpoint.concurrency
                ):
                    held = next(numbers, None) if held is None else held
                    if held is None:
                        exhausted = True  # what is in flight is still taken
                        break
                    if not self.ready(held, pending.values()):
                        break
                    pending[asyncio.ensure_future(self.ask(client, held))] = held
                    held = None
                if not pending:
                    break
                finished, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for future in finished:
                    n = pending.pop(future)
                    error = future.exception()
                    if guard.stop is not None or state.kept >= options.num:
                        continue  # not needed now; a received reply stays cached for a later run
                    if isinstance(error, ApiError) and error.status not in (None, *RETRY_STATUSES):
                        raise ZhtuneError(f"the endpoint refused a request: {error}")
                    if error is not None and not isinstance(error, ApiError):
                        raise error
                    if error is not None:
                        state.failed += 1
                        kept, reasons = 0, Counter(["api_error"])
                    else:
                        before = Counter(state.rejected)
                        kept = self.take(n, *future.result())
                        reasons = state.rejected - before
                        state.done.add(n)
                    bar.update(kept)
                    guard.record(1, kept, reasons)
            self.usage = client.usage
        if exhausted and state.kept < options.num:
            guard.exhausted()
        return guard.stop


def generate(seeds_path: str, output: str, options: GenerateOptions) -> int:
    """``zhtune data generate``: self-instruct until ``options.num`` records are in ``output``.

    Returns the exit status: 0 when ``--num`` records are kept, 1 when the run stopped early
    (no progress, or ``--max-requests``), keeping what it had.
    """
    import asyncio


    if options.num < 1 or options.patience < 1:
        raise ZhtuneError("--num and --patience must be at least 1")
    if not 0 <= options.machine_examples <= SelfInstructPrompt.load(options.lang).seeds_per_request:
        raise ZhtuneError(
            f"--machine-examples must be 0-3 (of the 3 prompt examples), got {options.machine_examples}"
        )
    if Path(output).suffix != ".jsonl":
        raise ZhtuneError(f"-o {output}: the output must be a .jsonl file (it is appended to)")
    gen = Generator(load_seeds(seeds_path), output, options)
    gen.options.teacher.endpoint.resolve()  # fail on a missing endpoint before reading anything else
    gen.restore()
    before = gen.state.kept
    print(
        f"zhtune data generate: {len(gen.seeds):,} seed tasks from {seeds_path}; {before:,} records already in "
        f"{output}; target {options.num:,} ({options.lang}, novelty {options.novelty} > "
        f"{gen.index.threshold:g})",
        file=sys.stderr,
    )
    stop: str | None = None
    if before < options.num:
        with progress_bar(
            "generate", options.teacher.progress, total=options.num, initial=before, unit=" rec"
        ) as bar:
            try:
                stop = asyncio.run(gen.run(bar))
            finally:
                gen.records.close()
                gen.rejects.close()
        print(summary(gen, before), file=sys.stderr)
    if stop is not None:
        print(
            f"stopped: {stop}. Kept {gen.state.kept:,} of --num {options.num:,} in {output}; run again to go "
            "on (received replies are cached), or change the seeds, prompt language or temperature.",
            file=sys.stderr,
        )
        return 1
    return 0


def summary(gen: Generator, before: int) -> str:
    """The end-of-run report: kept, rejected by filter, requests and usage."""
    state = gen.state
    lines = [
        f"kept {state.kept_now:,} new records ({state.kept:,} in {gen.output}); rejected "
        f"{sum(state.rejected.values()):,} -> {gen.rejects.path}: {format_reasons(state.rejected, 10)}",
    ]
    if state.failed:
        lines.append(f"{state.failed:,} requests failed after retries (they are asked again on a re-run)")
    if gen.usage is not None:
        lines.append(f"usage: {gen.usage.summary()}")
    return "\n".join(lines)


__all__ = [
    "FILTERS",
    "GenerateOptions",
    "ParsedTask",
    "Seed",
    "SelfInstructPrompt",
    "Task",
    "encode_prompt",
    "generate",
    "load_seeds",
    "make_record",
    "parse_tasks",
    "sample_seeds",
]

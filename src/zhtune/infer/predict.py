"""``zhtune predict RUN IN... -o OUT.jsonl``: batched generation over a data file, resumable.

Top to bottom:

1. **Read** the inputs with the converter's readers and format adapters (any format
   ``zhtune data convert`` reads). The last assistant turn of a record, if present, is the
   *reference*; the conversation before it is the *prompt*, which must end with a user turn.
   Prediction inputs often carry no answer, so an Alpaca/BELLE record may leave out (or leave
   empty) its ``output``/``target``, and a ``messages``/``conversations`` record may end with
   the user. Records that cannot be used go to ``OUT.rejects.jsonl`` with file, line, field and
   reason, exactly as in ``zhtune data convert`` (exit status 1 unless ``--allow-rejects``).
2. **Resume**: ids already in ``OUT`` are skipped, so re-running the same command after an
   interruption generates only what is missing. Ids identify rows: they must be unique.
3. **Generate** longest prompts first, ``batch_size`` at a time, left-padded with the KV cache
   (:func:`zhtune.infer.generate.generate_replies`; the prompt is laid out by the run's template
   exactly as in training). Sorting by length keeps padding low; rows are therefore written in
   length order, not input order.
4. **Write** each batch as JSON Lines ``{id, messages, prediction, reference?, meta}`` and flush,
   so an interrupted run loses at most the batch in flight. A last line cut short by a kill is
   repaired on the next run.

Decoding is greedy by default here (``--temperature 0``), so a resumed run gives the same rows
as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# the converter's own helpers, so ids, meta and detection errors are exactly those of `data convert`
from zhtune.data.convert import (
    SHOWN_REJECTS,
    Outcome,
    RejectWriter,
    default_rejects_path,
    detect_file_format,
    make_record_id,
    record_meta,
    rejects_exit_status,
)
from zhtune.data.formats import FORMATS, Format, apply_mapping, detect_format, get_format
from zhtune.data.readers import RawError, expand_inputs, iter_raw
from zhtune.data.schema import RecordError, validate_record
from zhtune.errors import ZhtuneError, where
from zhtune.infer.backends import EngineOptions, llamacpp_model
from zhtune.infer.generate import (
    GenerationOptions,
    Prompter,
    decode_replies,
    decoder_samplings,
    generate_replies,
)
from zhtune.models.device import resolve_device, resolve_dtype
from zhtune.models.loading import load_for_inference, load_tokenizer_and_template
from zhtune.progress import progress_bar

ANSWER_SLOTS = {"output": "", "target": ""}
"""The answer fields of the Alpaca and BELLE layouts, which prediction inputs may leave out: an
empty slot is filled in so the format is still recognised (and then means: no reference)."""


# --------------------------------------------------------------------------------------------
# 1. Read prompts
# --------------------------------------------------------------------------------------------
def prompt_record(fmt: Format, part: dict[str, Any], raw: dict[str, Any], rid: str, path: str) -> dict:
    """One raw record -> ``{id, messages, reference?, meta}``; raises :class:`RecordError`."""
    if not fmt.chat:
        raise RecordError("text", "plain text (format 'text') has no prompt to answer")
    messages = fmt.to_messages(part)
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"].strip():
        messages = messages[:-1]  # an empty answer slot: no reference
    validate_record({"messages": messages}, require_assistant=False)
    prompt, reference = messages, None
    if messages[-1]["role"] == "assistant":
        prompt, reference = messages[:-1], messages[-1]["content"]
    if not prompt or prompt[-1]["role"] != "user":
        raise RecordError("messages", "no user turn before the last answer (nothing to prompt with)")
    record = {"id": rid, "messages": prompt, "meta": record_meta(fmt, raw, path, messages)}
    if reference is not None:
        record["reference"] = reference
    return record


def read_prompts(
    paths: list[str], fmt: str = "auto", mapping: dict[str, str] | None = None
) -> Iterator[Outcome]:
    """An :class:`~zhtune.data.convert.Outcome` per input record: a prompt record or a reject.

    The same pipeline as ``zhtune data convert`` (readers, ``--map``, format detection per file,
    ids), with the answer optional and a duplicate id rejected.
    """
    named = None if fmt == "auto" else get_format(fmt)
    first_seen: dict[str, str] = {}
    for path in expand_inputs(paths):
        file_fmt = named
        for index, (line, original) in enumerate(iter_raw(path), 1):
            if isinstance(original, RawError):
                yield Outcome(path, line, None, reason=original.reason, index=index)
                continue
            mapped = apply_mapping(original, mapping or {})
            raw = {**ANSWER_SLOTS, **mapped}
            if file_fmt is None:
                name = detect_format(raw)
                file_fmt = FORMATS[name] if name else detect_file_format(path, mapped)
            rid = make_record_id(raw, path, index)
            common = {"path": path, "line": line, "index": index, "fmt": file_fmt.name}
            try:
                parts = file_fmt.explode(raw) if file_fmt.explode else [raw]
                records = [
                    prompt_record(file_fmt, part, raw, f"{rid}-{k}" if file_fmt.explode else rid, path)
                    for k, part in enumerate(parts)
                ]
            except RecordError as e:
                yield Outcome(record=None, reason=e.reason, field=e.field, raw=original, **common)
                continue
            for record in records:
                here = Outcome(record=record, **common).location()
                if record["id"] in first_seen:
                    reason = (
                        f"duplicate id {record['id']!r} (first at {first_seen[record['id']]}); ids "
                        "identify prediction rows, so they must be unique"
                    )
                    yield Outcome(record=None, reason=reason, field="id", raw=original, **common)
                    continue
                first_seen[record["id"]] = here
                yield Outcome(record=record, **common)


# --------------------------------------------------------------------------------------------
# 2. Resume
# --------------------------------------------------------------------------------------------
def done_ids(output: Path) -> set[str]:
    """Ids of the rows already in ``output`` (none if it does not exist).

    A last line without its newline is what a killed run leaves: it is completed if it holds a
    whole row, else cut off (that row is generated again). Any other unreadable line is an error.
    """
    if not output.exists():
        return set()
    data = output.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        try:
            json.loads(data[cut:])["id"]
            with output.open("ab") as f:
                f.write(b"\n")
        except (ValueError, KeyError, TypeError):
            with output.open("r+b") as f:
                f.truncate(cut)
            data = data[:cut]
            print(f"{output}: removed an incomplete last line (an interrupted run)", file=sys.stderr)
    ids: set[str] = set()
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            ids.add(str(json.loads(line)["id"]))
        except (ValueError, KeyError, TypeError):
            raise ZhtuneError(
                f"{where(str(output), lineno)}: not a prediction row with an 'id'. zhtune predict appends "
                "to OUT and skips the ids it already holds: fix that line or choose another -o"
            ) from None
    return ids


# --------------------------------------------------------------------------------------------
# 3 + 4. Generate and write
# --------------------------------------------------------------------------------------------
def batches_by_length(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (a memory problem shows at
    once, and the progress estimate only gets better)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def prediction_row(record: dict[str, Any], prediction: str) -> dict[str, Any]:
    """An output row: ``{id, messages, prediction, reference?, meta}``."""
    row = {"id": record["id"], "messages": record["messages"], "prediction": prediction}
    if "reference" in record:
        row["reference"] = record["reference"]
    row["meta"] = record["meta"]
    return row


def generator(
    run: str, engine: EngineOptions, batch_size: int, dtype: str, device: str, trust_remote_code: bool
) -> tuple[Any, Any, str]:
    """``(generate, tokenizer, template)``: ``generate(prompts, options, stop_ids, seed)`` returns
    a :class:`~zhtune.infer.generate.Reply` per prompt, from ``model.generate`` (native) or
    llama.cpp (rows seeded ``seed``, ``seed + 1``, ...; the GGUF file is loaded at the first
    batch, the longest, with a KV cache just long enough for it and its replies)."""
    if engine.engine == "llamacpp":
        tokenizer, template = load_tokenizer_and_template(run, trust_remote_code)
        loaded: list[Any] = []

        def on_llamacpp(
            prompts: list[list[int]], options: GenerationOptions, stop_ids: list[int], seed: int
        ) -> list:
            if not loaded:
                context = max(len(p) for p in prompts) + options.max_new_tokens + 1
                loaded.append(llamacpp_model(run, engine, batch_size, tokenizer, context))
                print(f"  generating with {loaded[0].describe()}", file=sys.stderr)
            samplings = decoder_samplings(options, len(prompts), seed)
            return decode_replies(loaded[0].decoder(prompts, samplings, stop_ids, 0), tokenizer, len(prompts))

        return on_llamacpp, tokenizer, template
    model, tokenizer, template = load_for_inference(
        run, dtype=dtype, device=device, trust_remote_code=trust_remote_code
    )

    def native(prompts: list[list[int]], options: GenerationOptions, stop_ids: list[int], seed: int) -> list:
        return generate_replies(model, tokenizer, prompts, options, stop_ids)

    return native, tokenizer, template


def predict(
    run: str,
    inputs: list[str],
    output: str,
    options: GenerationOptions,
    batch_size: int = 8,
    template: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    fmt: str = "auto",
    mapping: dict[str, str] | None = None,
    rejects: str | None = None,
    allow_rejects: bool = False,
    progress: bool = True,
    seed: int = 0,
    trust_remote_code: bool = False,
    engine: EngineOptions | None = None,
) -> int:
    """``zhtune predict``: generate a reply for every prompt of ``inputs`` not yet in ``output``.

    The model runs on ``device`` in ``dtype`` (``auto``: :mod:`zhtune.models.device`); its own
    Python code only with ``trust_remote_code`` (``--trust-remote-code``). Returns the exit status:
    1 if any record was rejected and not ``allow_rejects``, else 0.
    """

    if batch_size < 1:
        raise ZhtuneError(f"--batch-size must be >= 1, got {batch_size}")
    engine = engine or EngineOptions()
    engine.check()
    device = resolve_device(device)  # a device this machine lacks fails before any input is read
    dtype = resolve_dtype(dtype, device)
    out = Path(output)
    paths = expand_inputs(inputs)
    if any(os.path.abspath(p) == os.path.abspath(out) for p in paths):
        raise ZhtuneError(f"output {out} is also an input; choose another output path")

    # -- 1. read ---------------------------------------------------------------------------------
    rejects_path = rejects or default_rejects_path(output)
    records: list[dict[str, Any]] = []
    shown: list[str] = []
    with RejectWriter(rejects_path) as rejected:
        for o in read_prompts(paths, fmt, mapping):
            if o.record is not None:
                records.append(o.record)
                continue
            rejected.write(o)
            if len(shown) < SHOWN_REJECTS:
                shown.append(f"{o.location()}{': ' + where(field=o.field) if o.field else ''}: {o.reason}")
    if rejected.count == 0 and rejects is None:
        Path(rejects_path).unlink(missing_ok=True)  # a stale file from an earlier run
    if rejected.count:
        print(f"rejected {rejected.count:,} record(s) -> {rejects_path}; the first ones:", file=sys.stderr)
        print("\n".join(f"  {line}" for line in shown), file=sys.stderr)
    if not records and not rejected.count:
        raise ZhtuneError(f"no records in {', '.join(paths)}")

    # -- 2. resume -------------------------------------------------------------------------------
    done = done_ids(out)
    todo = [r for r in records if r["id"] not in done]
    print(
        f"zhtune predict: {len(records):,} prompts in {', '.join(paths)}; {len(records) - len(todo):,} "
        f"already in {out}; generating {len(todo):,}"
        + ((" with llama.cpp" if engine.engine == "llamacpp" else f" on {device} ({dtype})") if todo else ""),
        file=sys.stderr,
    )

    # -- 3 + 4. generate and write -----------------------------------------------------------------
    if todo:
        import torch

        generate, tokenizer, run_template = generator(
            run, engine, batch_size, dtype, device, trust_remote_code
        )
        prompter = Prompter(tokenizer, template or run_template)
        prompts = [prompter.prompt_ids(r["messages"]) for r in todo]
        torch.manual_seed(seed)
        n_tokens, n_cut, seconds = 0, 0, 0.0
        out.parent.mkdir(parents=True, exist_ok=True)
        with (
            out.open("a", encoding="utf-8") as f,
            progress_bar("predict", progress, total=len(todo), unit=" prompts") as bar,
        ):
            for batch in batches_by_length([len(p) for p in prompts], batch_size):
                start = time.perf_counter()
                replies = generate([prompts[i] for i in batch], options, prompter.stop_ids, seed + batch[0])
                seconds += time.perf_counter() - start
                for i, reply in zip(batch, replies):
                    f.write(
                        json.dumps(prediction_row(todo[i], reply.text.strip()), ensure_ascii=False) + "\n"
                    )
                    n_tokens += len(reply.token_ids)
                    n_cut += not reply.stopped
                f.flush()
                bar.update(len(batch))
                bar.set_postfix(tok_s=f"{n_tokens / max(seconds, 1e-9):.1f}", refresh=False)
        print(
            f"wrote {len(todo):,} predictions to {out}: {n_tokens:,} tokens generated in {seconds:.1f} s, "
            f"{n_tokens / max(seconds, 1e-9):,.1f} tokens/s (batch size {batch_size})"
            + (f"; {n_cut:,} replies stopped at --max-new-tokens {options.max_new_tokens}" if n_cut else ""),
            file=sys.stderr,
        )
    return rejects_exit_status(rejected.count, allow_rejects)

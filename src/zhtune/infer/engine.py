"""The serving engine: one scheduler thread that owns the model and decodes queued replies in batches.

Every request becomes ``n`` *choices* (one per reply), queued here. The scheduler takes up to
``max_batch_size`` queued choices, as soon as that many are queued or no request has arrived for
``batch_wait_ms``, and decodes them together with :class:`~zhtune.infer.generate.BatchDecoder`
(one left-padded prefill, then one forward pass per token for the whole batch). Each row keeps
its own sampling settings, token budget and stop strings and leaves the batch when done; a
streamed choice gets the text it gained after every step. Nothing here knows HTTP: the app
(:mod:`zhtune.infer.serve`) submits choices and receives :class:`Event` objects.
"""

from __future__ import annotations

import copy
import secrets
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from zhtune.allocator import hand_back_memory
from zhtune.infer.generate import BatchDecoder, Prompter, Sampling, placement, prompt_learning

# ---------------------------------------------------------------------------------------------
# The engine: a scheduler thread that batches choices on the model
# ---------------------------------------------------------------------------------------------


@dataclass
class Event:
    """What the scheduler reports about one choice: new text, and at the end why it ended."""

    index: int
    text: str
    """Text gained since the last event (a streamed choice), or the whole reply."""
    finish_reason: str | None = None
    """``stop`` (stop token or stop string) or ``length`` on the choice's last event."""
    tokens: int = 0
    """Tokens generated for this choice so far (a final stop token included)."""
    error: str | None = None
    status: int = 500
    """The HTTP status an ``error`` is answered with (503: ended by a shutdown)."""


@dataclass(eq=False)
class Job:
    """One HTTP request on the scheduler's side: how to reach its handler, and whether it still listens."""

    deliver: Callable[[Event], None]
    remaining: int
    cancelled: bool = False


@dataclass(eq=False)
class Choice:
    """One reply to generate: a row of some batch."""

    job: Job
    index: int
    prompt: list[int]
    sampling: Sampling
    stop: list[str]
    stream: bool
    tokens: list[int] = field(default_factory=list)
    generated: int = 0
    sent: int = 0
    """Characters of the reply already delivered."""
    done: bool = False


class Busy(Exception):
    """The server is full: ``max_concurrent`` requests in flight, or ``max_queue`` choices waiting
    for a batch (the message says which, and its flag)."""


class TorchBackend:
    """A transformers model (peft adapters included) as the engine's backend: decodes with
    :class:`~zhtune.infer.generate.BatchDecoder`. The other backend is
    :class:`~zhtune.infer.llamacpp.LlamaCppModel` (a GGUF file in llama.cpp); both offer
    ``context_length``, ``vocab_size``, ``describe()`` and ``decoder(prompts, samplings,
    stop_ids, pad_id)``."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        # virtual tokens of a prefix / prompt / P-tuning adapter take their place in the context
        # (and an adapter type the decoder cannot batch fails here, at start-up, not per request)
        self.context_length = context_length(model, tokenizer) - prompt_learning(model)[2]
        self.vocab_size = model.get_input_embeddings().weight.shape[0]

    def describe(self) -> str:
        return placement(self.model)

    def decoder(
        self, prompts: list[list[int]], samplings: list[Sampling], stop_ids: list[int], pad_id: int
    ) -> BatchDecoder:
        return BatchDecoder(self.model, prompts, samplings, stop_ids, pad_id)


class Engine:
    """The model, its tokenizer, and the thread that runs every generation in batches."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        template: str,
        max_batch_size: int = 32,
        batch_wait_ms: float = 10.0,
        max_concurrent: int = 128,
        max_queue: int = 1024,
    ) -> None:
        # a transformers model, or a backend such as a LlamaCppModel (see TorchBackend)
        self.backend = model if hasattr(model, "decoder") else TorchBackend(model, tokenizer)
        self.tokenizer = tokenizer
        # the scheduler thread decodes with its own copy: a Rust tokenizer used by two threads at
        # once may raise "Already borrowed"
        self._detokenizer = copy.deepcopy(tokenizer)
        self.template = template
        self.prompter = Prompter(tokenizer, template)
        self.stop_ids = self.prompter.stop_ids
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.context_length = self.backend.context_length
        self.vocab_size = self.backend.vocab_size
        self.max_token_chars = max_token_chars(tokenizer)
        self.max_batch_size = max_batch_size
        self.batch_wait = batch_wait_ms / 1000
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.stats = {"requests": 0, "choices": 0, "batches": 0, "max_batch_size_seen": 0, "tokens": 0}
        self.in_flight = 0
        self._last_arrival = 0.0
        self._pending: deque[Choice] = deque()
        self._lock = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="zhtune-batcher", daemon=True)

    def start(self) -> Engine:
        self._thread.start()
        return self

    @property
    def queued(self) -> int:
        """Choices waiting for a batch."""
        return len(self._pending)

    def submit(self, choices: list[Choice]) -> None:
        """Queue a request's choices (all of the same :class:`Job`); raises :class:`Busy` if
        ``max_concurrent`` requests are in flight or the queue would pass ``max_queue`` choices
        (a request asking for more than ``max_queue`` replies is taken when the queue is empty)."""
        with self._lock:
            if self.in_flight >= self.max_concurrent:
                raise Busy(f"{self.max_concurrent} requests in flight (--max-concurrent)")
            if self._pending and len(self._pending) + len(choices) > self.max_queue:
                raise Busy(f"{len(self._pending)} replies waiting for a batch (--max-queue {self.max_queue})")
            self.in_flight += 1
            self.stats["requests"] += 1
            self._last_arrival = time.monotonic()
            self._pending.extend(choices)
            self._lock.notify()

    # -- the scheduler thread ------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch:
                self._run_isolated(batch)
                if sum(len(c.prompt) for c in batch) >= TRIM_AFTER_PROMPT_TOKENS:
                    hand_back_memory()

    def _run_isolated(self, batch: list[Choice]) -> None:
        """Decode ``batch``; if a step raises, decode each of its unfinished choices again alone,
        from where it got to, so that only a choice that fails alone too fails (a 500 with an
        error id), and the requests batched with it still get their replies."""
        try:
            self._run(batch)
            return
        except Exception:
            if len(batch) > 1:
                log_error(f"a batch of {len(batch)} failed; decoding its choices one by one")
            else:
                self._fail(batch[0])
                return
        for choice in batch:
            if choice.done:
                continue
            try:
                self._run([choice])
            except Exception:
                self._fail(choice)

    def _fail(self, choice: Choice) -> None:
        """End ``choice`` with an error (the exception being handled goes to the log)."""
        error = log_error("generation failed")
        if not choice.done:
            self._finish(choice, Event(choice.index, "", error=error))

    def _next_batch(self) -> list[Choice]:
        """Up to ``max_batch_size`` choices, once that many are queued or no request has arrived
        for ``batch_wait`` seconds (a burst of requests becomes one batch; a lone request waits
        ``batch_wait``, none more than ``max_batch_size`` times that). Choices of requests whose
        client went away are dropped."""
        with self._lock:
            while not self._pending:
                self._lock.wait()
            while len(self._pending) < self.max_batch_size:
                left = self._last_arrival + self.batch_wait - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(left)
            taken = [self._pending.popleft() for _ in range(min(self.max_batch_size, len(self._pending)))]
        for choice in taken:
            if choice.job.cancelled:
                self._finish(choice, None)
        return [c for c in taken if not c.done]

    def _run(self, batch: list[Choice]) -> None:
        """Decode one batch to the end, reporting each choice's progress as it goes."""
        self.stats["batches"] += 1
        self.stats["choices"] += len(batch)
        self.stats["max_batch_size_seen"] = max(self.stats["max_batch_size_seen"], len(batch))
        # a choice decoded again after its batch failed continues from the tokens it already has
        decoder = self.backend.decoder(
            [c.prompt + c.tokens for c in batch],
            [replace(c.sampling, max_new_tokens=c.sampling.max_new_tokens - c.generated) for c in batch],
            self.stop_ids,
            self.pad_id,
        )
        try:
            self._decode(batch, decoder)
        finally:
            decoder.close()

    def _decode(self, batch: list[Choice], decoder: Any) -> None:
        """Step ``decoder`` until every row ends, dropping rows whose client went away."""
        while decoder.running:
            gone = [row for row in decoder.running if batch[row].job.cancelled]
            for row in gone:
                self._finish(batch[row], None)
            decoder.finish(gone)
            if not decoder.running:
                break
            for row, token, reason in decoder.step():
                choice = batch[row]
                choice.generated += 1
                self.stats["tokens"] += 1
                if reason != "stop":  # a stop token is not part of the reply
                    choice.tokens.append(token)
                if self._report(choice, reason):
                    decoder.finish([row])

    def _report(self, choice: Choice, reason: str | None) -> bool:
        """Send what a choice gained this step (streamed choices), or its whole reply when it
        ends; returns True if a stop string ended it. A streamed choice holds back text that may
        still change: a trailing incomplete character, or the start of a stop string."""
        if not (reason or choice.stream or choice.stop):
            return False
        text = self._detokenizer.decode(choice.tokens, skip_special_tokens=True)
        cut = find_stop(text, choice.stop)
        if cut is not None:
            text, reason = text[:cut], "stop"
        if reason is None:
            if not choice.stream:
                return False
            text = text[: len(text) - unsure_tail(text, choice.stop)]
        delta, choice.sent = text[choice.sent :], max(choice.sent, len(text))
        if reason:
            self._finish(choice, Event(choice.index, delta, reason, choice.generated))
        elif delta:
            choice.job.deliver(Event(choice.index, delta, None, choice.generated))
        return cut is not None

    def _finish(self, choice: Choice, event: Event | None) -> None:
        choice.done = True
        if event is not None:
            choice.job.deliver(event)
        with self._lock:
            choice.job.remaining -= 1
            if choice.job.remaining == 0:
                self.in_flight -= 1


TRIM_AFTER_PROMPT_TOKENS = 16384
"""After a batch with this many prompt tokens in all, the freed memory is handed back to the
system (:func:`~zhtune.allocator.hand_back_memory`): a large request leaves no gigabytes behind."""


def log_error(what: str) -> str:
    """Print the exception being handled to the server log under a new error id, and return
    what a client is told: ``what`` and the id, never the exception's text (which may show paths
    and internals)."""
    error_id = "err-" + secrets.token_hex(6)
    print(f"[{error_id}] {what}:", file=sys.stderr)
    traceback.print_exc()
    return f"{what} (error id {error_id}; the server log has the details)"


def find_stop(text: str, stops: list[str]) -> int | None:
    """Where the first stop string in ``text`` begins, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def unsure_tail(text: str, stops: list[str]) -> int:
    """How many trailing characters of a growing reply may still change: replacement characters
    of a partly generated UTF-8 sequence, or a suffix that begins a stop string."""
    n = len(text) - len(text.rstrip("\ufffd"))
    for stop in stops:
        n = max(
            n, next((k for k in range(min(len(stop) - 1, len(text)), 0, -1) if text.endswith(stop[:k])), 0)
        )
    return n


def max_token_chars(tokenizer: Any) -> int:
    """The most characters of text one token of ``tokenizer`` stands for: the longest token
    string in its vocabulary (added tokens included). A byte-level token's string has one
    character per byte, more than the characters it decodes to, so a text of ``c`` characters
    is at least ``c / max_token_chars`` tokens: a prompt can be refused for the context from its
    length alone, before it is tokenized."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return max(1, max(len(p) for p in pieces if isinstance(p, str)))


def chars_beyond_context(texts: list[str], context: int, max_chars: int) -> int:
    """The characters of ``texts`` (whitespace at their ends, which templates may trim, not
    counted) when no tokenization can fit them in ``context`` tokens of at most ``max_chars``
    characters each (:func:`max_token_chars`), else 0: a huge prompt is refused without
    tokenizing it."""
    chars = sum(len(t.strip()) for t in texts)
    return chars if chars > context * max_chars else 0


def context_length(model: Any, tokenizer: Any) -> int:
    """The most tokens (prompt plus reply) the model takes."""
    for key in ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length"):
        value = getattr(model.config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**7 else 2048

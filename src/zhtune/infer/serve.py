"""``zhtune serve RUN``: an OpenAI-compatible HTTP API over a run, with dynamic batching.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (both
with ``stream: true`` as server-sent events ending in ``data: [DONE]``), and ``GET /health``
(status and batching counters; no API key needed). The model is called by the run directory's
name, or ``default``.

How requests share the model. Every request becomes ``n`` *choices* (one per reply; a
completions request with several prompts, ``n`` per prompt), queued for one scheduler thread
that owns the model. The scheduler takes up to ``max_batch_size`` queued choices, as soon as
that many are queued or no request has arrived for ``batch_wait_ms``, and decodes them together
with :class:`~zhtune.infer.generate.BatchDecoder`: one left-padded prefill, then one
forward pass per token for the whole batch, with the KV cache. Each row keeps its own sampling
settings (greedy, or temperature/top-p with its own seeded generator), token budget and stop
strings, and leaves the batch as soon as it is done. A streamed choice is an ordinary row: after
every step the scheduler sends the text it gained, so streams are batched exactly like the rest,
and a streamed reply is the same text as the reply sent whole. While a batch runs, new requests
queue for the next one (no joining a running batch).

Errors are OpenAI-shaped, ``{"error": {"message", "type", "param", "code"}}``: 400 for a
malformed body, invalid or unsupported parameters, or a prompt plus ``max_tokens`` over the
context; 401 for a missing or wrong key; 404 for an unknown model or path; 429 when more than
``max_concurrent`` requests are in flight; 500 if generation itself fails (the server goes on).
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import secrets
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from zhtune.errors import ZhtuneError
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
    """More requests are in flight than ``max_concurrent`` allows."""


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
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        # the scheduler thread decodes with its own copy: a Rust tokenizer used by two threads at
        # once may raise "Already borrowed"
        self._detokenizer = copy.deepcopy(tokenizer)
        self.template = template
        self.prompter = Prompter(tokenizer, template)
        self.stop_ids = self.prompter.stop_ids
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        # virtual tokens of a prefix / prompt / P-tuning adapter take their place in the context
        # (and an adapter type the decoder cannot batch fails here, at start-up, not per request)
        self.context_length = context_length(model, tokenizer) - prompt_learning(model)[2]
        self.vocab_size = model.get_input_embeddings().weight.shape[0]
        self.max_batch_size = max_batch_size
        self.batch_wait = batch_wait_ms / 1000
        self.max_concurrent = max_concurrent
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
        """Queue a request's choices (all of the same :class:`Job`); raises :class:`Busy`."""
        with self._lock:
            if self.in_flight >= self.max_concurrent:
                raise Busy
            self.in_flight += 1
            self.stats["requests"] += 1
            self._last_arrival = time.monotonic()
            self._pending.extend(choices)
            self._lock.notify()

    # -- the scheduler thread ------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if not batch:
                continue
            try:
                self._run(batch)
            except Exception as err:  # a failed batch fails its requests, not the server
                traceback.print_exc()
                for choice in batch:
                    if not choice.done:
                        self._finish(choice, Event(choice.index, "", error=f"generation failed: {err}"))

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
        decoder = BatchDecoder(
            self.model, [c.prompt for c in batch], [c.sampling for c in batch], self.stop_ids, self.pad_id
        )
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


def context_length(model: Any, tokenizer: Any) -> int:
    """The most tokens (prompt plus reply) the model takes."""
    for key in ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length"):
        value = getattr(model.config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**7 else 2048


# ---------------------------------------------------------------------------------------------
# Request bodies and errors
# ---------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answered as OpenAI does: a status and ``{"error": {...}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingParams(BaseModel):
    """Parameters shared by both generation endpoints (others are ignored, as OpenAI's own
    servers ignore unknown ones). ``null`` means the default."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=128)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | int | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None


class ChatRequest(SamplingParams):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(SamplingParams):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


UNSUPPORTED = {  # parameter: the values zhtune serve accepts for it
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "logit_bias": (None, {}),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "response_format": (None, {"type": "text"}),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
}


UNION_TAGS = {"str", "int", "float", "bool"}


async def parse_body(request: Request, schema: type[SamplingParams]) -> Any:
    """The request's JSON body validated against ``schema``; errors raise :class:`ApiError` (400)."""
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"could not parse the JSON body of the request: {err}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        req = schema.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        # pydantic names the union member that failed ("prompt.str"); the param is the field path
        loc = [str(p) for p in first["loc"] if isinstance(p, int) or p not in UNION_TAGS and "[" not in p]
        param = ".".join(loc) or None
        raise ApiError(400, f"invalid value for '{param}': {first['msg']}", param=param) from None
    for name, accepted in UNSUPPORTED.items():
        if getattr(req, name, None) not in accepted:
            raise ApiError(400, f"'{name}' is not supported by zhtune serve", param=name)
    return req


def chat_messages(req: ChatRequest) -> list[dict[str, str]]:
    """The request's messages as zhtune conversation turns (``developer`` is ``system``)."""
    out = []
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        if role == "system" and i > 0:
            raise ApiError(400, "a system message may only come first", param=f"messages.{i}.role")
        text = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
        out.append({"role": role, "content": text})
    if out[-1]["role"] != "user":
        raise ApiError(400, "the last message must come from the user", param="messages")
    return out


# ---------------------------------------------------------------------------------------------
# The HTTP app
# ---------------------------------------------------------------------------------------------


class RequireApiKey:
    """ASGI middleware: ``/v1/...`` needs ``Authorization: Bearer KEY`` (checked before the body is read)."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                message = "missing API key" if not given else "incorrect API key"
                error = ApiError(401, f"{message}: send 'Authorization: Bearer KEY'", code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(engine: Engine, model_name: str, api_key: str | None = None) -> Starlette:
    """The Starlette app serving ``engine`` as ``model_name`` (and ``default``)."""
    created = int(time.time())

    def check_model(name: str) -> None:
        if name not in (model_name, "default"):
            raise ApiError(
                404,
                f"the model '{name}' does not exist; this server has '{model_name}' (or say 'default')",
                param="model",
                code="model_not_found",
            )

    def samplings(req: SamplingParams, prompt_len: int) -> list[Sampling]:
        """``n`` samplings for one prompt, after checking it fits the context."""
        room = engine.context_length - prompt_len
        max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
        if prompt_len < 1:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if room < 1 or (max_tokens is not None and max_tokens > room):
            raise ApiError(
                400,
                f"this model's maximum context length is {engine.context_length} tokens; the prompt has "
                f"{prompt_len} and max_tokens asks for {max_tokens or 'at least 1'} more",
                param="max_tokens" if room >= 1 else "messages",
                code="context_length_exceeded",
            )
        n, temperature, top_p = req.n or 1, req.temperature, req.top_p
        return [
            Sampling(
                max_new_tokens=max_tokens or room,
                temperature=1.0 if temperature is None else temperature,
                top_p=1.0 if top_p is None else top_p,
                seed=None if req.seed is None else (req.seed + j) % 2**63,
            )
            for j in range(n)
        ]

    def start(req: SamplingParams, prompts: list[list[int]]) -> tuple[Job, asyncio.Queue[Event], int]:
        """Queue ``n`` choices per prompt; returns the job, its event queue and the choice count."""
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise ApiError(400, "'stop' takes up to 4 non-empty strings", param="stop")
        rows = [(p, s) for p in prompts for s in samplings(req, len(p))]
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def deliver(event: Event) -> None:  # called from the scheduler thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop has closed (shutting down)
                pass

        job = Job(deliver, remaining=len(rows))
        choices = [Choice(job, i, p, s, stop, bool(req.stream)) for i, (p, s) in enumerate(rows)]
        try:
            engine.submit(choices)
        except Busy:
            raise ApiError(
                429,
                f"server busy: {engine.max_concurrent} requests in flight (--max-concurrent); retry later",
                type="requests",
                code="rate_limit_exceeded",
            ) from None
        return job, events, len(rows)

    async def events_of(job: Job, events: asyncio.Queue[Event], count: int) -> AsyncIterator[Event]:
        """The job's events until each of its ``count`` choices has finished."""
        try:
            while count:
                event = await events.get()
                if event.error:
                    raise ApiError(500, event.error, type="server_error")
                count -= event.finish_reason is not None
                yield event
        finally:
            job.cancelled = True  # a no-op once done; stops the rest if the client went away

    def usage(prompts: list[list[int]], tokens: int) -> dict[str, int]:
        prompt_tokens = sum(len(p) for p in prompts)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": tokens,
            "total_tokens": prompt_tokens + tokens,
        }

    async def respond(req: SamplingParams, prompts: list[list[int]], kind: str) -> Response:
        """Run the request; answer at once (``kind`` chat or text) or as a stream of events."""
        job, events, count = start(req, prompts)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)
        head = {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion"}
        head |= {"created": int(time.time()), "model": model_name}

        def choice(index: int, text: str, reason: str | None) -> dict[str, Any]:
            if kind == "chat":
                key, body = ("message", {"role": "assistant", "content": text})
                if req.stream:
                    key, body = ("delta", {"content": text} if text else {})
                return {"index": index, key: body, "finish_reason": reason, "logprobs": None}
            return {"index": index, "text": text, "finish_reason": reason, "logprobs": None}

        if not req.stream:
            texts, reasons, tokens = [""] * count, [None] * count, [0] * count
            async for ev in events_of(job, events, count):
                texts[ev.index] += ev.text
                reasons[ev.index], tokens[ev.index] = ev.finish_reason, ev.tokens
            choices = [choice(i, texts[i], reasons[i]) for i in range(count)]
            return JSONResponse(head | {"choices": choices, "usage": usage(prompts, sum(tokens))})

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        if kind == "chat":
            head["object"] = "chat.completion.chunk"

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            body = head | {"choices": choices} | ({"usage": None} if include_usage else {}) | extra
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        async def sse() -> AsyncIterator[str]:
            if kind == "chat":
                for i in range(count):
                    yield chunk(
                        [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
                    )
            tokens = [0] * count
            try:
                async for ev in events_of(job, events, count):
                    tokens[ev.index] = ev.tokens
                    if ev.text:
                        yield chunk([choice(ev.index, ev.text, None)])
                    if ev.finish_reason:
                        yield chunk([choice(ev.index, "", ev.finish_reason)])
            except ApiError as err:
                yield f"data: {json.dumps(err.body(), ensure_ascii=False)}\n\n"
            if include_usage:
                yield chunk([], usage=usage(prompts, sum(tokens)))
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def chat_completions(request: Request) -> Response:
        req = await parse_body(request, ChatRequest)
        check_model(req.model)
        try:
            prompt = engine.prompter.prompt_ids(chat_messages(req))
        except (ValueError, ZhtuneError) as err:
            raise ApiError(
                400, f"cannot build a prompt from these messages: {err}", param="messages"
            ) from None
        return await respond(req, [prompt], "chat")

    async def completions(request: Request) -> Response:
        req = await parse_body(request, CompletionRequest)
        check_model(req.model)
        raw = req.prompt
        if not raw:
            raise ApiError(400, "the prompt is empty", param="prompt")
        items = [raw] if isinstance(raw, str) or isinstance(raw[0], int) else raw
        prompts = [engine.tokenizer(p)["input_ids"] if isinstance(p, str) else list(p) for p in items]
        if any(not 0 <= t < engine.vocab_size for p in prompts for t in p):
            raise ApiError(400, f"token ids must be in [0, {engine.vocab_size})", param="prompt")
        return await respond(req, prompts, "text")

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "zhtune"}

    async def list_models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def get_model(request: Request) -> Response:
        check_model(request.path_params["name"])
        return JSONResponse(model_card())

    async def health(request: Request) -> Response:
        return JSONResponse(
            {
                "status": "ok",
                "model": model_name,
                "template": engine.template,
                "context_length": engine.context_length,
                "in_flight": engine.in_flight,
                "queued": engine.queued,
                "batching": engine.stats | {"max_batch_size": engine.max_batch_size},
            }
        )

    async def api_error(request: Request, err: Exception) -> Response:
        assert isinstance(err, ApiError)
        return err.response()

    async def http_error(request: Request, err: Exception) -> Response:
        assert isinstance(err, HTTPException)
        return ApiError(err.status_code, f"{err.detail}: {request.method} {request.url.path}").response()

    async def server_error(request: Request, err: Exception) -> Response:
        traceback.print_exception(err)
        return ApiError(500, f"internal error: {err}", type="server_error").response()

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/models", list_models),
            Route("/v1/models/{name:path}", get_model),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
        ],
        middleware=[Middleware(RequireApiKey, api_key=api_key)] if api_key else [],
        exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: server_error},
        max_body_size=64 * 2**20,
    )


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def serve(
    run: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_concurrent: int = 128,
    max_batch_size: int = 32,
    batch_wait_ms: float = 10.0,
    dtype: str = "auto",
    template: str | None = None,
    device: str = "auto",
) -> None:
    """Load ``run`` on ``device`` in ``dtype`` (``auto``: :mod:`zhtune.models.device`) and serve it
    until interrupted."""
    import uvicorn

    from zhtune.models.loading import load_for_inference

    for name, value in (("--max-concurrent", max_concurrent), ("--max-batch-size", max_batch_size)):
        if value < 1:
            raise ZhtuneError(f"{name} must be at least 1, got {value}")
    if batch_wait_ms < 0:
        raise ZhtuneError(f"--batch-wait-ms must be 0 or more, got {batch_wait_ms}")
    model, tokenizer, run_template = load_for_inference(run, dtype=dtype, device=device)
    name = Path(run).resolve().name
    engine = Engine(model, tokenizer, template or run_template, max_batch_size, batch_wait_ms, max_concurrent)
    app = create_app(engine.start(), name, api_key)
    print(
        f"zhtune serve: '{name}' ({placement(model)}, template {engine.template}, "
        f"context {engine.context_length} tokens), "
        f"batches of up to {max_batch_size} after at most {batch_wait_ms:g} ms, "
        f"OpenAI API at http://{host}:{port}/v1" + ("" if api_key else " (no API key)"),
        file=sys.stderr,
        flush=True,
    )
    if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: serving on {host} without --api-key: anyone who can reach it may use it",
            file=sys.stderr,
        )
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)

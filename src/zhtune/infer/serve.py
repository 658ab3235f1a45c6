"""``zhtune serve RUN``: an OpenAI-compatible HTTP API over a run, with dynamic batching.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (both
with ``stream: true`` as server-sent events ending in ``data: [DONE]``), and ``GET /health``
(status and batching counters; no API key needed). The model is called by the run directory's
name, or ``default``.

Three layers: :mod:`zhtune.infer.engine` (the scheduler thread that owns the model),
:mod:`zhtune.infer.protocol` (request bodies, errors, samplings) and this module, the app that
joins them (routes, streaming, the API key) and the command.

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
import hmac
import json
import secrets
import sys
import time
import traceback
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from zhtune.errors import ZhtuneError
from zhtune.infer.engine import Busy, Choice, Engine, Event, Job
from zhtune.infer.generate import placement
from zhtune.infer.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    SamplingParams,
    chat_messages,
    parse_body,
    samplings,
    stop_strings,
    usage,
)

__all__ = ["Api", "RequireApiKey", "create_app", "serve"]


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


class Api:
    """The routes of the OpenAI-compatible API over one engine, served as ``model_name`` (and
    ``default``)."""

    def __init__(self, engine: Engine, model_name: str) -> None:
        self.engine, self.model_name, self.created = engine, model_name, int(time.time())

    # -- running a request ----------------------------------------------------------------------
    def check_model(self, name: str) -> None:
        if name not in (self.model_name, "default"):
            raise ApiError(
                404,
                f"the model '{name}' does not exist; this server has '{self.model_name}' (or say 'default')",
                param="model",
                code="model_not_found",
            )

    def start(self, req: SamplingParams, prompts: list[list[int]]) -> tuple[Job, asyncio.Queue[Event], int]:
        """Queue ``n`` choices per prompt; returns the job, its event queue and the choice count."""
        stop = stop_strings(req)
        rows = [(p, s) for p in prompts for s in samplings(req, len(p), self.engine.context_length)]
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def deliver(event: Event) -> None:  # called from the scheduler thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop has closed (shutting down)
                pass

        job = Job(deliver, remaining=len(rows))
        choices = [Choice(job, i, p, s, stop, bool(req.stream)) for i, (p, s) in enumerate(rows)]
        try:
            self.engine.submit(choices)
        except Busy:
            raise ApiError(
                429,
                f"server busy: {self.engine.max_concurrent} requests in flight (--max-concurrent); retry later",
                type="requests",
                code="rate_limit_exceeded",
            ) from None
        return job, events, len(rows)

    @staticmethod
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

    async def respond(self, req: SamplingParams, prompts: list[list[int]], kind: str) -> Response:
        """Run the request; answer at once (``kind`` chat or text) or as a stream of events."""
        job, events, count = self.start(req, prompts)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)
        head = {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion"}
        head |= {"created": int(time.time()), "model": self.model_name}

        def choice(index: int, text: str, reason: str | None) -> dict[str, Any]:
            if kind == "chat":
                key, body = ("message", {"role": "assistant", "content": text})
                if req.stream:
                    key, body = ("delta", {"content": text} if text else {})
                return {"index": index, key: body, "finish_reason": reason, "logprobs": None}
            return {"index": index, "text": text, "finish_reason": reason, "logprobs": None}

        if not req.stream:
            texts, reasons, tokens = [""] * count, [None] * count, [0] * count
            async for ev in self.events_of(job, events, count):
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
                async for ev in self.events_of(job, events, count):
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

    # -- routes ---------------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        req = await parse_body(request, ChatRequest)
        self.check_model(req.model)
        try:
            prompt = self.engine.prompter.prompt_ids(chat_messages(req))
        except (ValueError, ZhtuneError) as err:
            raise ApiError(400, f"cannot build a prompt from these messages: {err}", param="messages") from None
        return await self.respond(req, [prompt], "chat")

    async def completions(self, request: Request) -> Response:
        req = await parse_body(request, CompletionRequest)
        self.check_model(req.model)
        raw = req.prompt
        if not raw:
            raise ApiError(400, "the prompt is empty", param="prompt")
        items = [raw] if isinstance(raw, str) or isinstance(raw[0], int) else raw
        tokenizer, vocab_size = self.engine.tokenizer, self.engine.vocab_size
        prompts = [tokenizer(p)["input_ids"] if isinstance(p, str) else list(p) for p in items]
        if any(not 0 <= t < vocab_size for p in prompts for t in p):
            raise ApiError(400, f"token ids must be in [0, {vocab_size})", param="prompt")
        return await self.respond(req, prompts, "text")

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "zhtune"}

    async def list_models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def get_model(self, request: Request) -> Response:
        self.check_model(request.path_params["name"])
        return JSONResponse(self.model_card())

    async def health(self, request: Request) -> Response:
        engine = self.engine
        return JSONResponse(
            {
                "status": "ok",
                "model": self.model_name,
                "template": engine.template,
                "context_length": engine.context_length,
                "in_flight": engine.in_flight,
                "queued": engine.queued,
                "batching": engine.stats | {"max_batch_size": engine.max_batch_size},
            }
        )


async def _api_error(request: Request, err: Exception) -> Response:
    assert isinstance(err, ApiError)
    return err.response()


async def _http_error(request: Request, err: Exception) -> Response:
    assert isinstance(err, HTTPException)
    return ApiError(err.status_code, f"{err.detail}: {request.method} {request.url.path}").response()


async def _server_error(request: Request, err: Exception) -> Response:
    traceback.print_exception(err)
    return ApiError(500, f"internal error: {err}", type="server_error").response()


def create_app(engine: Engine, model_name: str, api_key: str | None = None) -> Starlette:
    """The Starlette app serving ``engine`` as ``model_name`` (and ``default``)."""
    api = Api(engine, model_name)
    return Starlette(
        routes=[
            Route("/health", api.health),
            Route("/v1/models", api.list_models),
            Route("/v1/models/{name:path}", api.get_model),
            Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
            Route("/v1/completions", api.completions, methods=["POST"]),
        ],
        middleware=[Middleware(RequireApiKey, api_key=api_key)] if api_key else [],
        exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _server_error},
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

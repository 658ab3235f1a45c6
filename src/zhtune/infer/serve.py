"""``zhtune serve RUN``: an OpenAI-compatible HTTP API over a run, with dynamic batching.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (both
with ``stream: true`` as server-sent events ending in ``data: [DONE]``), ``GET /health`` (503
``loading`` while the model loads, then 200 ``ok`` with the batching counters) and ``GET
/metrics`` (Prometheus text, :mod:`zhtune.infer.metrics`); the last two need no API key. The
model is called by the run directory's name, or ``default``. The server listens before the model
has loaded (it loads on a thread), so a supervisor sees "loading", not "connection refused".

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
context; 401 for a missing or wrong key; 404 for an unknown model or path; 429 (with
``Retry-After``) when ``max_concurrent`` requests are in flight or ``max_queue`` replies wait for
a batch; 500 if generation itself fails (for the request that fails alone: a failed batch is
decoded again row by row, so the others go on); 503 while the model loads, and for requests
still running when a shutdown's grace period ends. CORS is off unless ``--allowed-origins``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import sys
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from zhtune.errors import ZhtuneError
from zhtune.infer.backends import EngineOptions, open_llamacpp
from zhtune.infer.engine import Busy, Choice, Engine, Event, Job, chars_beyond_context, log_error
from zhtune.infer.metrics import CONTENT_TYPE, ENGINE_FIGURES, Measure, Metrics
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
from zhtune.infer.serve_config import DEFAULT_LIMITS, LOOPBACK, Limits, ServeOptions
from zhtune.models.loading import load_for_inference

__all__ = ["Api", "BodyLimit", "HostCheck", "Limits", "RequireApiKey", "ServeOptions", "create_app", "serve"]


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


class BodyLimit:
    """ASGI middleware: a body over ``max_bytes`` is answered 413 (OpenAI-shaped) as soon as its
    Content-Length says so, or as soon as that many bytes have arrived, never read whole; a body
    whose next piece takes over ``timeout`` seconds to arrive is answered 408 (a client that
    stops sending holds no request open, nor its connection: the 408 says ``Connection: close``)."""

    def __init__(self, app: Any, max_bytes: int, timeout: float = DEFAULT_LIMITS.body_timeout) -> None:
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    def error(self) -> ApiError:
        mib = self.max_bytes / 2**20
        return ApiError(413, f"request body over {mib:g} MiB (--max-body-mb)", code="request_too_large")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await self.error().response()(scope, receive, send)
            return
        seen, complete = 0, False

        async def limited() -> dict:
            nonlocal seen, complete
            if complete:  # after the body, receive waits for a disconnect: no timeout
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout)
            except asyncio.TimeoutError:
                raise ApiError(408, f"the request body stalled for {self.timeout:g} s (--header-timeout)",
                               code="request_timeout", headers={"Connection": "close"}) from None  # fmt: skip
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if seen > self.max_bytes:
                    raise self.error()
            return message

        await self.app(scope, limited, send)


class HostCheck:
    """ASGI middleware: a request whose Host header (port aside) is not in ``hosts`` gets a 421,
    so a web page whose own name resolves to this machine (DNS rebinding) reaches nothing."""

    def __init__(self, app: Any, hosts: tuple[str, ...]) -> None:
        self.app, self.hosts = app, hosts

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").lower()
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name not in self.hosts:
                allowed = ", ".join(self.hosts)
                await ApiError(421, f"unknown Host {host!r}; this server answers {allowed} (--allowed-hosts)",
                               code="misdirected_request").response()(scope, receive, send)  # fmt: skip
                return
        await self.app(scope, receive, send)


class Api:
    """The routes of the OpenAI-compatible API over one engine, served as ``model_name`` (and
    ``default``). Made before the engine exists when the model loads while the server already
    listens (``engine`` None): generation answers 503 ``model_loading`` until :meth:`ready`."""

    def __init__(self, engine: Engine | None, model_name: str, limits: Limits = DEFAULT_LIMITS) -> None:
        self.model_name, self.created, self.limits = model_name, int(time.time()), limits
        self._engine, self.load_seconds = engine, 0.0
        self.loading_since = time.monotonic()
        self.metrics = Metrics()
        # prompts are rendered and tokenized off the event loop, one at a time (the tokenizer is
        # not to be used by two threads at once; the scheduler decodes with its own copy)
        self._prompts = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zhtune-prompts")
        self.live: set[Job] = set()
        """Jobs whose response is still being produced (what a shutdown waits for, then ends)."""

    @property
    def engine(self) -> Engine:
        """The engine; while the model loads, an OpenAI-shaped 503 (``model_loading``, Retry-After)."""
        if self._engine is None:
            raise ApiError(
                503,
                f"the model '{self.model_name}' is still loading; retry shortly (GET /health says when it is ready)",
                type="server_error",
                code="model_loading",
                headers=RETRY_LATER,
            )
        return self._engine

    def ready(self, engine: Engine, load_seconds: float) -> None:
        """Serve with ``engine`` (started) from now on; the model took ``load_seconds`` to load."""
        self.load_seconds, self._engine = load_seconds, engine

    async def off_loop(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on the prompt thread, so a long prompt never stalls other requests."""
        return await asyncio.get_running_loop().run_in_executor(self._prompts, fn, *args)

    # -- running a request ----------------------------------------------------------------------
    def check_model(self, name: str) -> None:
        if name not in (self.model_name, "default"):
            raise ApiError(
                404,
                f"the model '{name}' does not exist; this server has '{self.model_name}' (or say 'default')",
                param="model",
                code="model_not_found",
            )

    def check_length(self, texts: list[str], param: str) -> None:
        """Refuse (400 ``context_length_exceeded``) texts that cannot fit the context whatever
        they tokenize to: more characters than ``context_length`` tokens of the longest token
        can hold. Counts characters only, so a megabyte prompt is refused without tokenizing it
        (leading and trailing whitespace, which templates may trim, is not counted)."""
        engine = self.engine
        chars = chars_beyond_context(texts, engine.context_length, engine.max_token_chars)
        if chars:
            raise ApiError(
                400,
                f"this model's maximum context length is {engine.context_length} tokens; the prompt has "
                f"{chars} characters, more than {engine.context_length} tokens of at most "
                f"{engine.max_token_chars} characters each",
                param=param,
                code="context_length_exceeded",
            )

    def start(self, req: SamplingParams, prompts: list[list[int]]) -> tuple[Job, asyncio.Queue[Event], int]:
        """Queue ``n`` choices per prompt; returns the job, its event queue and the choice count."""
        stop = stop_strings(req)
        asked = len(prompts) * (req.n or 1)
        if asked > self.limits.max_choices:
            raise ApiError(
                400,
                f"this request asks for {asked} replies (prompts x n); the limit is "
                f"{self.limits.max_choices} (--max-request-choices)",
                param="n",
            )
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
            self.live.add(job)
            self.metrics.prompt_tokens += sum(len(p) for p in prompts)
        except Busy as busy:
            raise ApiError(
                429,
                f"server busy: {busy}; retry later",
                type="requests",
                code="rate_limit_exceeded",
                headers=RETRY_LATER,
            ) from None
        return job, events, len(rows)

    async def events_of(self, job: Job, events: asyncio.Queue[Event], count: int) -> AsyncIterator[Event]:
        """The job's events until each of its ``count`` choices has finished."""
        try:
            while count:
                event = await events.get()
                if event.error:
                    code = "server_shutting_down" if event.status == 503 else None
                    raise ApiError(event.status, event.error, type="server_error", code=code)
                count -= event.finish_reason is not None
                yield event
        finally:
            job.cancelled = True  # a no-op once done; stops the rest if the client went away
            self.live.discard(job)

    def end_all(self, why: str) -> None:
        """End every request still running (a shutdown's grace period is over): its generation
        stops, a stream gets an error chunk and ``data: [DONE]``, a whole answer a 503."""
        for job in list(self.live):
            job.cancelled = True
            job.deliver(Event(0, "", error=why, status=503))

    async def respond(
        self, request: Request, req: SamplingParams, prompts: list[list[int]], kind: str
    ) -> Response:
        """Run the request; answer at once (``kind`` chat or text) or as a stream of events. A
        client that goes away stops its generation (a stream at its next chunk, a whole answer
        within :data:`DISCONNECT_POLL_S`)."""
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
            watcher = asyncio.ensure_future(_cancel_on_disconnect(request, job))
            try:
                async for ev in self.events_of(job, events, count):
                    texts[ev.index] += ev.text
                    reasons[ev.index], tokens[ev.index] = ev.finish_reason, ev.tokens
            finally:
                watcher.cancel()
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
            tokens, arrived = [0] * count, request.scope.get("zhtune.arrived")
            try:
                async for ev in self.events_of(job, events, count):
                    tokens[ev.index] = ev.tokens
                    if ev.text and arrived is not None:
                        self.metrics.first_token.observe(time.monotonic() - arrived)
                        arrived = None
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
        if len(req.messages) > self.limits.max_messages:
            raise ApiError(
                400,
                f"{len(req.messages)} messages; the limit is {self.limits.max_messages} (--max-messages)",
                param="messages",
            )
        messages = chat_messages(req)
        self.check_length([m["content"] for m in messages], "messages")
        try:
            prompt = await self.off_loop(self.engine.prompter.prompt_ids, messages)
        except (ValueError, ZhtuneError) as err:
            raise ApiError(400, f"cannot build a prompt from these messages: {err}", param="messages") from None
        return await self.respond(request, req, [prompt], "chat")

    async def completions(self, request: Request) -> Response:
        req = await parse_body(request, CompletionRequest)
        self.check_model(req.model)
        raw = req.prompt
        if not raw:
            raise ApiError(400, "the prompt is empty", param="prompt")
        items = [raw] if isinstance(raw, str) or isinstance(raw[0], int) else raw
        tokenizer, vocab_size = self.engine.tokenizer, self.engine.vocab_size
        if len(items) > self.limits.max_choices:
            raise ApiError(400, f"{len(items)} prompts; the limit is {self.limits.max_choices}", param="prompt")
        texts = [p for p in items if isinstance(p, str)]
        for text in texts:
            self.check_length([text], "prompt")
        encoded = iter(await self.off_loop(lambda: tokenizer(texts)["input_ids"]) if texts else [])
        prompts = [next(encoded) if isinstance(p, str) else list(p) for p in items]
        if any(not 0 <= t < vocab_size for p in prompts for t in p):
            raise ApiError(400, f"token ids must be in [0, {vocab_size})", param="prompt")
        return await self.respond(request, req, prompts, "text")

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "zhtune"}

    async def list_models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def get_model(self, request: Request) -> Response:
        self.check_model(request.path_params["name"])
        return JSONResponse(self.model_card())

    async def health(self, request: Request) -> Response:
        """200 ``ok`` with the batching counters once the model serves; 503 ``loading`` before."""
        engine = self._engine
        if engine is None:
            loading = round(time.monotonic() - self.loading_since, 1)
            body = {"status": "loading", "ready": False, "model": self.model_name, "loading_seconds": loading}
            return JSONResponse(body, status_code=503, headers=RETRY_LATER)
        return JSONResponse(
            {
                "status": "ok",
                "ready": True,
                "load_seconds": round(self.load_seconds, 2),
                "model": self.model_name,
                "template": engine.template,
                "context_length": engine.context_length,
                "in_flight": engine.in_flight,
                "queued": engine.queued,
                "batching": engine.stats | {"max_batch_size": engine.max_batch_size},
            }
        )

    def engine_figures(self) -> dict[str, float]:
        """The scheduler's figures for ``/metrics`` (:data:`~zhtune.infer.metrics.ENGINE_FIGURES`; 0 while loading)."""
        engine = self._engine
        if engine is None:
            return {name: 0 for name, _, _ in ENGINE_FIGURES}
        stats = engine.stats
        return {
            "zhtune_model_ready": 1,
            "zhtune_model_load_seconds": round(self.load_seconds, 3),
            "zhtune_completion_tokens_total": stats["tokens"],
            "zhtune_generation_requests_in_flight": engine.in_flight,
            "zhtune_queue_depth": engine.queued,
            "zhtune_batches_total": stats["batches"],
            "zhtune_batch_rows_total": stats["choices"],
        }

    async def metrics_text(self, request: Request) -> Response:
        """``GET /metrics``: Prometheus' text exposition format (no API key, like ``/health``)."""
        return Response(self.metrics.render(self.engine_figures()), media_type=CONTENT_TYPE)


RETRY_AFTER_S = 1
"""What a 429 busy answer's ``Retry-After`` says, in seconds."""
RETRY_LATER = {"Retry-After": str(RETRY_AFTER_S)}
"""The header of every answer that asks the client to come back (busy, model still loading)."""

DISCONNECT_POLL_S = 0.5
"""How often a non-streaming request checks whether its client is still there."""


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """Mark ``job`` cancelled (the scheduler drops its rows at the next step) once the client
    has gone; runs until cancelled itself."""
    while not job.cancelled:
        if await request.is_disconnected():
            job.cancelled = True
            return
        await asyncio.sleep(DISCONNECT_POLL_S)


async def _api_error(request: Request, err: Exception) -> Response:
    assert isinstance(err, ApiError)
    return err.response()


async def _http_error(request: Request, err: Exception) -> Response:
    assert isinstance(err, HTTPException)
    return ApiError(err.status_code, f"{err.detail}: {request.method} {request.url.path}").response()


CLIENT_CLOSED = 499
"""The status (nginx's) a request whose client left while sending it is counted under; nobody reads it."""


async def _client_gone(request: Request, err: Exception) -> Response:
    """A client that went away while sending its body: nothing to answer, nothing to log."""
    return Response(status_code=CLIENT_CLOSED)


async def _server_error(request: Request, err: Exception) -> Response:
    try:
        raise err
    except Exception:
        message = log_error(f"internal error in {request.method} {request.url.path}")
    return ApiError(500, message, type="server_error").response()


def create_app(
    engine: Engine | None,
    model_name: str,
    api_key: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
    hosts: tuple[str, ...] | None = None,
    origins: tuple[str, ...] = (),
) -> Starlette:
    """The Starlette app serving ``engine`` as ``model_name`` (and ``default``) within ``limits``,
    answering only the Host names in ``hosts`` (None: any), and letting scripts of web pages from
    ``origins`` call it (CORS; none by default: no ``Access-Control-*`` header is ever sent).
    ``engine`` None: the model is still loading (``app.state.api.ready(engine, seconds)`` later).

    Middleware, outermost first: :class:`~zhtune.infer.metrics.Measure` (so every answer is
    counted), :class:`HostCheck`, CORS (outside the key check: a browser's preflight carries no
    key, and a 401 must still carry the allow header for the page to read it), :class:`BodyLimit`,
    :class:`RequireApiKey`."""
    api = Api(engine, model_name, limits)
    cors = Middleware(CORSMiddleware, allow_origins=list(origins), allow_methods=["GET", "POST"],
                      allow_headers=["*"], max_age=600)  # fmt: skip
    app = Starlette(
        routes=[
            Route("/health", api.health),
            Route("/metrics", api.metrics_text),
            Route("/v1/models", api.list_models),
            Route("/v1/models/{name:path}", api.get_model),
            Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
            Route("/v1/completions", api.completions, methods=["POST"]),
        ],
        middleware=[Middleware(Measure, metrics=api.metrics)]
        + ([Middleware(HostCheck, hosts=hosts)] if hosts is not None else [])
        + ([cors] if origins else [])
        + [Middleware(BodyLimit, max_bytes=limits.max_body_bytes, timeout=limits.body_timeout)]
        + ([Middleware(RequireApiKey, api_key=api_key)] if api_key else []),
        exception_handlers={
            ApiError: _api_error,
            HTTPException: _http_error,
            ClientDisconnect: _client_gone,
            Exception: _server_error,
        },
    )
    app.state.api = api
    return app


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def serve(
    run: str,
    opts: ServeOptions,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    engine_opts: EngineOptions | None = None,
) -> None:
    """Serve ``run`` on ``device`` in ``dtype`` (``auto``: :mod:`zhtune.models.device`; its own
    Python code only with ``trust_remote_code``, ``--trust-remote-code``) until interrupted.

    The server listens at once and the model loads on a thread meanwhile: ``/health`` answers 503
    ``loading`` until it serves, then 200 ``ok`` (a supervisor or load balancer can tell a server
    that is loading from one that is down). A load that fails stops the server and is raised here."""
    api_key = opts.check()
    engine_opts = engine_opts or EngineOptions()
    engine_opts.check()
    name = Path(run).resolve().name
    app = create_app(None, name, api_key, opts.limits(), opts.hosts(), opts.origins())
    server = build_server(app, opts)
    failed: list[Exception] = []

    def load() -> None:
        started = time.monotonic()
        try:
            if engine_opts.engine == "llamacpp":
                model, tokenizer, run_template = open_llamacpp(run, engine_opts, opts.max_batch_size, trust_remote_code)
            else:
                model, tokenizer, run_template = load_for_inference(
                    run, dtype=dtype, device=device, trust_remote_code=trust_remote_code
                )
            engine = Engine(model, tokenizer, opts.template or run_template, opts.max_batch_size,
                            opts.batch_wait_ms, opts.max_concurrent, opts.max_queue).start()  # fmt: skip
        except Exception as err:
            failed.append(err)
            server.should_exit = True
            return
        app.state.api.ready(engine, time.monotonic() - started)
        print(
            f"zhtune serve: '{name}' ready after {time.monotonic() - started:.1f} s ({engine.backend.describe()}, "
            f"template {engine.template}, context {engine.context_length} tokens), "
            f"batches of up to {opts.max_batch_size} after at most {opts.batch_wait_ms:g} ms, "
            f"OpenAI API at http://{opts.host}:{opts.port}/v1" + ("" if api_key else " (no API key)"),
            file=sys.stderr,
            flush=True,
        )

    print(f"zhtune serve: loading '{name}'; http://{opts.host}:{opts.port}/health says 'loading' (503) until "
          "it serves", file=sys.stderr, flush=True)  # fmt: skip
    if not api_key and opts.host not in LOOPBACK:
        print(f"warning: serving on {opts.host} without an API key (--insecure-no-auth)", file=sys.stderr)
    threading.Thread(target=load, name="zhtune-loader", daemon=True).start()
    server.run()
    if failed:
        raise failed[0]


SHUTDOWN_FLUSH_S = 2
"""Seconds after a shutdown's grace period for the ended requests' last words to be sent."""


def build_server(app: Starlette, opts: ServeOptions) -> GracefulServer:
    """The uvicorn server of ``app`` with the connection limits of ``opts``: a connection cap
    (503 beyond), idle keep-alive and request-head timeouts, and a graceful shutdown (see
    :class:`GracefulServer`)."""
    config = uvicorn.Config(
        app,
        host=opts.host,
        port=opts.port,
        log_level="info",
        http=head_timeout_protocol(opts.header_timeout),
        limit_concurrency=opts.max_connections,
        timeout_keep_alive=opts.keep_alive_timeout,
        timeout_graceful_shutdown=int(opts.shutdown_timeout) + SHUTDOWN_FLUSH_S,
    )
    return GracefulServer(config, app.state.api, opts.shutdown_timeout)


def head_timeout_protocol(timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection that has not sent a complete request head
    ``timeout`` seconds after it opened or its last response ended (uvicorn has no such timeout:
    half-sent requests were held open for good)."""

    class HeadTimeout(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm_head_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _arm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(timeout, self._head_timeout)

        def _head_timeout(self) -> None:
            no_request = self.cycle is None or self.cycle.response_complete
            if no_request and not self.transport.is_closing():
                self.transport.close()

    return HeadTimeout


class GracefulServer(uvicorn.Server):
    """uvicorn's server with a shutdown that ends requests cleanly: on the first SIGTERM or
    SIGINT it stops accepting connections and lets in-flight requests finish for ``grace``
    seconds, then ends the rest (:meth:`Api.end_all`: an error chunk and ``[DONE]`` for a stream,
    a 503 for a whole answer) and exits; a second signal exits at once."""

    def __init__(self, config: uvicorn.Config, api: Api, grace: float) -> None:
        super().__init__(config)
        self.api, self.grace = api, grace

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.should_exit:  # uvicorn forces only on a second SIGINT; SIGTERM too here
            self.force_exit = True
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        print(f"zhtune serve: shutting down; in-flight requests have {self.grace:g} s (--shutdown-timeout)",
              file=sys.stderr, flush=True)  # fmt: skip
        why = f"the server is shutting down and this request ran past its {self.grace:g} s grace period"
        ending = asyncio.get_running_loop().call_later(self.grace, self.api.end_all, why)
        try:
            await super().shutdown(sockets)
        finally:
            ending.cancel()

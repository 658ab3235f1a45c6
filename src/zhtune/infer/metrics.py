"""``GET /metrics`` of ``zhtune serve``: counters and histograms in Prometheus' text exposition
format (version 0.0.4), written here in a few lines rather than with a client library.

What is counted where: :class:`Measure` (ASGI middleware, outermost but for Starlette's own error
layer) counts every HTTP answer by route and status and times it, a 401, 413 or 421 from the
other middleware included; the app observes time to first token of streamed requests and prompt
tokens; the engine's own counters (tokens generated, batches, in flight, queued) are read when
``/metrics`` is scraped. Everything is updated on the event loop, so no lock is needed.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
"""Upper bounds (seconds) of the latency and time-to-first-token histograms' buckets."""

ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
"""Paths counted under their own name (``/v1/models/NAME`` as ``/v1/models/{name}``); any other
path is ``other``, so random 404 paths cannot grow the series without bound."""

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def route_of(path: str) -> str:
    """The ``route`` label of a request path (see :data:`ROUTES`)."""
    if path in ROUTES:
        return path
    return "/v1/models/{name}" if path.startswith("/v1/models/") else "other"


def labels(**values: str) -> str:
    """``{a="x",b="y"}`` (values escaped as the format asks), or nothing without values."""
    if not values:
        return ""
    escaped = (str(v).replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n") for v in values.values())
    return "{" + ",".join(f'{k}="{v}"' for k, v in zip(values, escaped)) + "}"


def family(name: str, kind: str, help_text: str, samples: Iterable[str]) -> list[str]:
    """One metric family: its HELP and TYPE lines, then its sample lines."""
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]


def number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


class Histogram:
    """Cumulative buckets, sum and count of observed values, per label set."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.series: dict[tuple[tuple[str, str], ...], list[float]] = {}
        """Label set -> [count per bucket..., count over the last bucket, sum]."""

    def observe(self, value: float, **label_values: str) -> None:
        row = self.series.setdefault(tuple(label_values.items()), [0] * (len(self.buckets) + 1) + [0.0])
        row[next((i for i, bound in enumerate(self.buckets) if value <= bound), len(self.buckets))] += 1
        row[-1] += value

    def samples(self, name: str) -> list[str]:
        out = []
        for key, row in sorted(self.series.items()):
            given, total = dict(key), 0
            for bound, count in zip((*self.buckets, "+Inf"), row[:-1]):
                total += count
                out.append(f"{name}_bucket{labels(**given, le=str(bound))} {total}")
            out += [f"{name}_sum{labels(**given)} {row[-1]!r}", f"{name}_count{labels(**given)} {total}"]
        return out


class Metrics:
    """The server's own counts (the engine's are passed to :meth:`render`)."""

    def __init__(self) -> None:
        self.responses: Counter[tuple[str, str]] = Counter()
        """(route, status code) -> answers."""
        self.latency = Histogram()
        """Seconds from a request's arrival to the end of its answer (a stream's last chunk), by route."""
        self.first_token = Histogram()
        """Seconds from a streamed request's arrival to its first text."""
        self.prompt_tokens = 0
        self.http_in_flight = 0

    def render(self, engine: dict[str, Any]) -> str:
        """The exposition text; ``engine`` holds the scheduler's figures (:meth:`Api.engine_figures`)."""
        answered = sorted(self.responses.items())
        requests = (f"zhtune_requests_total{labels(route=r, code=c)} {n}" for (r, c), n in answered)
        lines = [
            *family("zhtune_requests_total", "counter", "HTTP requests answered, by route and status code.", requests),
            *family("zhtune_request_duration_seconds", "histogram",
                    "Seconds from a request's arrival to the end of its answer (a stream's last chunk), by route.",
                    self.latency.samples("zhtune_request_duration_seconds")),
            *family("zhtune_time_to_first_token_seconds", "histogram",
                    "Seconds from a streamed generation request's arrival to its first text.",
                    self.first_token.samples("zhtune_time_to_first_token_seconds")),
            *family("zhtune_http_requests_in_flight", "gauge", "HTTP requests being answered now (any route).",
                    [f"zhtune_http_requests_in_flight {self.http_in_flight}"]),
            *family("zhtune_prompt_tokens_total", "counter", "Prompt tokens of the generation requests accepted.",
                    [f"zhtune_prompt_tokens_total {self.prompt_tokens}"]),
        ]  # fmt: skip
        for name, kind, help_text in ENGINE_FIGURES:
            lines += family(name, kind, help_text, [f"{name} {number(engine[name])}"])
        return "\n".join(lines) + "\n"


ENGINE_FIGURES = (
    ("zhtune_model_ready", "gauge", "1 once the model is loaded and serving, 0 while it loads."),
    ("zhtune_model_load_seconds", "gauge", "Seconds the model took to load (0 while it loads)."),
    ("zhtune_completion_tokens_total", "counter",
     "Tokens generated (a final stop token included; also for replies whose client went away)."),
    ("zhtune_generation_requests_in_flight", "gauge", "Generation requests queued or being decoded."),
    ("zhtune_queue_depth", "gauge", "Replies (prompts x n) waiting for a batch."),
    ("zhtune_batches_total", "counter", "Batches decoded."),
    ("zhtune_batch_rows_total", "counter", "Replies decoded, summed over batches (rows / batches: mean batch size)."),
)  # fmt: skip
"""The scheduler's figures: (name, type, help)."""


class Measure:
    """ASGI middleware: count each HTTP answer by route and status in ``metrics`` and time it
    from arrival to its last body chunk. A request whose handler raises before answering counts
    as a 500 (Starlette's outer error layer answers it so). The arrival time is left in the
    scope as ``zhtune.arrived`` for the app (time to first token)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope["zhtune.arrived"] = started = time.monotonic()
        status = "500"

        async def watched(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        self.metrics.http_in_flight += 1
        try:
            await self.app(scope, receive, watched)
        finally:
            route = route_of(scope["path"])
            self.metrics.http_in_flight -= 1
            self.metrics.responses[route, status] += 1
            self.metrics.latency.observe(time.monotonic() - started, route=route)

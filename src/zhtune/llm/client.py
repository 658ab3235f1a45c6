"""A client for any OpenAI-compatible chat endpoint: concurrency limit, retries, cache, accounting.

Teacher models (``zhtune data generate`` / ``evolve``) and judges (``zhtune eval judge``) are
remote endpoints: OpenAI, a vLLM or llama.cpp server, or ``zhtune serve``. What every caller needs
from one is the same, so it lives here once:

* **a concurrency limit**: at most ``concurrency`` requests in flight (an asyncio semaphore);
* **retries with backoff** on what is worth retrying (429, 408, 5xx, timeouts, dropped
  connections, a 200 whose body is not a chat completion), honouring ``Retry-After``; any other
  4xx (wrong key, unknown model, bad request) fails at once with the server's message;
* **a cache** (SQLite, keyed by the request) so that re-running a job after a crash, Ctrl-C or a
  change in the report asks nothing twice and pays nothing twice;
* **accounting**: requests, cache hits, retries, failures, prompt and completion tokens, cost.

Plain ``httpx`` rather than the ``openai`` package: a small dependency, and the retry and cache
policy stays ours (the ``openai`` client retries on its own, which would hide retries from the
counts).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import sqlite3
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from zhtune.errors import ZhtuneError

#: Statuses worth asking again: rate limits, timeouts and server-side failures.
RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529})
#: Longest single wait between retries, seconds (``Retry-After`` included).
MAX_BACKOFF = 60.0

T = TypeVar("T")


class ApiError(ZhtuneError):
    """A request that failed for good: a non-retryable status, or retries exhausted.

    ``status`` is the last HTTP status (None for a transport error or a malformed body).
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Endpoint:
    """Where to send chat requests. ``base_url`` ends before ``/chat/completions`` (``.../v1``)."""

    base_url: str
    model: str
    api_key: str = ""

    @classmethod
    def resolve(
        cls, base_url: str | None, model: str | None, api_key: str | None, flag_prefix: str = ""
    ) -> Endpoint:
        """Fill what the command line left out from the environment (``OPENAI_BASE_URL``,
        ``OPENAI_MODEL``, ``OPENAI_API_KEY``), and fail clearly when something is missing. Errors
        name the flags as the command spells them (``flag_prefix`` ``judge-``: ``--judge-model``)."""
        url = base_url or os.environ.get("OPENAI_BASE_URL", "")
        name = model or os.environ.get("OPENAI_MODEL", "")
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY", "")
        url_flag, model_flag = f"--{flag_prefix}base-url", f"--{flag_prefix}model"
        if not url:
            raise ZhtuneError(
                f"no endpoint: pass {url_flag} (e.g. http://127.0.0.1:8000/v1) or set OPENAI_BASE_URL"
            )
        if not url.startswith(("http://", "https://")):
            raise ZhtuneError(f"{url_flag} {url!r}: expected an http:// or https:// URL ending in /v1")
        if not name:
            raise ZhtuneError(f"no model name: pass {model_flag} or set OPENAI_MODEL")
        return cls(url.rstrip("/"), name, key or "")


@dataclass(frozen=True)
class ChatReply:
    """One chat completion: the first choice's text and the token counts the server reported."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached: bool = False


@dataclass
class Usage:
    """What a client has done so far (all requests, cache hits included)."""

    requests: int = 0
    """Requests answered (from the server or the cache)."""
    cached: int = 0
    """Of those, answered from the cache (no request sent, nothing paid)."""
    retries: int = 0
    """Extra attempts after a retryable failure."""
    failures: int = 0
    """Requests that failed for good (raised :class:`ApiError`)."""
    prompt_tokens: int = 0
    """Prompt tokens of the requests sent (cache hits not counted: they were not paid again)."""
    completion_tokens: int = 0
    """Completion tokens of the requests sent."""
    price_in: float = 0.0
    """Price per million prompt tokens (for :attr:`cost`)."""
    price_out: float = 0.0
    """Price per million completion tokens."""

    @property
    def cost(self) -> float:
        """Money spent on the requests sent, in the unit of the prices."""
        return (self.prompt_tokens * self.price_in + self.completion_tokens * self.price_out) / 1e6

    def summary(self) -> str:
        """One line for the end of a command's output."""
        line = (
            f"{self.requests:,} requests ({self.cached:,} from cache), {self.retries:,} retries, "
            f"{self.failures:,} failed; tokens: {self.prompt_tokens:,} prompt + "
            f"{self.completion_tokens:,} completion"
        )
        if self.price_in or self.price_out:
            line += f"; cost {self.cost:.4f}"
        return line


class ReplyCache:
    """Successful replies on disk, keyed by a hash of the request (SQLite: safe against a crash
    mid-write, cheap to open, one file)."""

    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = str(path)
        self._db = sqlite3.connect(self.path)
        self._db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, reply TEXT NOT NULL)")
        self._db.commit()

    @staticmethod
    def key(payload: dict[str, Any], extra: str = "") -> str:
        """The cache key of a request body (model, messages and every decoding parameter)."""
        text = json.dumps(payload, sort_keys=True, ensure_ascii=False) + "\x00" + extra
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def get(self, key: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT reply FROM replies WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, reply: dict[str, Any]) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO replies (key, reply) VALUES (?, ?)",
            (key, json.dumps(reply, ensure_ascii=False)),
        )
        self._db.commit()

    def close(self) -> None:
        self._db.close()


def _retry_after(headers: Any) -> float | None:
    value = headers.get("retry-after") if headers is not None else None
    try:
        return min(MAX_BACKOFF, max(0.0, float(value))) if value is not None else None
    except ValueError:
        return None


def _error_message(body: str) -> str:
    """The ``error.message`` of an OpenAI-shaped error body, else the body's start."""
    try:
        data = json.loads(body)
        if isinstance(data, dict) and isinstance(data.get("error"), dict):
            return str(data["error"].get("message", body))
    except ValueError:
        pass
    return body[:300]


def parse_reply(data: Any) -> ChatReply:
    """The first choice of a chat completion body; ValueError when it is not one."""
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list) or not data["choices"]:
        raise ValueError("no 'choices' in the reply")
    choice = data["choices"][0]
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict) or not isinstance(message.get("content"), str):
        raise ValueError("no 'choices[0].message.content' string in the reply")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    return ChatReply(
        text=message["content"],
        finish_reason=str(choice.get("finish_reason") or ""),
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
    )


class ChatClient:
    """Send chat requests to one :class:`Endpoint` (use as ``async with ChatClient(...) as c``).

    ``concurrency`` bounds requests in flight; ``max_retries`` bounds extra attempts per request
    (backoff ``backoff * 2**attempt`` seconds with jitter, or the server's ``Retry-After``);
    ``timeout`` is per attempt, seconds. ``cache`` (a path) turns on the reply cache.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        concurrency: int = 8,
        max_retries: int = 5,
        timeout: float = 120.0,
        backoff: float = 1.0,
        cache: str | Path | None = None,
        price_in: float = 0.0,
        price_out: float = 0.0,
    ) -> None:
        if concurrency < 1:
            raise ZhtuneError(f"--concurrency must be at least 1, got {concurrency}")
        self.endpoint = endpoint
        self.max_retries = max_retries
        self.timeout = timeout
        self.backoff = backoff
        self.usage = Usage(price_in=price_in, price_out=price_out)
        self._semaphore = asyncio.Semaphore(concurrency)
        self._concurrency = concurrency
        self._cache = ReplyCache(cache) if cache else None
        self._http: Any = None

    async def __aenter__(self) -> ChatClient:
        import httpx

        headers = {"Authorization": f"Bearer {self.endpoint.api_key}"} if self.endpoint.api_key else {}
        limits = httpx.Limits(max_connections=self._concurrency, max_keepalive_connections=self._concurrency)
        self._http = httpx.AsyncClient(headers=headers, timeout=self.timeout, limits=limits)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._http.aclose()
        if self._cache is not None:
            self._cache.close()

    async def chat(self, messages: list[dict[str, str]], cache_extra: str = "", **params: Any) -> ChatReply:
        """One chat completion for ``messages`` with decoding ``params`` (temperature, max_tokens,
        top_p, seed, stop, ...; None values are left out). ``cache_extra`` tells apart requests
        that are otherwise identical but must not share a reply (e.g. the k-th sample of a
        prompt). Raises :class:`ApiError` when the request fails for good."""
        payload = {"model": self.endpoint.model, "messages": messages}
        payload.update({k: v for k, v in params.items() if v is not None})
        key = ReplyCache.key(payload, cache_extra) if self._cache is not None else ""
        if self._cache is not None and (hit := self._cache.get(key)) is not None:
            self.usage.requests += 1
            self.usage.cached += 1
            return ChatReply(**{**hit, "cached": True})
        async with self._semaphore:
            reply = await self._send(payload)
        self.usage.requests += 1
        self.usage.prompt_tokens += reply.prompt_tokens
        self.usage.completion_tokens += reply.completion_tokens
        if self._cache is not None:
            self._cache.put(key, {k: v for k, v in reply.__dict__.items() if k != "cached"})
        return reply

    async def _send(self, payload: dict[str, Any]) -> ChatReply:
        import httpx

        url = f"{self.endpoint.base_url}/chat/completions"
        problem = ""
        for attempt in range(self.max_retries + 1):
            wait: float | None = None
            status: int | None = None
            try:
                response = await self._http.post(url, json=payload)
                status = response.status_code
                if status == 200:
                    try:
                        return parse_reply(response.json())
                    except ValueError as e:  # json.JSONDecodeError is a ValueError
                        problem = f"malformed reply ({e})"
                elif status in RETRY_STATUSES:
                    problem = f"HTTP {status}: {_error_message(response.text)}"
                    wait = _retry_after(response.headers)
                else:
                    self.usage.failures += 1
                    raise ApiError(f"{url}: HTTP {status}: {_error_message(response.text)}", status)
            except httpx.TimeoutException:
                problem = f"timed out after {self.timeout:g} s"
            except httpx.TransportError as e:
                problem = f"connection failed ({type(e).__name__}: {e})"
            if attempt == self.max_retries:
                break
            self.usage.retries += 1
            if wait is None:
                wait = min(MAX_BACKOFF, self.backoff * 2**attempt) * (0.5 + random.random())
            await asyncio.sleep(wait)
        self.usage.failures += 1
        raise ApiError(f"{url}: {problem} (gave up after {self.max_retries + 1} attempts)", status)


async def map_limited(
    items: Iterable[T], worker: Callable[[T], Awaitable[None]], progress: Any = None
) -> None:
    """Run ``worker(item)`` for every item concurrently (the client's semaphore does the
    limiting) and tick ``progress`` (a tqdm bar or None) as each finishes. The first exception
    cancels the rest and is raised."""

    async def run(item: T) -> None:
        await worker(item)
        if progress is not None:
            progress.update(1)

    tasks = [asyncio.ensure_future(run(item)) for item in items]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


__all__ = [
    "ApiError",
    "ChatClient",
    "ChatReply",
    "Endpoint",
    "ReplyCache",
    "Usage",
    "map_limited",
    "parse_reply",
]

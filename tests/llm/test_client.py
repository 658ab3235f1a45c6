"""The OpenAI-compatible client against a real HTTP stub: retries (429 with Retry-After, 5xx,
malformed bodies, timeouts), non-retryable errors, the concurrency limit, cache and accounting."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from tests.stub_openai import Scripted, StubServer
from zhtune.errors import ZhtuneError
from zhtune.llm.client import ApiError, ChatClient, Endpoint, map_limited

MSG = [{"role": "user", "content": "你好"}]


def run_chats(server: StubServer, n: int = 1, **client_args) -> tuple[list, ChatClient]:
    async def go() -> tuple[list, ChatClient]:
        endpoint = Endpoint(server.base_url, "stub", client_args.pop("api_key", ""))
        async with ChatClient(endpoint, backoff=0.01, **client_args) as client:
            replies = await asyncio.gather(
                *[client.chat(MSG, cache_extra=str(i), temperature=0) for i in range(n)],
                return_exceptions=True,
            )
        return replies, client

    return asyncio.run(go())


def test_reply_usage_and_request_body():
    with StubServer(lambda req, n: "得分：0.8") as server:
        (reply,), client = run_chats(server, api_key="k")
    assert reply.text == "得分：0.8" and reply.finish_reason == "stop" and not reply.cached
    assert server.requests == [{"model": "stub", "messages": MSG, "temperature": 0}]
    assert (client.usage.requests, client.usage.prompt_tokens, client.usage.completion_tokens) == (1, 10, 3)


def test_retries_429_5xx_malformed_then_succeeds():
    plan = [
        Scripted(status=429, headers={"Retry-After": "0"}),
        Scripted(status=503),
        Scripted(body="not json"),
        Scripted(body='{"choices": []}'),
        "ok",
    ]
    with StubServer(lambda req, n: plan[n - 1]) as server:
        (reply,), client = run_chats(server)
    assert reply.text == "ok"
    assert client.usage.retries == 4 and client.usage.failures == 0 and len(server.requests) == 5


def test_timeout_is_retried():
    with StubServer(lambda req, n: Scripted(text="late", delay=1.0) if n == 1 else "on time") as server:
        (reply,), client = run_chats(server, timeout=0.3)
    assert reply.text == "on time" and client.usage.retries == 1


def test_gives_up_after_max_retries_and_fails_at_once_on_4xx():
    with StubServer(lambda req, n: Scripted(status=500)) as server:
        (err,), client = run_chats(server, max_retries=2)
    assert isinstance(err, ApiError) and err.status == 500 and "gave up after 3 attempts" in str(err)
    assert len(server.requests) == 3 and client.usage.failures == 1

    with StubServer(lambda req, n: "x", api_key="right") as server:
        (err,), client = run_chats(server, api_key="wrong")
    assert isinstance(err, ApiError) and err.status == 401 and "Incorrect API key" in str(err)
    assert client.usage.retries == 0


def test_concurrency_limit_is_respected():
    active, peak, lock = [0], [0], threading.Lock()

    def script(req, n):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        with lock:
            active[0] -= 1
        return "ok"

    with StubServer(script) as server:
        replies, _ = run_chats(server, n=12, concurrency=3)
    assert [r.text for r in replies] == ["ok"] * 12
    assert peak[0] == 3


def test_cache_answers_a_rerun_without_requests(tmp_path):
    with StubServer(lambda req, n: f"reply {n}") as server:
        first, _ = run_chats(server, n=3, cache=tmp_path / "cache.sqlite")
        second, client = run_chats(server, n=3, cache=tmp_path / "cache.sqlite")
    assert [r.text for r in second] == [r.text for r in first]
    assert all(r.cached for r in second) and len(server.requests) == 3
    assert client.usage.cached == 3 and client.usage.prompt_tokens == 0


def test_map_limited_ticks_progress_and_raises_the_first_error():
    class Bar:
        n = 0

        def update(self, k):
            self.n += k

    bar = Bar()
    seen = []

    async def work(i):
        seen.append(i)

    asyncio.run(map_limited(range(5), work, bar))
    assert sorted(seen) == list(range(5)) and bar.n == 5

    async def boom(i):
        raise ApiError("no")

    with pytest.raises(ApiError):
        asyncio.run(map_limited(range(3), boom))


def test_endpoint_from_environment(monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://h:1/v1/")
    monkeypatch.setenv("OPENAI_API_KEY", "sk")
    e = Endpoint.resolve(None, "m", None)
    assert (e.base_url, e.model, e.api_key) == ("http://h:1/v1", "m", "sk")
    monkeypatch.delenv("OPENAI_BASE_URL")
    with pytest.raises(ZhtuneError, match="--base-url"):
        Endpoint.resolve(None, "m", None)
    with pytest.raises(ZhtuneError, match="http"):
        Endpoint.resolve("localhost:8000", "m", None)

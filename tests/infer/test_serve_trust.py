"""``zhtune serve`` under faults and load: one failing request fails nobody else, and each limit
(context, queue, connections, shutdown, memory) answers as documented."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from starlette.testclient import TestClient

import zhtune.infer.engine as engine_module
from tests.infer.test_serve import NAME, QUESTIONS, local, reference, run_dir  # noqa: F401 (fixtures)
from zhtune.infer.engine import Engine
from zhtune.infer.serve import create_app
from zhtune.models.loading import load_for_inference

POISON = [7, 7, 7, 7, 9]
"""A completions prompt the faulty decoder below cannot decode."""


def make_engine(run_dir, **engine_kw) -> Engine:  # noqa: F811
    """An engine over the sharpened tiny run, not yet started."""
    model, tokenizer, template = load_for_inference(run_dir)
    return Engine(model, tokenizer, template, **engine_kw)


def make_client(run_dir, start: bool = True, **engine_kw) -> tuple[TestClient, Engine]:  # noqa: F811
    """The app in this process over a fresh engine (starlette's TestClient drives it), and the engine."""
    engine = make_engine(run_dir, **engine_kw)
    return TestClient(create_app(engine.start() if start else engine, NAME)), engine


def chat_body(question: str, max_tokens: int = 8) -> dict:
    return {"model": NAME, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0}


def test_a_row_that_raises_fails_alone_and_its_batch_gets_its_replies(run_dir, local, monkeypatch, capfd):  # noqa: F811
    """A decoder that raises at its third step whenever the poison prompt is among its rows: the
    batch fails mid-way, each choice is decoded again alone from where it got to, the poison
    request gets a 500 with an error id and the innocent ones exactly their greedy replies."""

    class Faulty(engine_module.BatchDecoder):
        def __init__(self, model, prompts, *args):
            super().__init__(model, prompts, *args)
            self.poisoned, self.steps = any(p[: len(POISON)] == POISON for p in prompts), 0

        def step(self):
            self.steps += 1
            if self.poisoned and self.steps == 3:
                raise RuntimeError("injected fault")
            return super().step()

    monkeypatch.setattr(engine_module, "BatchDecoder", Faulty)
    questions = [f"{q} (iso)" for q in QUESTIONS[:5]]
    client, _ = make_client(run_dir, batch_wait_ms=400)
    with client:
        poison = {"model": NAME, "prompt": POISON, "max_tokens": 8, "temperature": 0}
        with ThreadPoolExecutor(6) as pool:
            bad = pool.submit(client.post, "/v1/completions", json=poison)
            good = [pool.submit(client.post, "/v1/chat/completions", json=chat_body(q)) for q in questions]
            bad, good = bad.result(), [g.result() for g in good]
        assert bad.status_code == 500 and "generation failed (error id err-" in bad.json()["error"]["message"]
        assert [g.status_code for g in good] == [200] * 5
        assert [g.json()["choices"][0]["message"]["content"] for g in good] == [reference(local, q, 8) for q in questions]
        batching = client.get("/health").json()["batching"]
        assert batching["max_batch_size_seen"] == 6  # they were one batch
        assert "a batch of 6 failed; decoding its choices one by one" in capfd.readouterr().err
        # the scheduler carries on
        assert client.post("/v1/chat/completions", json=chat_body(QUESTIONS[0], 2)).status_code == 200


def test_a_prompt_far_over_the_context_is_refused_before_tokenizing(run_dir, monkeypatch):  # noqa: F811
    """1.5 MB of text cannot be 512 tokens: refused from its length (400
    ``context_length_exceeded``), without rendering or tokenizing it; a prompt just within the
    character bound is still tokenized and checked exactly."""
    client, engine = make_client(run_dir)
    with client:
        calls, prompter = [], engine.prompter
        real = prompter.prompt_ids
        monkeypatch.setattr(prompter, "prompt_ids", lambda messages: calls.append(1) or real(messages))
        r = client.post("/v1/chat/completions", json=chat_body("x" * 1_500_000))
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert r.json()["error"]["param"] == "messages" and calls == []
        many = {"model": NAME, "max_tokens": 2, "messages": [{"role": "user", "content": "y" * 1000}] * 1000}
        r = client.post("/v1/chat/completions", json=many)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded" and calls == []
        r = client.post("/v1/completions", json={"model": NAME, "prompt": ["hi", "z" * 1_500_000]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        within = "一" * (engine.context_length * engine.max_token_chars // 2)
        r = client.post("/v1/chat/completions", json=chat_body(within))
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded" and calls == [1]
        assert client.post("/v1/chat/completions", json=chat_body(QUESTIONS[0], 2)).status_code == 200


def test_a_full_queue_answers_429_with_retry_after(run_dir):  # noqa: F811
    """``max_queue`` counts replies (prompts x n) waiting for a batch: past it a request gets an
    OpenAI-shaped 429 with ``Retry-After``; once the queue drains requests are served again."""
    from zhtune.infer.engine import Choice, Job
    from zhtune.infer.generate import Sampling

    client, engine = make_client(run_dir, start=False, max_queue=3)
    with client:
        events = []
        waiting = Job(events.append, remaining=2)
        engine.submit([Choice(waiting, i, [5, 6, 7], Sampling(2), [], False) for i in range(2)])
        r = client.post("/v1/completions", json={"model": NAME, "prompt": "hi", "n": 2, "max_tokens": 2})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "rate_limit_exceeded" and "--max-queue 3" in r.json()["error"]["message"]
        engine.start()
        deadline = time.monotonic() + 30
        while len(events) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [e.finish_reason for e in events] == ["length", "length"]
        body = {"model": NAME, "prompt": "hi", "n": 2, "max_tokens": 2}
        assert client.post("/v1/completions", json=body).status_code == 200


def test_connection_limits_reach_uvicorn(run_dir):  # noqa: F811
    """--max-connections, --keep-alive-timeout, --header-timeout and --shutdown-timeout are
    uvicorn's limit_concurrency, timeout_keep_alive, a request-head timeout on its h11 protocol,
    and the grace period of the shutdown (plus the time to send the ended requests' last chunk)."""
    from zhtune.infer.serve import SHUTDOWN_FLUSH_S, GracefulServer, build_server
    from zhtune.infer.serve_config import ServeOptions

    client, _ = make_client(run_dir, start=False)
    opts = ServeOptions(max_connections=7, keep_alive_timeout=3, header_timeout=2.5, shutdown_timeout=4)
    server = build_server(client.app, opts)
    assert isinstance(server, GracefulServer) and server.grace == 4
    config = server.config
    assert (config.limit_concurrency, config.timeout_keep_alive) == (7, 3)
    assert config.timeout_graceful_shutdown == 4 + SHUTDOWN_FLUSH_S
    assert config.http.__name__ == "HeadTimeout"
    assert ServeOptions().max_connections == 1024 and ServeOptions().shutdown_timeout == 30


def test_connection_cap_head_timeout_and_graceful_shutdown(tiny_model_dir, tmp_path):
    """A real ``zhtune serve``: a connection over --max-connections gets 503; one that never
    finishes its request head is closed after --header-timeout; on SIGTERM, once --shutdown-timeout
    has passed, a running stream ends with an error chunk and ``data: [DONE]`` and a running
    whole answer gets an OpenAI-shaped 503; then it exits."""
    import json
    import signal
    import socket
    import threading

    import httpx

    from tests.serving import zhtune_process

    args = ["serve", str(tiny_model_dir), "--max-connections", "3", "--header-timeout", "1",
            "--shutdown-timeout", "0.3", "--batch-wait-ms", "1"]  # fmt: skip
    with zhtune_process(args, tmp_path / "server.log", "/health", timeout=60) as (url, proc):
        host, port = url.removeprefix("http://").split(":")
        # a half-sent request head is dropped
        with socket.create_connection((host, int(port))) as half:
            half.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            half.settimeout(10)
            started = time.monotonic()
            assert half.recv(100) == b"" and time.monotonic() - started < 5

        long = {"model": "default", "prompt": "hi", "max_tokens": 480, "n": 64, "temperature": 0}
        out: dict = {}

        def stream() -> None:
            with httpx.stream("POST", f"{url}/v1/completions", json=long | {"stream": True}, timeout=60) as r:
                out["stream"] = [line for line in r.iter_lines() if line]

        def whole() -> None:
            out["whole"] = httpx.post(f"{url}/v1/completions", json=long, timeout=60)

        threads = [threading.Thread(target=stream), threading.Thread(target=whole)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        over = httpx.get(f"{url}/health", timeout=10)  # the third connection: over the cap
        assert over.status_code == 503
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        proc.wait(20)
    assert out["whole"].status_code == 503
    assert out["whole"].json()["error"]["code"] == "server_shutting_down"
    lines = out["stream"]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2].removeprefix("data: "))["error"]["code"] == "server_shutting_down"
    assert "shutting down" in (tmp_path / "server.log").read_text()


def test_memory_is_handed_back_after_a_large_prompt(run_dir, monkeypatch):  # noqa: F811
    """A batch with TRIM_AFTER_PROMPT_TOKENS prompt tokens or more calls malloc_trim once done; a small one does not."""
    from zhtune.allocator import hand_back_memory

    calls = []
    monkeypatch.setattr(engine_module, "TRIM_AFTER_PROMPT_TOKENS", 60)
    monkeypatch.setattr(engine_module, "hand_back_memory", lambda: calls.append(1) or hand_back_memory())
    client, _ = make_client(run_dir)
    with client:
        assert client.post("/v1/completions", json={"model": NAME, "prompt": [5] * 10, "max_tokens": 1}).status_code == 200
        assert calls == []
        assert client.post("/v1/completions", json={"model": NAME, "prompt": [5] * 80, "max_tokens": 1}).status_code == 200
        deadline = time.monotonic() + 10
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert calls == [1]


def test_health_says_loading_until_the_model_serves(run_dir, monkeypatch):  # noqa: F811
    """``serve`` listens before the model has loaded: meanwhile /health is a 503 ``loading``,
    generation a 503 ``model_loading`` with Retry-After and /metrics says not ready; once the
    model is loaded /health is 200 ``ok`` with the load time, and requests are served."""
    import threading

    import httpx

    import zhtune.infer.serve as serve_module
    from tests.serving import free_port
    from zhtune.infer.serve_config import ServeOptions

    release, servers = threading.Event(), []
    real_load, real_build = serve_module.load_for_inference, serve_module.build_server
    monkeypatch.setattr(serve_module, "load_for_inference", lambda *a, **kw: release.wait(30) and real_load(*a, **kw))
    monkeypatch.setattr(serve_module, "build_server", lambda *a: servers.append(real_build(*a)) or servers[-1])
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    thread = threading.Thread(target=serve_module.serve, args=(str(run_dir), ServeOptions(port=port)))
    thread.start()
    try:
        deadline, health = time.monotonic() + 30, None
        while health is None and time.monotonic() < deadline:
            try:
                health = httpx.get(f"{url}/health", timeout=2)
            except httpx.TransportError:
                time.sleep(0.05)
        assert health.status_code == 503 and health.headers["retry-after"] == "1"
        assert health.json() | {"loading_seconds": 0} == {"status": "loading", "ready": False, "model": NAME, "loading_seconds": 0}
        r = httpx.post(f"{url}/v1/chat/completions", json=chat_body(QUESTIONS[0]), timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading" and "retry-after" in r.headers
        assert "zhtune_model_ready 0\n" in httpx.get(f"{url}/metrics", timeout=10).text
        release.set()
        while (health := httpx.get(f"{url}/health", timeout=10)).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        body = health.json()
        assert body["status"] == "ok" and body["ready"] is True and body["load_seconds"] >= 0
        assert {"in_flight", "queued", "batching", "context_length", "template"} <= set(body)
        assert httpx.post(f"{url}/v1/chat/completions", json=chat_body(QUESTIONS[0]), timeout=30).status_code == 200
        assert "zhtune_model_ready 1\n" in httpx.get(f"{url}/metrics", timeout=10).text
    finally:
        release.set()
        if servers:
            servers[0].should_exit = True
        thread.join(30)


def test_a_model_that_fails_to_load_stops_the_server(run_dir, monkeypatch, capsys):  # noqa: F811
    """The load runs while the server listens; when it fails the server stops and the command
    ends with the load's error (exit status 1), as when it loaded before listening."""
    import zhtune.infer.serve as serve_module
    from tests.serving import free_port
    from zhtune.cli import main
    from zhtune.errors import ZhtuneError

    def broken(*args, **kwargs):
        raise ZhtuneError("not a model directory: nowhere")

    monkeypatch.setattr(serve_module, "load_for_inference", broken)
    started = time.monotonic()
    assert main(["serve", str(run_dir), "--port", str(free_port())]) == 1
    assert "error: not a model directory: nowhere" in capsys.readouterr().err
    assert time.monotonic() - started < 30


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as {'name{labels}': value}, checking each line's shape on the way."""
    import re

    sample = re.compile(r'^[a-z_]+(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? -?[0-9.e+]+$')
    values = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) [a-z_]+ ", line), line
            continue
        assert sample.match(line), line
        key, value = line.rsplit(" ", 1)
        values[key] = float(value)
    return values


def test_metrics_count_requests_tokens_and_latency(run_dir):  # noqa: F811
    """/metrics (no key, like /health) in Prometheus text: answers by route and status (a 401
    from the key check, an unknown path as ``other``), tokens, queue and batches, and latency and
    time-to-first-token histograms whose buckets add up."""
    engine = make_engine(run_dir, batch_wait_ms=1)
    with TestClient(create_app(engine.start(), NAME, api_key="k")) as client:
        auth = {"Authorization": "Bearer k"}
        assert client.post("/v1/chat/completions", json=chat_body(QUESTIONS[0]), headers=auth).status_code == 200
        with client.stream("POST", "/v1/chat/completions", json=chat_body(QUESTIONS[1]) | {"stream": True}, headers=auth) as r:
            assert list(r.iter_lines())[-2] == "data: [DONE]"
        assert client.post("/v1/chat/completions", json=chat_body(QUESTIONS[0])).status_code == 401
        assert client.post("/v1/completions", json={"model": "gpt-4", "prompt": "hi"}, headers=auth).status_code == 404
        assert client.get("/no/such/path/42").status_code == 404
        r = client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        m = parse_metrics(r.text)
    chat = 'route="/v1/chat/completions"'
    assert m[f'zhtune_requests_total{{{chat},code="200"}}'] == 2
    assert m[f'zhtune_requests_total{{{chat},code="401"}}'] == 1
    assert m['zhtune_requests_total{route="/v1/completions",code="404"}'] == 1
    assert m['zhtune_requests_total{route="other",code="404"}'] == 1
    assert m[f"zhtune_request_duration_seconds_count{{{chat}}}"] == 3
    buckets = [v for k, v in m.items() if k.startswith(f"zhtune_request_duration_seconds_bucket{{{chat},")]
    assert buckets == sorted(buckets) and buckets[-1] == 3 and m[f"zhtune_request_duration_seconds_sum{{{chat}}}"] > 0
    assert m["zhtune_time_to_first_token_seconds_count"] == 1  # the streamed request
    assert m["zhtune_completion_tokens_total"] == engine.stats["tokens"] > 0
    assert m["zhtune_prompt_tokens_total"] > 0 and m["zhtune_batches_total"] == engine.stats["batches"] >= 1
    assert m["zhtune_queue_depth"] == 0 and m["zhtune_generation_requests_in_flight"] == 0
    assert m["zhtune_http_requests_in_flight"] == 1  # the /metrics request itself
    assert m["zhtune_model_ready"] == 1


def test_cors_is_off_by_default_and_on_for_the_listed_origins(run_dir):  # noqa: F811
    """No ``Access-Control-*`` header by default (a browser page on another site may not read any
    answer, nor get a preflight allowance); --allowed-origins lets exactly those origins in, a
    401 included (the key check comes after CORS), and an unlisted origin still gets nothing."""
    import pytest

    from zhtune.errors import ZhtuneError
    from zhtune.infer.serve_config import ServeOptions

    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    engine = make_engine(run_dir, batch_wait_ms=1).start()
    with TestClient(create_app(engine, NAME)) as plain:
        r = plain.options("/v1/chat/completions", headers={"Origin": "https://app.example"} | preflight)
        assert r.status_code == 405 and not [h for h in r.headers if h.startswith("access-control-")]
        r = plain.get("/health", headers={"Origin": "https://app.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers

    opts = ServeOptions(allowed_origins="https://app.example/, http://localhost:3000")
    assert opts.origins() == ("https://app.example", "http://localhost:3000") and opts.check() is None
    with pytest.raises(ZhtuneError, match="--allowed-origins"):
        ServeOptions(allowed_origins="app.example").check()
    with TestClient(create_app(engine, NAME, api_key="k", origins=opts.origins())) as cors:
        r = cors.options("/v1/chat/completions", headers={"Origin": "https://app.example"} | preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        r = cors.options("/v1/chat/completions", headers={"Origin": "https://evil.example"} | preflight)
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
        r = cors.post("/v1/chat/completions", json=chat_body(QUESTIONS[0], 2), headers={"Origin": "https://app.example"})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "https://app.example"
        r = cors.post("/v1/chat/completions", json=chat_body(QUESTIONS[0], 2),
                      headers={"Origin": "https://evil.example", "Authorization": "Bearer k"})  # fmt: skip
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    with TestClient(create_app(engine, NAME, origins=("*",))) as anyone:
        r = anyone.options("/v1/completions", headers={"Origin": "https://elsewhere.example"} | preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"



def asgi_post(app, arriving: list[dict]) -> list[dict]:
    """POST /v1/chat/completions to ``app`` straight through ASGI, the client's messages being
    ``arriving`` and then nothing (it stalls); returns what the app sent."""
    import asyncio

    sent = []

    async def receive() -> dict:
        if arriving:
            return arriving.pop(0)
        await asyncio.sleep(3600)

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "scheme": "http", "http_version": "1.1",
             "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000),
             "headers": [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json")]}  # fmt: skip
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 30))
    return sent


def test_a_client_that_leaves_mid_body_is_no_internal_error(run_dir, capfd):  # noqa: F811
    """A client that disconnects while sending its body (found by bench/soak.py's slow client)
    was logged as an internal error; now it is counted as a 499 and logged as nothing."""
    from zhtune.infer.serve import CLIENT_CLOSED

    app = create_app(make_engine(run_dir).start(), NAME)
    sent = asgi_post(app, [{"type": "http.request", "body": b'{"model": "defa', "more_body": True},
                           {"type": "http.disconnect"}])  # fmt: skip
    assert sent[0]["status"] == CLIENT_CLOSED
    assert app.state.api.metrics.responses["/v1/chat/completions", "499"] == 1
    assert "internal error" not in capfd.readouterr().err


def test_a_stalled_body_gets_a_408_that_closes_the_connection(run_dir):  # noqa: F811
    """A body whose next piece does not come within --header-timeout is answered 408 with
    ``Connection: close``: the connection ends with the answer, not after keep-alive."""
    from zhtune.infer.serve_config import Limits

    app = create_app(make_engine(run_dir).start(), NAME, limits=Limits(body_timeout=0.2))
    sent = asgi_post(app, [{"type": "http.request", "body": b'{"model": "defa', "more_body": True}])
    headers = dict(sent[0]["headers"])
    assert sent[0]["status"] == 408 and headers[b"connection"] == b"close"
    assert b"request_timeout" in sent[1]["body"]

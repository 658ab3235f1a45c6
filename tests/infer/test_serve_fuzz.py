"""Fuzzing ``zhtune serve``'s request bodies: seeded random mutations of chat and completions
requests (a wrong type for every field, huge, negative, NaN and infinite numbers written as JSON
text, deep nesting, invalid UTF-8 and other encodings, lone surrogates and other unicode oddities,
empty and truncated bodies, wrong content types and methods) never get a 500, only 2xx and
OpenAI-shaped 4xx, while innocent greedy requests sent at the same time all get the reply they
get alone."""

from __future__ import annotations

import json
import random
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
from starlette.testclient import TestClient

from tests.infer.test_serve import NAME, QUESTIONS, run_dir  # noqa: F401 (fixture)
from zhtune.infer.engine import Engine
from zhtune.infer.protocol import ChatRequest, CompletionRequest
from zhtune.infer.serve import create_app
from zhtune.models.loading import load_for_inference

SEED = 18
CASES = 400
CONTEXT = 96
"""The served context, in tokens: a mutated request without ``max_tokens`` (which then runs to
the context) stays short, and a prompt over it is refused."""


@dataclass(frozen=True)
class Raw:
    """A JSON text put into a body as it is (NaN, 1e309, a 5,000-digit integer, a lone
    surrogate escape: values :func:`json.dumps` would not write, or not so)."""

    text: str


ODD = [Raw(t) for t in [
    "null", "true", "false", "0", "-1", "1", "2", "-0.0", "1.5", "1e-300", "1e309", "-1e309", "NaN", "Infinity",
    "-Infinity", "2147483648", "-9223372036854775809", "18446744073709551616", "9" * 5000, "1" + "0" * 400,
    '""', '"x"', '"2"', '"default"', r'"\ud800"', r'"a\udc00\ud800b"', r'"\ud83d\ude00"', r'"\u0000\u0001"',
    '"\u202e\ufeff\u200b\U0001f600"', '"' + "字" * 3000 + '"', '"' + "\u0301" * 500 + '"',
    "[]", "[1, 2]", '["a", "b"]', "[[1], [2, 3]]", '[{"type": "text", "text": "hi"}]', '[{"type": "image_url"}]',
    "{}", '{"a": 1}', '{"type": "text"}', '{"include_usage": true}', '{"include_usage": "yes"}',
    "[" * 5000 + "]" * 5000, '{"a":' * 5000 + "1" + "}" * 5000, "[" * 400 + "]" * 400,
]]  # fmt: skip
"""Values of every JSON type, the odd ones mostly, as JSON text."""

CONTENT_TYPES = ["text/plain", "", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                 "application/json; charset=utf-16", "APPLICATION/JSON", "application/jsonx", "application/json;;"]  # fmt: skip
BAD_BYTES = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x00", b"\xef\xbb\xbf", b"\x80\x80"]
ENCODINGS = ["utf-16", "utf-32", "utf-8-sig", "utf-16-be", "latin-1"]


def render(value: Any) -> str:
    """``value`` as JSON text, :class:`Raw` parts as they are."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{render(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(render(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def base(path: str) -> dict[str, Any]:
    """A valid greedy request to ``path`` (4 tokens at most)."""
    if path == "/v1/chat/completions":
        return {"model": NAME, "messages": [{"role": "user", "content": "Write 17 in Chinese numerals."}],
                "max_tokens": 4, "temperature": 0}  # fmt: skip
    return {"model": NAME, "prompt": "Reverse the string: 河云马林山\n", "max_tokens": 4}


def mutate_fields(rng: random.Random, path: str, body: dict[str, Any]) -> None:
    """One to three field mutations: a field (the schema's, or unknown) set to an odd value or
    dropped, or a value nested in the messages or the prompt made odd."""
    schema = ChatRequest if path == "/v1/chat/completions" else CompletionRequest
    for _ in range(rng.randint(1, 3)):
        kind, odd = rng.random(), rng.choice(ODD)
        if kind < 0.5:
            body[rng.choice([*schema.model_fields, "unknown_field"])] = odd
        elif kind < 0.6:
            body.pop(rng.choice(list(body) or ["model"]), None)
        elif path == "/v1/chat/completions":
            message = {"role": "user", "content": "hi"} | rng.choice(
                [{"role": odd}, {"content": odd}, {"content": [{"type": "text", "text": odd}]},
                 {"content": [{"type": odd, "text": "hi"}]}, {"name": odd}]  # fmt: skip
            )
            body["messages"] = rng.choice([[message], [odd], [message, message], [message] * 3])
        else:
            body["prompt"] = rng.choice([[odd], [[odd]], [odd, "hi"], [[5, 6], odd]])


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    """The body's bytes broken: cut short, an invalid UTF-8 sequence spliced in, re-encoded, or
    replaced by something that is not a JSON object."""
    kind = rng.randrange(4)
    if kind == 0:
        return data[: rng.randrange(len(data))]
    if kind == 1:
        at = rng.randrange(len(data) + 1)
        return data[:at] + rng.choice(BAD_BYTES) + data[at:]
    if kind == 2:
        return data.decode("utf-8").encode(rng.choice(ENCODINGS), errors="replace")
    return rng.choice([b"", b" ", b"null", b"[]", b"1", b'"x"', b"{", b"}", bytes(rng.randrange(256) for _ in range(64))])


def case(rng: random.Random) -> tuple[str, str, dict[str, str], bytes, str]:
    """A random request: (method, path, headers, body, what was done to it)."""
    path = rng.choice(["/v1/chat/completions", "/v1/completions"])
    body, done = base(path), []
    if rng.random() < 0.3:
        body["stream"] = True
    if rng.random() < 0.8:
        mutate_fields(rng, path, body)
        done.append("fields")
    data = render(body).encode("utf-8", "surrogatepass")
    if rng.random() < 0.2:
        data = mutate_bytes(rng, data)
        done.append("bytes")
    headers = {"content-type": "application/json"}
    if rng.random() < 0.1:
        headers["content-type"] = rng.choice(CONTENT_TYPES)
        done.append("content-type")
    method = "POST" if rng.random() < 0.95 else rng.choice(["GET", "PUT", "DELETE", "PATCH"])
    return method, path, headers, data, f"{method} {path} {'+'.join(done)}: {data[:300]!r}"


def check(response: Any, what: str) -> int:
    """2xx or an OpenAI-shaped 4xx (returned); a stream ends with ``[DONE]`` and holds no server error."""
    assert 200 <= response.status_code < 500, f"{response.status_code} for {what}: {response.text[:500]}"
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}, what
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.rstrip().endswith("data: [DONE]") and "server_error" not in response.text, what
    return response.status_code


@pytest.fixture(scope="module")
def client(run_dir):  # noqa: F811
    """The app in this process (starlette's TestClient; a 500 is answered, not raised) over a
    fresh engine whose context is :data:`CONTEXT` tokens."""
    model, tokenizer, template = load_for_inference(run_dir)
    engine = Engine(model, tokenizer, template, batch_wait_ms=5)
    engine.context_length = CONTEXT
    with TestClient(create_app(engine.start(), NAME), raise_server_exceptions=False) as test_client:
        yield test_client


def innocent(client: TestClient, question: str, stream: bool) -> str:
    """The greedy reply to ``question`` (8 tokens at most), streamed or whole."""
    body = {"model": NAME, "messages": [{"role": "user", "content": question}], "max_tokens": 8,
            "temperature": 0, "stream": stream}  # fmt: skip
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    if not stream:
        return r.json()["choices"][0]["message"]["content"]
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def test_fuzzed_requests_get_no_500_and_innocent_requests_their_replies(client, capfd):
    """:data:`CASES` seeded random requests, 4 at a time, while one client keeps asking three
    questions (whole and streamed) and must get exactly the replies it got alone."""
    questions = QUESTIONS[:3]
    alone = [innocent(client, q, False) for q in questions]
    rng = random.Random(SEED)
    cases = [case(rng) for _ in range(CASES)]
    done, seen = threading.Event(), []

    def innocents() -> None:
        while not done.is_set() or len(seen) < 2 * len(questions):
            i = len(seen) % len(questions)
            seen.append((i, innocent(client, questions[i], stream=len(seen) % 2 == 1)))

    def fuzz(method: str, path: str, headers: dict[str, str], data: bytes, what: str) -> int:
        return check(client.request(method, path, content=data, headers=headers), what)

    with ThreadPoolExecutor(5) as pool:
        watcher = pool.submit(innocents)
        try:
            statuses = Counter(future.result() for future in [pool.submit(fuzz, *c) for c in cases])
        finally:
            done.set()
        watcher.result()
    assert {200, 400, 405, 415} <= set(statuses) and statuses[200] > 50, statuses  # every kind was met
    assert [reply for _, reply in seen] == [alone[i] for i, _ in seen]
    assert client.get("/health").json()["status"] == "ok"
    assert "internal error" not in capfd.readouterr().err


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b'{"model": "default", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        (b'{"model": "default", "prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", "4300 digits"),
        (b'{"model": "\\ud800", "prompt": "hi"}', "lone UTF-16 surrogate"),
        (b'{"model": "default", "prompt": "a\\udc00b", "max_tokens": 2}', "lone UTF-16 surrogate"),
        (b'{"model": "default", "prompt": "hi", "temperature": NaN}', "finite number"),
        (b'{"model": "default", "prompt": "hi", "top_p": 1e309}', "finite number"),
    ],
    ids=["deep", "digits", "surrogate-model", "surrogate-prompt", "nan", "inf"],
)
def test_what_the_fuzz_found_is_a_400(client, body, says):
    """Bodies that were 500s before the fuzz found them: JSON nested past Python's recursion
    limit, an integer over its 4,300 digits, a lone surrogate escape (which no tokenizer takes,
    nor an error message naming it can be sent as UTF-8), NaN and infinite sampling settings."""
    r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and says in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "invalid_request_error"

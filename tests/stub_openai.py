"""A scripted OpenAI-compatible server for tests: real HTTP on 127.0.0.1, replies decided by a
Python function, so a test can play a teacher model or a judge, good, malformed or failing.

    def script(request: dict, n: int) -> Scripted:   # n: 1-based count of requests so far
        return Scripted(text="得分：0.8")

    with StubServer(script) as server:
        server.base_url          # "http://127.0.0.1:PORT/v1"
        server.requests          # every request body received, in order

A script may return a string (a 200 reply with that text) or a :class:`Scripted` with a status,
a raw body (for malformed replies), headers (``Retry-After``) or a delay (for timeouts).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Scripted:
    """One scripted reply. ``body`` (raw text) overrides ``text``; ``status`` != 200 sends an
    OpenAI-shaped error unless ``body`` is given."""

    text: str = ""
    status: int = 200
    body: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    finish_reason: str = "stop"


def completion(text: str, finish_reason: str = "stop", model: str = "stub") -> dict[str, Any]:
    """A chat completion body with made-up token counts (characters / 2)."""
    return {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
        ],
        "usage": {
            "prompt_tokens": 10,
            "completion_tokens": max(1, len(text) // 2),
            "total_tokens": 10 + len(text) // 2,
        },
    }


class StubServer:
    """Serve ``script`` on a free loopback port in a background thread (a context manager)."""

    def __init__(self, script: Callable[[dict[str, Any], int], Scripted | str], api_key: str = "") -> None:
        self.script = script
        self.api_key = api_key
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def _send(self, status: int, body: str, headers: dict[str, str] | None = None) -> None:
                data = body.encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.rstrip("/") == "/v1/models":
                    self._send(
                        200, json.dumps({"object": "list", "data": [{"id": "stub", "object": "model"}]})
                    )
                else:
                    self._send(404, json.dumps({"error": {"message": "not found"}}))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                request = json.loads(self.rfile.read(length) or b"{}")
                if stub.api_key and self.headers.get("Authorization") != f"Bearer {stub.api_key}":
                    self._send(401, json.dumps({"error": {"message": "Incorrect API key provided"}}))
                    return
                with stub._lock:
                    stub.requests.append(request)
                    n = len(stub.requests)
                reply = stub.script(request, n)
                if isinstance(reply, str):
                    reply = Scripted(text=reply)
                if reply.delay:
                    time.sleep(reply.delay)
                if reply.body is not None:
                    body = reply.body
                elif reply.status != 200:
                    body = json.dumps({"error": {"message": f"scripted {reply.status}", "type": "stub"}})
                else:
                    body = json.dumps(
                        completion(reply.text, reply.finish_reason, request.get("model", "stub"))
                    )
                try:
                    self._send(reply.status, body, reply.headers)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> StubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

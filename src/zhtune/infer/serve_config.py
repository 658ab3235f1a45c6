"""The settings of ``zhtune serve``: its options (flags generated from the fields) and the limits
of one request. Kept apart from the app so that building the CLI parser imports no web framework."""

from __future__ import annotations

import os
from dataclasses import dataclass

from zhtune.errors import ZhtuneError


@dataclass(frozen=True)
class Limits:
    """What one request may ask (each beyond it is refused with a 4xx naming the limit)."""

    max_body_bytes: int = 2 * 2**20
    """Request body size (413 beyond)."""
    max_messages: int = 1024
    """Messages in one chat request."""
    max_choices: int = 256
    """Replies one request asks for: prompts x n."""
    body_timeout: float = 10.0
    """Seconds to wait for each piece of a request body (408 beyond)."""



DEFAULT_LIMITS = Limits()

LOOPBACK = ("127.0.0.1", "localhost", "::1")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
"""Host header names (without the port) of a loopback server."""


def credential(value: str, variable: str, fix: str) -> str | None:
    """A secret from its flag's ``value``, else from ``$variable``; None for none. A variable that is
    set but blank is an error saying ``fix`` (it would silently turn the protection off)."""
    if value:
        return value
    env = os.environ.get(variable)
    if env is not None and not env.strip():
        raise ZhtuneError(f"{variable} is set but empty: {fix}")
    return env or None


def refuse_open_bind(host: str, guarded: bool, insecure: bool, guard: str, exposed: str, remedy: str) -> None:
    """A non-loopback ``host`` without its ``guard`` (a key, a login) is refused unless
    ``insecure`` (``--insecure-no-auth``): anyone who can reach it could ``exposed``."""
    if not guarded and host not in LOOPBACK and not insecure:
        raise ZhtuneError(
            f"--host {host} without {guard} would let anyone who can reach it {exposed}: pass {remedy}, "
            "or --insecure-no-auth to serve it openly"
        )


@dataclass
class ServeOptions:
    """Options of ``zhtune serve`` (``--device``, ``--dtype`` and ``--trust-remote-code`` apart)."""

    host: str = "127.0.0.1"
    """Address to bind (127.0.0.1: this machine only; any other needs --api-key or --insecure-no-auth)."""
    port: int = 8000
    """Port to listen on."""
    api_key: str = ""
    """Require 'Authorization: Bearer KEY' on /v1 (empty: $ZHTUNE_API_KEY if set, else no key)."""
    insecure_no_auth: bool = False
    """Serve on a non-loopback address without an API key (anyone who can reach it may use it)."""
    max_concurrent: int = 128
    """Requests in flight before 429 busy."""
    max_queue: int = 1024
    """Replies (prompts x n) waiting for a batch before 429 busy with Retry-After."""
    max_batch_size: int = 32
    """Replies decoded together."""
    batch_wait_ms: float = 10.0
    """Start a batch once no request has arrived for this long."""
    max_body_mb: float = 2.0
    """Largest request body, MiB (413 beyond)."""
    max_messages: int = 1024
    """Most messages in one chat request (400 beyond)."""
    max_request_choices: int = 256
    """Most replies one request may ask for, prompts x n (400 beyond)."""
    max_connections: int = 1024
    """Open connections and requests before new ones get 503 (uvicorn's limit_concurrency)."""
    keep_alive_timeout: int = 5
    """Seconds an idle keep-alive connection is kept open."""
    header_timeout: float = 10.0
    """Seconds a connection has to send a complete request head (and each piece of its body) before it is closed."""
    shutdown_timeout: float = 30.0
    """On SIGTERM, seconds in-flight requests may take to finish before they are ended with an error (a second signal exits at once)."""
    template: str = ""
    """Override the run's chat template (empty: the run's own)."""
    allowed_hosts: str = ""
    """Host headers answered, comma-separated (empty: localhost names for a loopback --host, any for others)."""
    allowed_origins: str = ""
    """Web page origins whose scripts may call the API from a browser (CORS), comma-separated, e.g. https://app.example.com, or * for any (empty: none; no Access-Control-* header is sent)."""

    def resolved_key(self) -> str | None:
        """The API key: the option, else $ZHTUNE_API_KEY; None for none. A key variable that is set
        but empty is an error (it would silently turn authentication off)."""
        return credential(self.api_key, "ZHTUNE_API_KEY", "set a key, or unset it to serve without one")

    def check(self) -> str | None:
        """Validate the options (before any model is loaded); returns the API key."""
        for name in ("max_concurrent", "max_queue", "max_batch_size", "max_messages", "max_request_choices",
                     "max_connections", "keep_alive_timeout"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ZhtuneError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.batch_wait_ms < 0:
            raise ZhtuneError(f"--batch-wait-ms must be 0 or more, got {self.batch_wait_ms}")
        for name in ("max_body_mb", "header_timeout", "shutdown_timeout"):
            if getattr(self, name) <= 0:
                raise ZhtuneError(f"--{name.replace('_', '-')} must be above 0, got {getattr(self, name)}")
        for origin in self.origins():
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ZhtuneError(f"--allowed-origins takes origins (scheme://host[:port]) or *, not {origin!r}")
        key = self.resolved_key()
        refuse_open_bind(
            self.host, key is not None, self.insecure_no_auth, "an API key", "use the model",
            "--api-key KEY (or set ZHTUNE_API_KEY)",
        )  # fmt: skip
        return key

    def hosts(self) -> tuple[str, ...] | None:
        """The Host names requests may carry (a page on another site that points its own name at
        127.0.0.1, DNS rebinding, then reaches nothing); None: any."""
        if self.allowed_hosts:
            return tuple(h.strip().lower() for h in self.allowed_hosts.split(",") if h.strip())
        return LOOPBACK_NAMES if self.host in LOOPBACK else None

    def origins(self) -> tuple[str, ...]:
        """The origins of --allowed-origins (a browser sends an origin without a trailing slash)."""
        return tuple(o.strip().rstrip("/") for o in self.allowed_origins.split(",") if o.strip())

    def limits(self) -> Limits:
        return Limits(
            int(self.max_body_mb * 2**20), self.max_messages, self.max_request_choices, self.header_timeout
        )

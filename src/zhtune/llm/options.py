"""One declaration of an OpenAI-compatible endpoint's settings, composed by every command that
talks to one: the teacher of ``zhtune data generate|evolve`` (flags ``--base-url``, ``--model``,
...), the judge of ``zhtune eval judge`` (the same fields as ``--judge-base-url``,
``--judge-model``, ...) and an experiment's judge (``eval.judge.model``).

Only the standard library is imported here (the client, with ``httpx``, loads when a command
runs), so the parsers that generate flags from it stay instant.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zhtune.errors import ZhtuneError
from zhtune.llm.client import ChatClient, Endpoint


@dataclass
class EndpointOptions:
    """An OpenAI-compatible endpoint and how to talk to it."""

    base_url: str = ""
    """OpenAI-compatible base URL ending in /v1 (empty: $OPENAI_BASE_URL)."""
    model: str = ""
    """Model name sent with each request (empty: $OPENAI_MODEL)."""
    api_key: str = ""
    """API key (empty: $OPENAI_API_KEY, else none)."""
    concurrency: int = 8
    """Requests in flight at once."""
    max_tokens: int = 2048
    """Most tokens per reply."""
    timeout: float = 120.0
    """Seconds per attempt before a request is retried."""
    max_retries: int = 5
    """Extra attempts per request on 429, 5xx, timeouts and malformed replies."""
    backoff: float = 1.0
    """First wait before a retry, seconds (doubling each attempt; a Retry-After header wins)."""
    price_in: float = 0.0
    """Price per million prompt tokens, for the cost line of the summary."""
    price_out: float = 0.0
    """Price per million completion tokens."""

    def check(self, flag_prefix: str = "") -> None:
        """Fail clearly on settings no request could use; errors name the flags as the command
        spells them (``flag_prefix`` ``judge-`` for the judge)."""
        for name in ("concurrency", "max_tokens"):
            if getattr(self, name) < 1:
                flag = f"--{flag_prefix}{name.replace('_', '-')}"
                raise ZhtuneError(f"{flag} must be at least 1, got {getattr(self, name)}")

    def resolve(self, flag_prefix: str = "") -> Any:
        """The resolved :class:`~zhtune.llm.client.Endpoint` (options, then the environment); a
        clear error naming ``--{flag_prefix}base-url`` / ``--{flag_prefix}model`` if incomplete."""

        return Endpoint.resolve(
            self.base_url or None, self.model or None, self.api_key or None, flag_prefix=flag_prefix
        )

    def client(self, cache: str | Path | None, flag_prefix: str = "") -> Any:
        """A :class:`~zhtune.llm.client.ChatClient` for this endpoint (replies cached in the SQLite
        file ``cache``, or not at all when it is None)."""

        self.check(flag_prefix)
        return ChatClient(
            self.resolve(flag_prefix),
            concurrency=self.concurrency,
            max_retries=self.max_retries,
            timeout=self.timeout,
            backoff=self.backoff,
            cache=cache,
            price_in=self.price_in,
            price_out=self.price_out,
        )

"""The OpenAI protocol of ``zhtune serve``: request bodies (validated with pydantic), OpenAI-shaped
errors, and the pure functions that turn a request into prompts, samplings and usage counts.

Errors are ``{"error": {"message", "type", "param", "code"}}``: 400 for a malformed body (not
JSON, not UTF-8/16/32 text, a lone surrogate escape, nested past the recursion limit, an integer
of over 4,300 digits), invalid or unsupported parameters (NaN and infinities included), or a prompt plus ``max_tokens`` over the context; 401 for a
missing or wrong key; 404 for an unknown model or path; 429 (with ``Retry-After``) when
``max_concurrent`` requests are in flight or ``max_queue`` replies wait for a batch; 500 if
generation itself fails (that request alone); 503 while the model loads (``model_loading``) and
for requests still running when a shutdown's grace period ends.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse

from zhtune.infer.generate import Sampling


class ApiError(Exception):
    """An error answered as OpenAI does: a status and ``{"error": {...}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingParams(BaseModel):
    """Parameters shared by both generation endpoints (others are ignored, as OpenAI's own
    servers ignore unknown ones). ``null`` means the default."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    n: int | None = Field(None, ge=1, le=128)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | int | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None


class ChatRequest(SamplingParams):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(SamplingParams):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


UNSUPPORTED = {  # parameter: the values zhtune serve accepts for it
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "logit_bias": (None, {}),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "response_format": (None, {"type": "text"}),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
}


UNION_TAGS = {"str", "int", "float", "bool"}


async def parse_body(request: Request, schema: type[SamplingParams]) -> Any:
    """The request's JSON body validated against ``schema``; errors raise :class:`ApiError` (400;
    415 for a body that does not say it is JSON: a cross-site form post cannot send that)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise ApiError(
            415, f"send the body as JSON (Content-Type: application/json), not {kind or 'no content type'}",
            code="unsupported_media_type",
        )  # fmt: skip
    try:
        body = json.loads(await request.body())
        check_text(body)
    except ValueError as err:  # not JSON, not UTF-8/16/32, or an integer of over 4,300 digits
        raise ApiError(400, f"could not parse the JSON body of the request: {err}") from None
    except RecursionError:
        raise ApiError(400, "could not parse the JSON body of the request: it is nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        req = schema.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        # pydantic names the union member that failed ("prompt.str"); the param is the field path
        loc = [str(p) for p in first["loc"] if isinstance(p, int) or p not in UNION_TAGS and "[" not in p]
        param = ".".join(loc) or None
        raise ApiError(400, f"invalid value for '{param}': {first['msg']}", param=param) from None
    for name, accepted in UNSUPPORTED.items():
        if getattr(req, name, None) not in accepted:
            raise ApiError(400, f"'{name}' is not supported by zhtune serve", param=name)
    return req


def check_text(body: Any) -> None:
    """Refuse (400) a parsed body with a string UTF-8 cannot encode: JSON's ``\\ud800`` escape
    without its pair parses to a lone surrogate, which no tokenizer or reply can carry. One
    C-speed pass over a body already bounded by --max-body-mb."""
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, "the JSON body holds a lone UTF-16 surrogate escape (\\udXXX without its pair), "
                       "which is not text") from None  # fmt: skip


def chat_messages(req: ChatRequest) -> list[dict[str, str]]:
    """The request's messages as zhtune conversation turns (``developer`` is ``system``)."""
    out = []
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        if role == "system" and i > 0:
            raise ApiError(400, "a system message may only come first", param=f"messages.{i}.role")
        text = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
        out.append({"role": role, "content": text})
    if out[-1]["role"] != "user":
        raise ApiError(400, "the last message must come from the user", param="messages")
    return out




def stop_strings(req: SamplingParams) -> list[str]:
    """The request's ``stop`` as a list (at most 4 non-empty strings)."""
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise ApiError(400, "'stop' takes up to 4 non-empty strings", param="stop")
    return stop


def samplings(req: SamplingParams, prompt_len: int, context_length: int) -> list[Sampling]:
    """``n`` samplings for one prompt of ``prompt_len`` tokens, after checking it fits the context."""
    room = context_length - prompt_len
    max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
    if prompt_len < 1:
        raise ApiError(400, "the prompt is empty", param="prompt")
    if room < 1 or (max_tokens is not None and max_tokens > room):
        raise ApiError(
            400,
            f"this model's maximum context length is {context_length} tokens; the prompt has "
            f"{prompt_len} and max_tokens asks for {max_tokens or 'at least 1'} more",
            param="max_tokens" if room >= 1 else "messages",
            code="context_length_exceeded",
        )
    n, temperature, top_p = req.n or 1, req.temperature, req.top_p
    return [
        Sampling(
            max_new_tokens=max_tokens or room,
            temperature=1.0 if temperature is None else temperature,
            top_p=1.0 if top_p is None else top_p,
            seed=None if req.seed is None else (req.seed + j) % 2**63,
        )
        for j in range(n)
    ]


def usage(prompts: list[list[int]], tokens: int) -> dict[str, int]:
    """OpenAI's ``usage`` block."""
    prompt_tokens = sum(len(p) for p in prompts)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": tokens, "total_tokens": prompt_tokens + tokens}

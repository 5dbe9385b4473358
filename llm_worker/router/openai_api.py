"""The OpenAI chat-completions wire format the router speaks: request parsing, response and
stream-chunk objects, error bodies.

Follows what the official ``openai`` client sends and expects (and what vLLM serves): errors are
``{"error": {"message", "type", "param", "code"}}`` with the HTTP status; ours add ``"stage"``
(``encode``, ``prefill``, ``decode``, ``generate``, ``router``) to name the part of the stack
that failed. Extensions, as in vLLM: ``return_token_ids`` puts the generated ids in each choice.
"""

from __future__ import annotations

import math
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from typing import Any

from llm_worker.engine.sampling import SamplingParams

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                413: "invalid_request_error", 429: "rate_limit_error"}
_UNSUPPORTED = ("tools", "functions", "tool_choice", "response_format", "logit_bias")
_MAX_STOP = 4


class APIError(Exception):
    """An error answered as OpenAI's error JSON with ``status``; ``stage`` names where it arose;
    ``retry_after_s`` (a 503 from a full queue or cache) becomes the ``Retry-After`` header."""

    def __init__(self, status: int, message: str, stage: str = "router", param: str | None = None,
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.message, self.stage, self.param = status, message, stage, param
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str] | None:
        if self.retry_after_s is None:
            return None
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}

    def body(self) -> dict:
        kind = _ERROR_TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": f"{self.stage}: {self.message}" if self.stage != "router" else self.message,
                          "type": kind, "param": self.param, "code": self.status, "stage": self.stage}}


@dataclass(frozen=True)
class ChatRequest:
    """What the router takes from a ``POST /v1/chat/completions`` body."""

    model: str
    messages: list[dict]
    sampling: dict
    """For the workers: ``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop`` (given ones only)."""
    max_tokens_param: str | None = None
    """``max_tokens`` or ``max_completion_tokens``: the field the client capped the output with;
    None: it gave none and ``sampling["max_tokens"]`` is the server's default."""
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False
    mm_processor_kwargs: dict | None = None
    """vLLM's per-request media options as given (``{"fps": 2, "max_frames": 8}`` for videos);
    the router checks them."""


def parse_chat_request(doc: Any, default_max_tokens: int) -> ChatRequest:
    """Validates the body; ``APIError(400)`` names the offending parameter."""
    if not isinstance(doc, dict):
        raise APIError(400, "the body must be a JSON object")
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, '"model" is required (a string; GET /v1/models lists it)', param="model")
    messages = doc.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, '"messages" must be a non-empty list', param="messages")
    for name in _UNSUPPORTED:
        if doc.get(name) is not None:
            raise APIError(400, f'"{name}" is not supported by this server', param=name)
    if doc.get("n", 1) != 1:
        raise APIError(400, '"n" must be 1 (one choice per request)', param="n")
    if doc.get("logprobs"):
        raise APIError(400, '"logprobs" is not supported by this server', param="logprobs")
    stream = _flag(doc, "stream")
    options = doc.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not stream):
        raise APIError(400, '"stream_options" must be an object and needs "stream": true', param="stream_options")
    include_usage = _flag(options or {}, "include_usage")
    param = next((p for p in ("max_completion_tokens", "max_tokens") if doc.get(p) is not None), None)
    max_tokens = doc[param] if param else None
    sampling: dict[str, Any] = {"max_tokens": default_max_tokens if max_tokens is None else max_tokens}
    for name in ("temperature", "top_p", "seed"):
        if doc.get(name) is not None:
            sampling[name] = doc[name]
    stop = doc.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or len(stops) > _MAX_STOP or not all(isinstance(s, str) and s for s in stops):
            raise APIError(400, f'"stop" must be a string or a list of at most {_MAX_STOP} non-empty strings',
                           param="stop")
        sampling["stop"] = stops
    try:  # NOTE: checked here, before any image is fetched; the workers check again
        SamplingParams(**sampling)
    except (TypeError, ValueError) as e:
        raise APIError(400, str(e).replace("max_tokens=", f"{param}=") if param else str(e)) from None
    mm = doc.get("mm_processor_kwargs")
    if mm is not None and not isinstance(mm, dict):
        raise APIError(400, '"mm_processor_kwargs" must be an object such as {"fps": 2, "max_frames": 8}',
                       param="mm_processor_kwargs")
    return ChatRequest(model, [_with_file_urls(m) for m in messages], sampling, param, stream, include_usage,
                       _flag(doc, "return_token_ids"), mm)


def _flag(doc: dict, name: str) -> bool:
    value = doc.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(400, f'"{name}" must be true or false', param=name)
    return value


def _with_file_urls(message: Any) -> Any:
    """``message`` with image and video parts that name a local absolute path turned into
    ``file://`` URLs (the encoders decide which directories they may read)."""
    if not isinstance(message, dict) or not isinstance(message.get("content"), list):
        return message
    parts = []
    for part in message["content"]:
        kind = part.get("type") if isinstance(part, dict) else None
        url = part[kind].get("url") if kind in ("image_url", "video_url") and isinstance(part.get(kind), dict) \
            else None
        if isinstance(url, str) and url.startswith("/"):
            part = {**part, kind: {**part[kind], "url": "file://" + urllib.parse.quote(url)}}
        parts.append(part)
    return {**message, "content": parts}


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(cid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
               token_ids: list[int] | None = None) -> dict:
    """A ``chat.completion`` object."""
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                              "logprobs": None, "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": usage(prompt_tokens, len(token_ids or []))}


def chunk(cid: str, model: str, created: int, delta: dict, finish_reason: str | None = None,
          token_ids: list[int] | None = None) -> dict:
    """A ``chat.completion.chunk`` with one choice."""
    choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}


def usage_chunk(cid: str, model: str, created: int, prompt_tokens: int, completion_tokens: int) -> dict:
    """The last chunk when ``stream_options.include_usage``: no choices, the usage."""
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}

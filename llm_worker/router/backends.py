"""The router's view of its workers: pools of backends by role, the least-busy pick that passes
over workers that recently could not be reached, and the token stream a decode (or ``both``)
worker answers with."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp

from llm_worker.router.openai_api import APIError

logger = logging.getLogger("llm_worker.router.router")


class Unreachable(Exception):
    """A worker could not be reached or dropped the connection before answering."""


class Backend:
    """One worker: its URL, requests in flight, and whether it recently failed."""

    def __init__(self, role: str, url: str):
        self.role, self.url = role, url.rstrip("/")
        self.inflight = 0
        self.requests = 0
        self.failures = 0
        self.down_until = 0.0
        self.last_error: str | None = None

    def up(self, now: float) -> bool:
        return now >= self.down_until

    def info(self) -> dict:
        return {"url": self.url, "inflight": self.inflight, "requests": self.requests, "failures": self.failures,
                "last_error": self.last_error}


def _weight(key: str, url: str) -> bytes:
    return hashlib.blake2b(f"{url}\0{key}".encode(), digest_size=8).digest()


class Pool:
    """The workers of one role; picks the least busy ones that have not just failed."""

    def __init__(self, role: str, urls: Sequence[str], retry_down_s: float):
        self.role = role
        self.backends = [Backend(role, u) for u in urls]
        self.retry_down_s = retry_down_s
        self._turn = 0

    def __len__(self) -> int:
        return len(self.backends)

    def pick(self, k: int = 1, exclude: Sequence[Backend] = ()) -> list[Backend]:
        """Up to ``k`` distinct workers not in ``exclude``: those up first, fewest in flight first,
        ties in turn (round robin)."""
        now = time.monotonic()
        n = len(self.backends)
        order = [self.backends[(self._turn + i) % n] for i in range(n)]
        self._turn = (self._turn + 1) % max(n, 1)
        candidates = [b for b in order if b not in exclude]
        candidates.sort(key=lambda b: (not b.up(now), b.inflight))
        return candidates[:k]

    def owner(self, key: str) -> Backend:
        """The worker ``key`` belongs to: rendezvous (highest random weight) hashing over the
        workers that are up (all of them if none is), so one key always meets the same worker
        while the pool holds, and a worker going down moves only its own keys."""
        now = time.monotonic()
        live = [b for b in self.backends if b.up(now)] or self.backends
        return max(live, key=lambda b: _weight(key, b.url))

    def failed(self, backend: Backend, error: str) -> None:
        backend.failures += 1
        backend.last_error = error
        backend.down_until = time.monotonic() + self.retry_down_s
        logger.warning("%s worker %s unreachable (%s); passing it over for %.0f s", self.role, backend.url, error,
                       self.retry_down_s)


class TokenStream:
    """A worker's SSE answer (``{"text", "token_id"}`` per token, then ``{"finish_reason", ...}``
    or ``{"error"}``, then ``[DONE]``) read event by event; ``close`` drops the connection, which
    makes the worker abandon the request."""

    def __init__(self, response: aiohttp.ClientResponse, backend: Backend, stage: str):
        self.response, self.backend, self.stage = response, backend, stage

    async def next(self) -> dict:
        """The next event; ``APIError`` for an error event or a broken stream."""
        try:
            async for raw in self.response.content:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:  # NOTE: the worker's status for it (a 503 stays a 503), else 500
                    status = event.get("status")
                    raise APIError(status if isinstance(status, int) and 400 <= status < 600 else 500,
                                   str(event["error"]), self.stage, retry_after_s=_retry_after(event.get("retry_after_s")))
                return event
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
            raise APIError(502, f"the {self.stage} worker {self.backend.url} broke off: {e!r}", self.stage) from e
        raise APIError(502, f"the {self.stage} worker {self.backend.url} ended the stream without finishing",
                       self.stage)

    def close(self) -> None:
        self.response.close()


class FirstTokenFirst:
    """The prefill's first token event at once, then the decode worker's stream (``opening``,
    its first event, the same token, dropped): ``next`` and ``close`` as ``TokenStream``."""

    def __init__(self, first: dict, opening: asyncio.Future):
        self._first: dict | None = first
        self._token_id = first["token_id"]
        self._opening = opening
        self._stream: TokenStream | None = None

    async def next(self) -> dict:
        if self._first is not None:
            event, self._first = self._first, None
            return event
        if self._stream is None:
            self._stream = await self._opening
            echo = await self._stream.next()
            if echo.get("token_id") != self._token_id:
                raise APIError(502, f"the decode worker {self._stream.backend.url} began with {echo!r}, not the "
                                    f"prefill's token {self._token_id}", "decode")
        return await self._stream.next()

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        elif self._opening.done():
            if not self._opening.cancelled() and self._opening.exception() is None:
                self._opening.result().close()
        else:
            self._opening.cancel()
            self._opening.add_done_callback(_close_opened)


def _close_opened(opening: asyncio.Future) -> None:
    """A stream that opened as it was cancelled: drop it (the decode worker then abandons it)."""
    if not opening.cancelled() and opening.exception() is None:
        opening.result().close()


def worker_error(status: int, doc: Any, stage: str, backend: Backend,
                 headers: Mapping[str, str] | None = None) -> APIError:
    message = doc.get("error") if isinstance(doc, dict) else None
    message = str(message) if message else f"HTTP {status} from {backend.url}"
    # NOTE: a worker's 400/413 is the client's input; its other 4xx (wrong role, missing KV)
    # are the stack's own fault: 502 for the client. A 503 (a full queue or cache) keeps its
    # Retry-After.
    retry_after_s = _retry_after((headers or {}).get("Retry-After")) if status == 503 else None
    return APIError(status if status in (400, 413, 503, 504) else 502 if status < 500 else status, message, stage,
                    retry_after_s=retry_after_s)


def _retry_after(value: Any) -> float | None:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None
